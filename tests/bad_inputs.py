"""A table of bad inputs to every ``sdo`` command and the public functions, and the rule that grades what each
one gets: ``clear`` (the expected exit code or error, one line naming the option or file), ``vague`` (an error,
but another code, several lines or no name), ``traceback`` (an exception escaped, or an unrelated one),
``silent`` (no error: the run went on, or worked for more than ``timeout`` seconds) or ``lost`` (a file that
existed before the call changed).

Used by tests/test_bad_inputs.py (every case must be clear) and by benchmarks/bad_inputs_survey.py, which grades
the same table on another checkout (``PYTHONPATH=<checkout>/src``) to count verdicts before and after a change. It
never imports ``sdo.checks``; since the layers became packages it imports sdo's modules by their new names, so a
checkout from before that (such as d540344, the survey's "before") is graded with this file as of commit 67ef240.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tiny
import torch

VERDICTS = ("clear", "vague", "traceback", "silent", "lost")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...] | None = None  # a command line ({name} is a path of the world, {new} a fresh folder)
    call: Callable | None = None  # or a function of the world that should raise (or warn, with warn=True)
    names: tuple[str, ...] = ()  # what the one-line message must name (- and _ are the same)
    code: int = 2  # the command's exit code
    warn: bool = False  # a warning, not an error, is the right answer


class World:
    """Files and folders the cases read or must leave alone (all under ``root``; fresh outputs under
    ``scratch``), and models built once."""

    def __init__(self, root: Path):
        from sdo.cli import main

        self.root, self.scratch = root / "world", root / "scratch"
        self.root.mkdir(parents=True)
        self.scratch.mkdir()
        r = self.root
        p = {"missing": r / "missing", "file": r / "file.txt", "full": r / "full", "adir": r / "adir"}
        p["file"].write_text("not a folder\n")
        p["full"].mkdir()
        (p["full"] / "old.txt").write_text("an earlier run's file\n")
        p["adir"].mkdir()
        with _quiet():  # a finished fine-tuning run, and LoRAs from it
            run = r / "run"
            code = main(["finetune", "--steps", "4", "--batch-size", "2", "--updates", "2", "--checkpoint-every", "1",
                         "--sample-every", "0", "--eval-count", "2", "--eval-scales", "1", "--guard-every", "0",
                         "--no-progress", "--cpu", "--output", str(run)])
            assert code == 0, "the world's fine-tuning run failed"
            assert main(["lora", "scale", str(run / "lora"), str(r / "lora2"), "--alpha", "0.5"]) == 0
        p.update(run=run, lora=run / "lora", lora2=r / "lora2")
        p["nan_lora"] = _edit_lora(run / "lora", r / "nan_lora", lambda t: torch.full_like(t, float("nan")))
        p["trunc_lora"] = _copy(run / "lora", r / "trunc_lora")
        _truncate(p["trunc_lora"] / "pytorch_lora_weights.safetensors")
        p["bad_command_run"] = _copy(run, r / "bad_command_run")
        (p["bad_command_run"] / "command.json").write_text('{"steps": 4,')
        p.update(self._images(r), **self._models(r), **self._configs(r))
        from sdo.embedded import weights_dir

        p["shipped"] = Path(str(weights_dir()))
        self.paths = {k: str(v) for k, v in p.items()}
        self._digits = None

    @staticmethod
    def _images(r: Path) -> dict:
        from PIL import Image

        png = r / "digit.png"
        Image.fromarray((torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(png)
        trunc = r / "truncated.png"
        trunc.write_bytes(png.read_bytes()[:40])
        text = r / "text.png"
        text.write_text("this is not a picture\n")
        return {"png": png, "trunc_png": trunc, "txt_png": text}

    @staticmethod
    def _models(r: Path) -> dict:
        from safetensors.torch import save_file

        (r / "tok").mkdir()
        tok = tiny.tokenizer(r / "tok")
        pipe = tiny.save_pipeline(tiny.stable_diffusion(tok), tok, r / "pipe")
        broken = _copy(pipe, r / "pipe_broken")
        shutil.rmtree(broken / "unet")
        clip = r / "clip"
        tiny.clip(tok).save_pretrained(clip)
        tok.save_pretrained(clip)
        classifier = tiny.save_classifier(r / "classifier")
        heads = {}
        for name, weight in (("head", torch.randn(1, 8, generator=torch.Generator().manual_seed(0))),
                             ("nan_head", torch.full((1, 8), float("nan"))), ("wide_head", torch.ones(2, 8))):
            heads[name] = r / f"{name}.safetensors"
            save_file({"weight": weight, "bias": torch.zeros(weight.shape[0])}, str(heads[name]))
        heads["trunc_head"] = r / "trunc_head.safetensors"
        heads["trunc_head"].write_bytes(heads["head"].read_bytes()[:20])
        bad_unet = r / "bad_unet.json"
        bad_unet.write_text('{"_class_name": "UNet2DModel", ')
        pixart_config = r / "pixart.json"  # a denoiser config that sdo bench does not build
        pixart_config.write_text('{"_class_name": "PixArtTransformer2DModel", "sample_size": 8}')
        return {"pipe": pipe, "pipe_broken": broken, "clip": clip, "classifier": classifier, "bad_unet": bad_unet,
                "pixart_config": pixart_config, **heads}

    @staticmethod
    def _configs(r: Path) -> dict:
        files = {"bad.toml": "lr = \n", "bad.json": "{", "list.json": "[1, 2]", "lr_text.toml": 'lr = "0.1"\n',
                 "betas.toml": "betas = 0.9\n", "steps.json": '{"steps": 10.7}', "unknown.json": '{"learning_rate": 1}',
                 "run.yaml": "lr: 0.1\n", "tensorboard.toml": 'tensorboard = "yes"\n', "target.toml": "target = 12\n"}
        out = {}
        for name, text in files.items():
            (r / name).write_text(text)
            out["cfg_" + name.replace(".", "_")] = r / name
        return out

    @property
    def digits(self):
        if self._digits is None:
            from sdo.embedded import load_digits

            self._digits = load_digits()
        return self._digits

    def chain(self, steps: int = 3, **kwargs):
        import sdo

        d = self.digits
        return sdo.Chain.from_diffusers(d.unet, d.scheduler, steps, cond={"class_labels": torch.tensor([3])}, **kwargs)

    def fill(self, case: Case, texts) -> list[str]:
        """``texts`` with {name} replaced by the world's paths ({new}: the case's fresh folder)."""
        return [t.format(**self.paths, new=self.scratch / case.id) for t in texts]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_lora(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    _copy(src, dst)
    weights = dst / "pytorch_lora_weights.safetensors"
    with safe_open(weights, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: edit(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(weights), metadata=metadata)
    return dst


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def digest(root: Path) -> dict[str, str]:
    """The hash of every file under ``root``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


class _Timeout(BaseException):
    pass


@contextlib.contextmanager
def _alarm(seconds: int | None):
    if not seconds:
        yield
        return

    def ring(*_):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_case(case: Case, world: World, timeout: int | None = None) -> tuple[str, str]:
    """``(verdict, what happened)`` of one case; the world's files are hashed before and after."""
    from sdo.cli import main

    before = digest(world.root)
    err, out = io.StringIO(), io.StringIO()
    code, raised, timed_out = None, None, False
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        try:
            with _alarm(timeout):
                if case.argv is not None:
                    code = main(world.fill(case, case.argv))
                else:
                    case.call(world)
        except SystemExit as exit_:
            code = exit_.code
        except _Timeout:
            timed_out = True
        except Exception as error:  # noqa: BLE001 (grading what escapes is the point)
            raised = error
    names = world.fill(case, case.names)
    after = digest(world.root)
    lost = [p for p, h in before.items() if after.get(p) != h]
    if lost:
        return "lost", f"changed {lost[:3]}"
    if timed_out:
        return "silent", f"still working after {timeout} s"
    if case.warn:
        said = [str(w.message) for w in caught]
        if raised is not None:
            return "traceback", f"{type(raised).__name__}: {raised}"
        if not said:
            return "silent", "no warning"
        return ("clear" if any(_names(m, names) for m in said) else "vague"), " | ".join(said)
    if case.argv is not None:
        if raised is not None:
            return "traceback", f"{type(raised).__name__}: {raised}"
        message = err.getvalue().strip()
        if code in (0, None):
            return "silent", f"exit {code}"
        one_line = len(message.splitlines()) == 1
        ok = code == case.code and one_line and _names(message, names)
        return ("clear" if ok else "vague"), f"exit {code}: {message[-300:]}"
    if raised is None:
        return "silent", "no error"
    text = f"{type(raised).__name__}: {raised}"
    if not isinstance(raised, (ValueError, TypeError, OSError)):
        return "traceback", text
    one_line = len(str(raised).strip().splitlines()) == 1
    return ("clear" if one_line and _names(str(raised), names) else "vague"), text


def _names(message: str, names: tuple[str, ...]) -> bool:
    flat = message.replace("-", "_").lower()
    return all(n.replace("-", "_").lower() in flat for n in names)


def _cli(id_: str, *argv: str, names=(), code: int = 2) -> Case:
    return Case(id_, argv=tuple(argv), names=tuple(names), code=code)


def _api(id_: str, call, names=(), warn: bool = False) -> Case:
    return Case(id_, call=call, names=tuple(names), warn=warn)


# -- the table ------------------------------------------------------------------------------------------------
_D = ("--digit", "0")  # the embedded digits edit
_P = ("--model", "{pipe}", "--clip", "{clip}")  # a pipeline task
_OUT = ("--output", "{new}", "--no-progress")
_FT = ("finetune", "--steps", "4", "--batch-size", "2", "--updates", "1", "--eval-count", "2", "--cpu",
       "--no-progress", "--output", "{new}")

CASES: list[Case] = [
    # sdo demo
    _cli("demo-steps-0", "demo", "--steps", "0", names=["--steps"]),
    _cli("demo-steps-fraction", "demo", "--steps", "2.5", names=["--steps"]),
    _cli("demo-samples-negative", "demo", "--samples", "-1", names=["--samples"]),
    _cli("demo-iterations-word", "demo", "--iterations", "many", names=["--iterations"]),
    _cli("demo-tau-0", "demo", "--tau", "0", names=["--tau"]),
    _cli("demo-tau-inf", "demo", "--tau", "inf", names=["--tau"]),
    _cli("demo-tau-nan", "demo", "--tau", "nan", names=["--tau"]),
    _cli("demo-lr-0", "demo", "--lr", "0", names=["--lr"]),
    _cli("demo-lr-nan", "demo", "--lr", "nan", names=["--lr"]),
    _cli("demo-content-weight-negative", "demo", "--content-weight", "-0.5", names=["--content-weight"]),
    _cli("demo-rules-unknown", "demo", "--rules", "foo", names=["--rules"]),
    _cli("demo-rules-empty", "demo", "--rules", ",", names=["--rules"]),
    _cli("demo-seed-negative", "demo", "--seed", "-1", names=["--seed"]),
    _cli("demo-seed-fraction", "demo", "--seed", "1.5", names=["--seed"]),
    _cli("demo-device-cuda", "demo", "--device", "cuda:3", names=["--device"]),
    _cli("demo-device-unknown", "demo", "--device", "tpu", names=["--device"]),
    _cli("demo-output-holds-files", "demo", "--output", "{full}", names=["{full}", "--overwrite"]),
    _cli("demo-output-is-a-file", "demo", "--output", "{file}", names=["--output"]),
    _cli("demo-unknown-flag", "demo", "--bogus", names=["--bogus"]),
    _cli("unknown-command", "nonsense", names=["nonsense"]),
    # sdo bench
    _cli("bench-steps-0", "bench", "--steps", "0", names=["--steps"]),
    _cli("bench-batch-negative", "bench", "--batch", "-2", names=["--batch"]),
    _cli("bench-sweep-word", "bench", "--sweep", "1,x", names=["--sweep"]),
    _cli("bench-sweep-0", "bench", "--sweep", "0", names=["--sweep"]),
    _cli("bench-strategies-unknown", "bench", "--strategies", "full,bogus", names=["--strategies"]),
    _cli("bench-strategies-without-sdo", "bench", "--strategies", "full", *_OUT, names=["sdo"]),
    _cli("bench-repeats-0", "bench", "--repeats", "0", names=["--repeats"]),
    _cli("bench-depths-negative", "bench", "--depths", "-1", names=["--depths"]),
    _cli("bench-guidance-scales-nan", "bench", "--guidance-scales", "nan", names=["--guidance-scales"]),
    _cli("bench-quality-iterations-negative", "bench", "--quality-iterations", "-1", names=["--quality-iterations"]),
    _cli("bench-float16-on-cpu", "bench", "--dtype", "float16", *_OUT, names=["float16"]),
    _cli("bench-dtype-unknown", "bench", "--dtype", "int8", names=["--dtype"]),
    _cli("bench-threads-0", "bench", "--threads", "0", names=["--threads"]),
    _cli("bench-model-missing", "bench", "--model", "{missing}.json", *_OUT, names=["{missing}.json"]),
    _cli("bench-model-not-json", "bench", "--model", "{bad_unet}", *_OUT, names=["{bad_unet}"]),
    _cli("bench-model-unbuilt-class", "bench", "--model", "{pixart_config}", *_OUT,
         names=["PixArtTransformer2DModel"]),
    _cli("bench-lora-negative", "bench", "--lora", "-1", names=["--lora"]),
    _cli("bench-output-holds-files", "bench", "--output", "{full}", names=["{full}", "--overwrite"]),
    _cli("bench-device-cuda", "bench", "--device", "cuda", names=["--device"]),
    # sdo edit on the embedded digits
    _cli("edit-empty-prompt", "edit", "", *_D, *_OUT, names=["prompt"]),
    _cli("edit-blank-prompt", "edit", "   ", *_D, *_OUT, names=["prompt"]),
    _cli("edit-digit-out-of-range", "edit", "a thin one", "--digit", "9999", *_OUT, names=["--digit"]),
    _cli("edit-digit-negative", "edit", "a thin one", "--digit", "-1", *_OUT, names=["--digit"]),
    _cli("edit-no-image-nor-digit", "edit", "a thin one", *_OUT, names=["--image", "--digit"]),
    _cli("edit-image-and-digit", "edit", "a thin one", *_D, "--image", "{png}", *_OUT, names=["--image"]),
    _cli("edit-start-t-negative", "edit", "a thin one", *_D, "--start-t", "-5", *_OUT, names=["--start-t"]),
    _cli("edit-start-t-too-large", "edit", "a thin one", *_D, "--start-t", "999999", *_OUT, names=["start_t"]),
    _cli("edit-start-t-fraction", "edit", "a thin one", *_D, "--start-t", "2.5", *_OUT, names=["--start-t"]),
    _cli("edit-steps-0", "edit", "a thin one", *_D, "--steps", "0", *_OUT, names=["--steps"]),
    _cli("edit-iterations-0", "edit", "a thin one", *_D, "--iterations", "0", *_OUT, names=["--iterations"]),
    _cli("edit-iterations-fraction", "edit", "a thin one", *_D, "--iterations", "2.7", *_OUT, names=["--iterations"]),
    _cli("edit-lr-nan", "edit", "a thin one", *_D, "--lr", "nan", *_OUT, names=["--lr"]),
    _cli("edit-lr-negative", "edit", "a thin one", *_D, "--lr", "-0.1", *_OUT, names=["--lr"]),
    _cli("edit-lam-negative", "edit", "a thin one", *_D, "--lam", "-1", *_OUT, names=["--lam"]),
    _cli("edit-lam-inf", "edit", "a thin one", *_D, "--lam", "inf", *_OUT, names=["--lam"]),
    _cli("edit-strategy-unknown", "edit", "a thin one", *_D, "--strategy", "bogus", *_OUT, names=["strategy", "bogus"]),
    _cli("edit-picard-without-sdo", "edit", "a thin one", *_D, "--picard", "--strategy", "full", *_OUT,
         names=["--picard"]),
    _cli("edit-scheduler-unknown", "edit", "a thin one", *_D, "--scheduler", "pndm", *_OUT, names=["--scheduler"]),
    _cli("edit-scheduler-not-invertible", "edit", "a thin one", *_D, "--scheduler", "lcm", *_OUT, names=["ddim"]),
    _cli("edit-digits-float16", "edit", "a thin one", *_D, "--dtype", "float16", *_OUT, names=["dtype"]),
    _cli("edit-digits-guidance", "edit", "a thin one", *_D, "--guidance-scale", "3", *_OUT, names=["--guidance-scale"]),
    _cli("edit-guidance-nan", "edit", "a thin one", *_D, "--guidance-scale", "nan", *_OUT, names=["--guidance-scale"]),
    _cli("edit-digits-checkpoint-vae", "edit", "a thin one", *_D, "--checkpoint-vae", *_OUT,
         names=["--checkpoint-vae"]),
    _cli("edit-device-cuda", "edit", "a thin one", *_D, "--device", "cuda", *_OUT, names=["--device"]),
    _cli("edit-image-missing", "edit", "a thin one", "--image", "{missing}.png", *_OUT, names=["{missing}.png"]),
    _cli("edit-image-truncated", "edit", "a thin one", "--image", "{trunc_png}", *_OUT, names=["{trunc_png}"]),
    _cli("edit-image-not-a-picture", "edit", "a thin one", "--image", "{txt_png}", *_OUT, names=["{txt_png}"]),
    _cli("edit-image-is-a-folder", "edit", "a thin one", "--image", "{adir}", *_OUT, names=["{adir}"]),
    _cli("edit-output-holds-files", "edit", "a thin one", *_D, "--output", "{full}", names=["{full}", "--overwrite"]),
    _cli("edit-output-is-a-file", "edit", "a thin one", *_D, "--output", "{file}", names=["--output"]),
    # sdo edit | style | aesthetic | adversarial on a pipeline
    _cli("style-true-cfg-on-stable-diffusion", "style", "a cat", *_P, "--reference", "{png}", "--true-cfg-scale",
         "2", *_OUT, names=["true_cfg_scale", "StableDiffusionPipeline"]),
    _cli("style-true-cfg-zero", "style", "a cat", *_P, "--reference", "{png}", "--true-cfg-scale", "0", *_OUT,
         names=["--true-cfg-scale"]),
    _cli("style-drop-t5-on-stable-diffusion", "style", "a cat", *_P, "--reference", "{png}", "--drop-t5", *_OUT,
         names=["drop_t5", "StableDiffusionPipeline"]),
    _cli("edit-pipeline-without-clip", "edit", "a cat", "--model", "{pipe}", "--image", "{png}", *_OUT,
         names=["--clip"]),
    _cli("edit-pipeline-missing", "edit", "a cat", "--model", "{missing}", "--clip", "{clip}", "--image", "{png}",
         *_OUT, names=["{missing}"]),
    _cli("edit-pipeline-without-unet", "edit", "a cat", "--model", "{pipe_broken}", "--clip", "{clip}", "--image",
         "{png}", *_OUT, names=["{pipe_broken}"]),
    _cli("edit-pipeline-is-a-file", "edit", "a cat", "--model", "{file}", "--clip", "{clip}", "--image", "{png}",
         *_OUT, names=["{file}"]),
    _cli("edit-clip-missing", "edit", "a cat", "--model", "{pipe}", "--clip", "{missing}", "--image", "{png}", *_OUT,
         names=["{missing}"]),
    _cli("edit-clip-is-not-clip", "edit", "a cat", "--model", "{pipe}", "--clip", "{adir}", "--image", "{png}",
         *_OUT, names=["{adir}"]),
    _cli("edit-pipeline-float16-on-cpu", "edit", "a cat", *_P, "--image", "{png}", "--dtype", "float16", *_OUT,
         names=["float16"]),
    _cli("edit-pipeline-start-t-too-large", "edit", "a cat", *_P, "--image", "{png}", "--start-t", "5000", *_OUT,
         names=["start_t"]),
    _cli("edit-pipeline-empty-prompt", "edit", "", *_P, "--image", "{png}", *_OUT, names=["prompt"]),
    _cli("edit-pipeline-image-truncated", "edit", "a cat", *_P, "--image", "{trunc_png}", *_OUT, names=["{trunc_png}"]),
    _cli("style-without-reference", "style", "a cat", *_P, *_OUT, names=["--reference"]),
    _cli("style-reference-missing", "style", "a cat", *_P, "--reference", "{missing}.png", *_OUT,
         names=["{missing}.png"]),
    _cli("style-reference-truncated", "style", "a cat", *_P, "--reference", "{trunc_png}", *_OUT,
         names=["{trunc_png}"]),
    _cli("style-reference-not-a-picture", "style", "a cat", *_P, "--reference", "{txt_png}", *_OUT,
         names=["{txt_png}"]),
    _cli("style-layer-negative", "style", "a cat", *_P, "--reference", "{png}", "--layer", "-1", *_OUT,
         names=["--layer"]),
    _cli("style-layer-too-deep", "style", "a cat", *_P, "--reference", "{png}", "--layer", "99", *_OUT,
         names=["layer"]),
    _cli("style-seed-negative", "style", "a cat", *_P, "--reference", "{png}", "--seed", "-3", *_OUT, names=["--seed"]),
    _cli("style-without-model", "style", "a cat", "--clip", "{clip}", "--reference", "{png}", *_OUT, names=["--model"]),
    _cli("style-output-holds-files", "style", "a cat", *_P, "--reference", "{png}", "--output", "{full}",
         names=["{full}", "--overwrite"]),
    _cli("style-tau-is-not-an-option", "style", "a cat", *_P, "--reference", "{png}", "--tau", "1", *_OUT,
         names=["--tau"]),
    _cli("style-empty-prompt", "style", "", *_P, "--reference", "{png}", *_OUT, names=["prompt"]),
    _cli("aesthetic-without-head", "aesthetic", "a cat", *_P, *_OUT, names=["--head"]),
    _cli("aesthetic-head-missing", "aesthetic", "a cat", *_P, "--head", "{missing}.safetensors", *_OUT,
         names=["{missing}.safetensors"]),
    _cli("aesthetic-head-truncated", "aesthetic", "a cat", *_P, "--head", "{trunc_head}", *_OUT,
         names=["{trunc_head}"]),
    _cli("aesthetic-head-nan", "aesthetic", "a cat", *_P, "--head", "{nan_head}", *_OUT, names=["{nan_head}"]),
    _cli("aesthetic-head-two-outputs", "aesthetic", "a cat", *_P, "--head", "{wide_head}", *_OUT,
         names=["{wide_head}"]),
    _cli("aesthetic-image-not-a-picture", "aesthetic", "a cat", *_P, "--head", "{head}", "--image", "{txt_png}", *_OUT,
         names=["{txt_png}"]),
    _cli("aesthetic-lr-inf", "aesthetic", "a cat", *_P, "--head", "{head}", "--lr", "inf", *_OUT, names=["--lr"]),
    _cli("adversarial-without-classifier", "adversarial", "a cat", "--model", "{pipe}", *_OUT, names=["--classifier"]),
    _cli("adversarial-classifier-missing", "adversarial", "a cat", "--model", "{pipe}", "--classifier", "{missing}",
         *_OUT, names=["{missing}"]),
    _cli("adversarial-classifier-is-not-one", "adversarial", "a cat", "--model", "{pipe}", "--classifier", "{adir}",
         *_OUT, names=["{adir}"]),
    _cli("adversarial-target-out-of-range", "adversarial", "a cat", "--model", "{pipe}", "--classifier",
         "{classifier}", "--target", "99", *_OUT, names=["target"]),
    _cli("adversarial-target-negative", "adversarial", "a cat", "--model", "{pipe}", "--classifier", "{classifier}",
         "--target", "-1", *_OUT, names=["--target"]),
    _cli("adversarial-tau-0", "adversarial", "a cat", "--model", "{pipe}", "--classifier", "{classifier}", "--tau", "0",
         *_OUT, names=["--tau"]),
    _cli("adversarial-tau-minus-inf", "adversarial", "a cat", "--model", "{pipe}", "--classifier", "{classifier}",
         "--tau=-inf", *_OUT, names=["--tau"]),
    _cli("adversarial-optimizer-unknown", "adversarial", "a cat", "--model", "{pipe}", "--classifier", "{classifier}",
         "--optimizer", "lbfgs", *_OUT, names=["--optimizer"]),
    _cli("adversarial-step-rule-unknown", "adversarial", "a cat", "--model", "{pipe}", "--classifier", "{classifier}",
         "--step-rule", "big", *_OUT, names=["--step-rule"]),
    _cli("adversarial-start-t-too-large", "adversarial", "a cat", "--model", "{pipe}", "--classifier", "{classifier}",
         "--start-t", "99999", *_OUT, names=["start_t"]),
    _cli("adversarial-empty-prompt", "adversarial", "", "--model", "{pipe}", "--classifier", "{classifier}", *_OUT,
         names=["prompt"]),
    _cli("adversarial-iterations-fraction", "adversarial", "a cat", "--model", "{pipe}", "--classifier",
         "{classifier}", "--iterations", "1.5", *_OUT, names=["--iterations"]),
    # sdo train
    _cli("train-unet-steps-0", "train", "digits", "--unet-steps", "0", names=["--unet-steps"]),
    _cli("train-into-the-shipped-weights", "train", "digits", "--output", "{shipped}", names=["--replace-shipped"]),
    _cli("train-replace-shipped-and-output", "train", "digits", "--replace-shipped", "--output", "{new}",
         names=["--replace-shipped"]),
    _cli("train-output-holds-files", "train", "digits", "--output", "{full}", names=["{full}", "--overwrite"]),
    _cli("train-student-trajectories-negative", "train", "student", "--trajectories", "-1", names=["--trajectories"]),
    _cli("train-digit-clip-steps-word", "train", "digit-clip", "--steps", "x", names=["--steps"]),
    _cli("train-unknown-model", "train", "bogus", names=["bogus"]),
    _cli("train-seed-negative", "train", "digits", "--seed", "-1", names=["--seed"]),
    # sdo lora
    _cli("lora-scale-onto-its-source", "lora", "scale", "{lora}", "{lora}", "--alpha", "0", names=["{lora}", "source"]),
    _cli("lora-scale-inside-its-source", "lora", "scale", "{lora}", "{lora}/sub", "--alpha", "0", names=["source"]),
    _cli("lora-scale-onto-another-lora", "lora", "scale", "{lora}", "{lora2}", "--alpha", "1", names=["--force"]),
    _cli("lora-scale-alpha-nan", "lora", "scale", "{lora}", "{new}", "--alpha", "nan", names=["--alpha"]),
    _cli("lora-scale-alpha-inf", "lora", "scale", "{lora}", "{new}", "--alpha", "inf", names=["--alpha"]),
    _cli("lora-scale-without-alpha", "lora", "scale", "{lora}", "{new}", names=["--alpha"]),
    _cli("lora-scale-source-missing", "lora", "scale", "{missing}", "{new}", "--alpha", "1", names=["{missing}"]),
    _cli("lora-scale-source-nan", "lora", "scale", "{nan_lora}", "{new}", "--alpha", "1", names=["{nan_lora}"]),
    _cli("lora-scale-source-truncated", "lora", "scale", "{trunc_lora}", "{new}", "--alpha", "1",
         names=["{trunc_lora}"]),
    _cli("lora-scale-source-not-a-lora", "lora", "scale", "{full}", "{new}", "--alpha", "1", names=["{full}"]),
    _cli("lora-merge-weight-count", "lora", "merge", "{lora}", "{lora2}", "--weights", "1", "--output", "{new}",
         names=["weights"]),
    _cli("lora-merge-weight-word", "lora", "merge", "{lora}", "--weights", "1,x", "--output", "{new}",
         names=["--weights"]),
    _cli("lora-merge-weight-nan", "lora", "merge", "{lora}", "--weights", "nan", "--output", "{new}",
         names=["--weights"]),
    _cli("lora-merge-onto-a-source", "lora", "merge", "{lora}", "{lora2}", "--weights", "1,1", "--output", "{lora2}",
         names=["{lora2}", "source"]),
    _cli("lora-merge-onto-a-folder-with-files", "lora", "merge", "{lora}", "--weights", "1", "--output", "{full}",
         names=["--force"]),
    _cli("lora-merge-nan-source", "lora", "merge", "{lora}", "{nan_lora}", "--weights", "1,1", "--output", "{new}",
         names=["{nan_lora}"]),
    _cli("lora-unknown-action", "lora", "add", "{lora}", names=["add"]),
    # sdo finetune | shortft: the run folder
    _cli("finetune-without-output", "finetune", "--steps", "4", names=["output"]),
    _cli("shortft-few-step-missing", "shortft", "--model", "{pipe}", "--clip", "{clip}", "--prompts", "a cat",
         "--few-step", "{missing}", *_OUT, names=["{missing}"]),
    _cli("finetune-into-a-run", "finetune", "--output", "{run}", names=["{run}", "--resume"]),
    _cli("finetune-into-a-run-other-rank", "finetune", "--output", "{run}", "--rank", "8", names=["--resume"]),
    _cli("finetune-resume-other-rank", "finetune", "--output", "{run}", "--resume", "--rank", "8", names=["--rank"]),
    _cli("finetune-resume-other-lr", "finetune", "--output", "{run}", "--resume", "--lr", "0.5", names=["--lr"]),
    _cli("finetune-resume-no-clipping", "finetune", "--output", "{run}", "--resume", "--max-grad-norm", "none",
         names=["--max-grad-norm"]),
    _cli("finetune-resume-other-strategy", "finetune", "--output", "{run}", "--resume", "--strategy", "full",
         names=["--strategy"]),
    _cli("finetune-resume-nothing-there", "finetune", "--output", "{new}", "--resume",
         names=["--resume", "checkpoint"]),
    _cli("finetune-resume-corrupt-command", "finetune", "--output", "{bad_command_run}", "--resume", "--no-progress",
         names=["{bad_command_run}/command.json"]),
    _cli("finetune-output-is-a-file", "finetune", "--output", "{file}", names=["{file}"]),
    _cli("finetune-into-a-folder-with-files-of-a-run", "finetune", "--output", "{bad_command_run}",
         names=["--resume"]),
    # sdo finetune: options
    _cli("finetune-lr-inf", *_FT, "--lr", "inf", names=["lr"]),
    _cli("finetune-lr-nan", *_FT, "--lr", "nan", names=["lr"]),
    _cli("finetune-lr-0", *_FT, "--lr", "0", names=["lr"]),
    _cli("finetune-lr-negative", *_FT, "--lr=-1e-3", names=["lr"]),
    _cli("finetune-lr-huge", *_FT, "--lr", "1e9", names=["lr"]),
    _cli("finetune-lr-word", *_FT, "--lr", "fast", names=["--lr"]),
    _cli("finetune-betas-above-1", *_FT, "--betas", "1.5,0.9", names=["betas"]),
    _cli("finetune-betas-one", *_FT, "--betas", "0.9", names=["betas"]),
    _cli("finetune-betas-words", *_FT, "--betas", "a,b", names=["--betas"]),
    _cli("finetune-weight-decay-inf", *_FT, "--weight-decay", "inf", names=["weight_decay"]),
    _cli("finetune-weight-decay-negative", *_FT, "--weight-decay", "-1", names=["weight_decay"]),
    _cli("finetune-eval-scales-nan", *_FT, "--eval-scales", "nan", names=["eval_scales"]),
    _cli("finetune-eval-scales-negative", *_FT, "--eval-scales", "-1", names=["eval_scales"]),
    _cli("finetune-steps-fraction", *_FT, "--steps", "10.7", names=["--steps"]),
    _cli("finetune-steps-0", *_FT, "--steps", "0", names=["steps"]),
    _cli("finetune-lr-scheduler-typo", *_FT, "--lr-scheduler", "cosne", names=["--lr-scheduler"]),
    _cli("finetune-guidance-nan", *_FT, "--guidance-scale", "nan", names=["guidance_scale"]),
    _cli("finetune-guidance-negative", *_FT, "--guidance-scale", "-1", names=["guidance_scale"]),
    _cli("finetune-eta-2", *_FT, "--eta", "2", names=["eta"]),
    _cli("finetune-eta-nan", *_FT, "--eta", "nan", names=["eta"]),
    _cli("finetune-max-grad-norm-0", *_FT, "--max-grad-norm", "0", names=["max_grad_norm"]),
    _cli("finetune-max-grad-norm-inf", *_FT, "--max-grad-norm", "inf", names=["max_grad_norm"]),
    _cli("finetune-alpha-0", *_FT, "--alpha", "0", names=["alpha"]),
    _cli("finetune-time-budget-negative", *_FT, "--time-budget", "-5", names=["time_budget"]),
    _cli("finetune-rank-0", *_FT, "--rank", "0", names=["rank"]),
    _cli("finetune-batch-size-0", *_FT, "--batch-size", "0", names=["batch_size"]),
    _cli("finetune-keep-checkpoints-0", *_FT, "--keep-checkpoints", "0", names=["keep_checkpoints"]),
    _cli("finetune-sample-every-negative", *_FT, "--sample-every", "-1", names=["sample_every"]),
    _cli("finetune-seed-negative", *_FT, "--seed", "-1", names=["seed"]),
    _cli("finetune-guard-count-1", *_FT, "--guard-count", "1", names=["guard_count"]),
    _cli("finetune-warmup-with-constant-lr", *_FT, "--warmup", "5", names=["warmup"]),
    _cli("finetune-strategy-unknown", *_FT, "--strategy", "bogus", names=["strategy", "bogus"]),
    _cli("finetune-float16-on-cpu", *_FT, "--base-dtype", "float16", names=["float16"]),
    _cli("finetune-shortft-more-segments-than-steps", *_FT, "--strategy", "shortft", "--segments", "9",
         names=["segments"]),
    _cli("shortft-eta", "shortft", "--steps", "4", "--eta", "0.5", "--output", "{new}", names=["eta"]),
    _cli("shortft-other-strategy", "shortft", "--strategy", "sdo", "--output", "{new}", names=["shortft"]),
    _cli("finetune-tensorboard-value", *_FT, "--tensorboard=yes", names=["--tensorboard"]),
    # sdo ui (refused before a server starts)
    _cli("ui-port-too-large", "ui", "--port", "70000", names=["--port"]),
    _cli("ui-port-zero", "ui", "--port", "0", names=["--port"]),
    _cli("ui-output-holds-files", "ui", "--output", "{full}", names=["{full}", "--overwrite"]),
    _cli("ui-model-without-clip", "ui", "--model", "{pipe}", names=["--clip"]),
    _cli("ui-model-missing", "ui", "--model", "{missing}", "--clip", "{clip}", names=["{missing}"]),
    _cli("ui-classifier-without-model", "ui", "--classifier", "{classifier}", names=["--model"]),
    _cli("ui-classifier-missing", "ui", *_P, "--classifier", "{missing}", names=["{missing}"]),
    # sdo noise
    _cli("noise-reg-weight-without-regularizer", "noise", "--reg-weight", "0.1", *_OUT, names=["--reg-weight"]),
    _cli("noise-regularizer-unknown", "noise", "--regularizer", "kl", *_OUT, names=["--regularizer", "kl"]),
    _cli("noise-reward-unknown", "noise", "--reward", "pickscore", *_OUT, names=["pickscore"]),
    _cli("noise-reward-weight-nan", "noise", "--reward", "class:nan", *_OUT, names=["nan", "class"]),
    _cli("noise-target-12", "noise", "--target", "12", *_OUT, names=["--target"]),
    _cli("noise-digits-with-prompt", "noise", "--prompt", "a cat", *_OUT, names=["--prompt", "--model"]),
    _cli("noise-strategy-weights-only", "noise", "--strategy", "refl", *_OUT, names=["refl"]),
    _cli("noise-model-without-prompt", "noise", "--model", "{pipe}", "--clip", "{clip}", *_OUT, names=["--prompt"]),
    _cli("noise-model-missing", "noise", "--model", "{missing}", "--prompt", "a cat", *_OUT, names=["{missing}"]),
    _cli("noise-pipeline-pickscore-without-folder", "noise", "--model", "{pipe}", "--prompt", "a cat", *_OUT,
         names=["--pickscore"]),
    _cli("noise-pipeline-imagereward", "noise", "--model", "{pipe}", "--prompt", "a cat", "--reward", "imagereward",
         *_OUT, names=["ImageReward"]),
    # sdo finetune: the task
    _cli("finetune-target-12", *_FT, "--target", "12", names=["target"]),
    _cli("finetune-target-negative", *_FT, "--target", "-1", names=["target"]),
    _cli("finetune-labels-word", *_FT, "--labels", "3,x", names=["--labels"]),
    _cli("finetune-labels-out-of-range", *_FT, "--labels", "11", names=["labels"]),
    _cli("finetune-reward-unknown", *_FT, "--reward", "bogus", names=["reward"]),
    _cli("finetune-ink-weight-nan", *_FT, "--ink-weight", "nan", names=["ink_weight"]),
    _cli("finetune-digits-with-model", *_FT, "--task", "digits", "--model", "{pipe}", names=["--model"]),
    _cli("finetune-pipeline-without-model", *_FT, "--task", "pipeline", names=["model"]),
    _cli("finetune-pipeline-model-missing", *_FT, "--model", "{missing}", "--prompts", "a cat", "--clip", "{clip}",
         names=["{missing}"]),
    _cli("finetune-pipeline-clip-missing", *_FT, "--model", "{pipe}", "--prompts", "a cat", "--clip", "{missing}",
         names=["{missing}"]),
    _cli("finetune-pipeline-prompts-empty", *_FT, "--model", "{pipe}", "--prompts", "", "--clip", "{clip}",
         names=["prompts"]),
    _cli("finetune-pipeline-prompts-bars", *_FT, "--model", "{pipe}", "--prompts", " | ", "--clip", "{clip}",
         names=["prompts"]),
    _cli("finetune-pipeline-aesthetic-without-head", *_FT, "--model", "{pipe}", "--prompts", "a cat", "--clip",
         "{clip}", "--reward", "aesthetic", names=["--head"]),
    _cli("finetune-pipeline-head-missing", *_FT, "--model", "{pipe}", "--prompts", "a cat", "--clip", "{clip}",
         "--reward", "aesthetic", "--head", "{missing}", names=["{missing}"]),
    _cli("finetune-pipeline-reward-for-digits", *_FT, "--model", "{pipe}", "--prompts", "a cat", "--clip", "{clip}",
         "--reward", "class", names=["reward"]),
    _cli("finetune-reward-weight-word", *_FT, "--reward", "class:much", names=["much", "class"]),
    _cli("finetune-reward-weight-inf", *_FT, "--reward", "class:1,ink:inf", names=["inf", "ink"]),
    _cli("finetune-reward-twice", *_FT, "--reward", "ink,ink:2", names=["ink"]),
    _cli("finetune-pipeline-pickscore-without-folder", *_FT, "--model", "{pipe}", "--prompts", "a cat", "--reward",
         "pickscore", names=["--pickscore"]),
    _cli("finetune-pipeline-pickscore-missing", *_FT, "--model", "{pipe}", "--prompts", "a cat", "--reward",
         "pickscore", "--pickscore", "{missing}", names=["{missing}"]),
    _cli("finetune-pipeline-clip-reward-without-clip", *_FT, "--model", "{pipe}", "--prompts", "a cat", "--reward",
         "clip:1,aesthetic:0.1", "--head", "{head}", names=["--clip"]),
    _cli("finetune-judge-on-digits", *_FT, "--judge", "clip", names=["--judge"]),
    _cli("finetune-pipeline-judge-unknown", *_FT, "--model", "{pipe}", "--prompts", "a cat", "--clip", "{clip}",
         "--judge", "beauty", names=["beauty"]),
    _cli("finetune-pipeline-hpsv2", *_FT, "--model", "{pipe}", "--prompts", "a cat", "--reward", "hpsv2",
         names=["HPSv2.1", "hpsv2"]),
    _cli("finetune-pipeline-imagereward", *_FT, "--model", "{pipe}", "--prompts", "a cat", "--reward",
         "clip,imagereward:0.5", "--clip", "{clip}", names=["ImageReward", "image-reward"]),
    # sdo finetune: config files
    _cli("finetune-config-missing", *_FT, "--config", "{missing}.toml", names=["{missing}.toml"]),
    _cli("finetune-config-bad-toml", *_FT, "--config", "{cfg_bad_toml}", names=["{cfg_bad_toml}"]),
    _cli("finetune-config-bad-json", *_FT, "--config", "{cfg_bad_json}", names=["{cfg_bad_json}"]),
    _cli("finetune-config-a-list", *_FT, "--config", "{cfg_list_json}", names=["{cfg_list_json}"]),
    _cli("finetune-config-lr-text", *_FT, "--config", "{cfg_lr_text_toml}", names=["{cfg_lr_text_toml}", "lr"]),
    _cli("finetune-config-betas-number", *_FT, "--config", "{cfg_betas_toml}", names=["{cfg_betas_toml}", "betas"]),
    _cli("finetune-config-steps-fraction", "finetune", "--config", "{cfg_steps_json}", "--output", "{new}",
         names=["{cfg_steps_json}", "steps"]),
    _cli("finetune-config-unknown-key", *_FT, "--config", "{cfg_unknown_json}", names=["learning_rate"]),
    _cli("finetune-config-yaml", *_FT, "--config", "{cfg_run_yaml}", names=["{cfg_run_yaml}"]),
    _cli("finetune-config-tensorboard-text", *_FT, "--config", "{cfg_tensorboard_toml}",
         names=["{cfg_tensorboard_toml}", "tensorboard"]),
    _cli("finetune-config-target", *_FT, "--config", "{cfg_target_toml}", names=["{cfg_target_toml}", "target"]),
]


def _optimize(world, x=None, objective=None, **kwargs):
    import sdo

    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) if x is None else x
    options = {"iterations": 1, "progress": False, **kwargs}
    return sdo.optimize_latent(world.chain(), x, objective or (lambda x0: x0.mean()), **options)


def _nan_latent():
    x = torch.randn(1, 1, 16, 16)
    x[0, 0, 3, 3] = float("nan")
    return x


def _picard(world, x=None, **kwargs):
    import sdo

    return sdo.picard_sample(world.chain(), torch.randn(1, 1, 16, 16) if x is None else x, **kwargs)


def _config(**kwargs):
    import sdo

    return sdo.FinetuneConfig(**{"output": "unused-run-folder", **kwargs})


def _text(world, prompt, which="similarity"):
    from transformers import CLIPTokenizer

    from sdo.backbones.conditioning import encode_prompts
    from sdo.objectives.clip import CLIPTextSimilarity

    tokenizer = CLIPTokenizer.from_pretrained(world.paths["clip"])
    if which == "similarity":
        from transformers import CLIPModel

        return CLIPTextSimilarity(CLIPModel.from_pretrained(world.paths["clip"]), prompt, tokenizer)
    from transformers import CLIPTextModel

    return encode_prompts(CLIPTextModel.from_pretrained(world.paths["clip"]), tokenizer, prompt)


def _lora_into_unet(world, folder):
    import copy

    from sdo.finetuning.lora import load_lora

    return load_lora(copy.deepcopy(world.digits.unet), world.paths[folder])


def _read_lora(world, folder):
    from sdo.finetuning.lora_files import read_lora

    return read_lora(world.paths[folder])


def _head(world, name):
    from sdo.objectives.clip import AestheticScore

    return AestheticScore.load_head(world.paths[name])


def _image(world, name):
    from sdo.backbones import load_image

    return load_image(world.paths[name], 16)


def _pipeline(world, name, **kwargs):
    from sdo.backbones import load_pipeline

    return load_pipeline(world.paths[name], **kwargs)


def _step_at(world, t):
    from sdo.recipes.latent_tasks import step_at

    return step_at(world.chain(10), t)


def _solver(world, steps=None, **kwargs):
    import sdo

    return sdo.solver_from_scheduler(world.digits.scheduler, steps, **kwargs)


def _load_digits(device):
    from sdo.embedded import load_digits

    return load_digits(device)


def _strategy(name, **kwargs):
    import sdo

    return sdo.get_strategy(name, **kwargs)


def _edit_digits(world, image):
    from sdo.recipes.latent_tasks import edit_digits

    return edit_digits(image, "a thin one", iterations=1, steps=4, progress=False, models=world.digits)


def _batch_mismatch(world):
    import sdo

    d = world.digits
    chain = sdo.Chain.from_diffusers(d.unet, d.scheduler, 3, cond={"class_labels": torch.tensor([1, 2, 3])})
    return sdo.optimize_latent(chain, torch.randn(2, 1, 16, 16), lambda x0: x0.mean(), iterations=1, progress=False)


def _guided(world, scale):
    import sdo

    d = world.digits
    return sdo.Chain.from_diffusers(d.unet, d.scheduler, 3, cond={"class_labels": torch.tensor([3])},
                                    uncond={"class_labels": torch.tensor([10])}, guidance_scale=scale)


def _cross_entropy(x0):
    return torch.nn.functional.cross_entropy(x0.flatten(1), torch.zeros(x0.shape[0], dtype=torch.long))


CASES += [
    # optimize_latent
    _api("optimize-nan-latent", lambda w: _optimize(w, x=_nan_latent()), names=["latent", "non-finite"]),
    _api("optimize-inf-latent", lambda w: _optimize(w, x=torch.full((1, 1, 16, 16), float("inf"))),
         names=["latent", "non-finite"]),
    _api("optimize-objective-times-zero", lambda w: _optimize(w, objective=lambda x0: (0 * x0).sum()),
         names=["<lambda>", "zero"]),
    _api("optimize-objective-rounds", lambda w: _optimize(w, objective=lambda x0: x0.round().sum()),
         names=["<lambda>", "zero"]),
    _api("optimize-objective-detached", lambda w: _optimize(w, objective=lambda x0: x0.detach().sum()),
         names=["objective"]),
    _api("optimize-iterations-fraction", lambda w: _optimize(w, iterations=2.7), names=["iterations"]),
    _api("optimize-iterations-0", lambda w: _optimize(w, iterations=0), names=["iterations"]),
    _api("optimize-iterations-text", lambda w: _optimize(w, iterations="3"), names=["iterations"]),
    _api("optimize-lr-nan", lambda w: _optimize(w, lr=float("nan")), names=["lr"]),
    _api("optimize-lr-negative", lambda w: _optimize(w, lr=-0.1), names=["lr"]),
    _api("optimize-lr-inf", lambda w: _optimize(w, lr=float("inf")), names=["lr"]),
    _api("optimize-step-rule", lambda w: _optimize(w, step_rule="big"), names=["step_rule"]),
    _api("optimize-optimizer", lambda w: _optimize(w, optimizer="lbfgs"), names=["optimizer"]),
    _api("optimize-start-out-of-range", lambda w: _optimize(w, start=99), names=["start"]),
    _api("optimize-strategy-unknown", lambda w: _optimize(w, strategy="bogus"), names=["strategy", "bogus"]),
    _api("optimize-latent-15x15", lambda w: _optimize(w, x=torch.randn(1, 1, 15, 15)), names=["latent", "multiples"]),
    _api("optimize-latent-channels", lambda w: _optimize(w, x=torch.randn(1, 3, 16, 16)), names=["channels"]),
    _api("optimize-latent-float64", lambda w: _optimize(w, x=torch.randn(1, 1, 16, 16, dtype=torch.float64)),
         names=["dtype"]),
    _api("optimize-cond-batch-mismatch", _batch_mismatch, names=["class_labels", "batch"]),
    _api("optimize-picard-with-full", lambda w: _optimize(w, strategy="full", picard=True), names=["picard"]),
    _api("linf-ball-radius-0", lambda w: __import__("sdo").LinfBall(0), names=["radius"]),
    _api("linf-ball-radius-nan", lambda w: __import__("sdo").LinfBall(float("nan")), names=["radius"]),
    # chains and solvers
    _api("chain-steps-fraction", lambda w: w.chain(2.5), names=["num_inference_steps"]),
    _api("chain-steps-0", lambda w: w.chain(0), names=["num_inference_steps"]),
    _api("chain-steps-beyond-training", lambda w: w.chain(5000), names=["num_inference_steps"]),
    _api("chain-eta-nan", lambda w: w.chain(eta=float("nan")), names=["eta"]),
    _api("chain-eta-2", lambda w: w.chain(eta=2.0), names=["eta"]),
    _api("chain-eta-negative", lambda w: w.chain(eta=-0.5), names=["eta"]),
    _api("chain-guidance-nan", lambda w: _guided(w, float("nan")), names=["guidance_scale"]),
    _api("chain-guidance-without-uncond", lambda w: w.chain(guidance_scale=3.0), names=["uncond"]),
    _api("solver-steps-text", lambda w: _solver(w, "ten"), names=["num_inference_steps"]),
    _api("step-at-negative", lambda w: _step_at(w, -1), names=["start_t"]),
    _api("step-at-beyond-the-schedule", lambda w: _step_at(w, 5000), names=["start_t"]),
    _api("strategy-truncated-k-0", lambda w: _strategy("truncated", k=0), names=["k"]),
    _api("strategy-shortcut-at", lambda w: _strategy("sdo", at="middle"), names=["at"]),
    # picard_sample
    _api("picard-window-0", lambda w: _picard(w, window=0), names=["window"]),
    _api("picard-window-fraction", lambda w: _picard(w, window=1.5), names=["window"]),
    _api("picard-tol-nan", lambda w: _picard(w, tol=float("nan")), names=["tol"]),
    _api("picard-tol-negative", lambda w: _picard(w, tol=-1.0), names=["tol"]),
    _api("picard-max-sweeps-fraction", lambda w: _picard(w, max_sweeps=1.5), names=["max_sweeps"]),
    _api("picard-nan-latent", lambda w: _picard(w, x=_nan_latent()), names=["latent", "non-finite"]),
    # FinetuneConfig
    _api("config-lr-inf", lambda w: _config(lr=float("inf")), names=["lr"]),
    _api("config-lr-text", lambda w: _config(lr="0.1"), names=["lr"]),
    _api("config-betas-above-1", lambda w: _config(betas=(1.5, 0.9)), names=["betas"]),
    _api("config-betas-number", lambda w: _config(betas=0.9), names=["betas"]),
    _api("config-weight-decay-inf", lambda w: _config(weight_decay=float("inf")), names=["weight_decay"]),
    _api("config-eval-scales-nan", lambda w: _config(eval_scales=(float("nan"),)), names=["eval_scales"]),
    _api("config-steps-fraction", lambda w: _config(steps=10.7), names=["steps"]),
    _api("config-steps-bool", lambda w: _config(steps=True), names=["steps"]),
    _api("config-updates-text", lambda w: _config(updates="100"), names=["updates"]),
    _api("config-lr-scheduler-typo", lambda w: _config(lr_scheduler="cosne"), names=["lr_scheduler"]),
    _api("config-guidance-nan", lambda w: _config(guidance_scale=float("nan")), names=["guidance_scale"]),
    _api("config-regularizer-nan", lambda w: _config(regularizer=float("nan")), names=["regularizer"]),
    _api("config-output-none", lambda w: _config(output=None), names=["output"]),
    _api("config-target-modules-number", lambda w: _config(target_modules=3), names=["target_modules"]),
    _api("config-resume-text", lambda w: _config(resume="yes"), names=["resume"]),
    _api("config-eta-inf", lambda w: _config(eta=float("inf")), names=["eta"]),
    # models, files and devices
    _api("load-digits-on-missing-cuda", lambda w: _load_digits("cuda"), names=["cuda"]),
    _api("load-digits-on-unknown-device", lambda w: _load_digits("gpu0"), names=["gpu0"]),
    _api("load-image-truncated", lambda w: _image(w, "trunc_png"), names=["truncated.png"]),
    _api("load-image-not-a-picture", lambda w: _image(w, "txt_png"), names=["text.png"]),
    _api("load-pipeline-float16-on-cpu", lambda w: _pipeline(w, "pipe", dtype=torch.float16), names=["float16"]),
    _api("load-pipeline-without-unet", lambda w: _pipeline(w, "pipe_broken"), names=["pipe_broken"]),
    _api("load-lora-nan", lambda w: _lora_into_unet(w, "nan_lora"), names=["nan_lora", "non-finite"]),
    _api("read-lora-truncated", lambda w: _read_lora(w, "trunc_lora"), names=["trunc_lora"]),
    _api("load-head-nan", lambda w: _head(w, "nan_head"), names=["nan_head"]),
    _api("load-head-truncated", lambda w: _head(w, "trunc_head"), names=["trunc_head"]),
    # prompts
    _api("clip-similarity-empty-prompt", lambda w: _text(w, ""), names=["prompt", "empty"]),
    _api("encode-prompts-empty-prompt", lambda w: _text(w, " ", "encode"), names=["prompt", "empty"]),
    _api("encode-prompts-no-prompt", lambda w: _text(w, [], "encode"), names=["prompt"]),
    _api("clip-similarity-overlong-prompt", lambda w: _text(w, "a" * 10_000), names=["prompt", "tokens long"],
         warn=True),
    _api("encode-prompts-overlong-prompt", lambda w: _text(w, "b" * 10_000, "encode"), names=["prompt", "tokens long"],
         warn=True),
    _api("edit-digits-wrong-shape", lambda w: _edit_digits(w, torch.zeros(1, 3, 16, 16)), names=["shape"]),
]
