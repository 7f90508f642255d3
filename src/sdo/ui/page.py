"""The local web page (Gradio): :func:`build_app` lays it out; the work is done by the tab modules' handlers
(:mod:`sdo.ui.edit`, :mod:`sdo.ui.attack`, :mod:`sdo.ui.cost`, :mod:`sdo.ui.tune`), each run in a
:class:`~sdo.ui.jobs.Job` (or, for ``sdo bench`` and ``sdo finetune``, a :class:`~sdo.ui.jobs.CommandJob`) so that the
page streams its progress and a cancel stops it. Every run writes into a fresh folder of its own under the page's
output folder, so two browser tabs never share one."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from .. import report
from ..checks import UsageError
from ..finetuning.config import methods as tune_methods
from ..gradients import strategy_classes
from ..recipes.attack import METHODS as ATTACK_METHODS
from .attack import AttackRequest, check_attack, run_attack
from .cost import CostRequest, bench_command, denoiser_config, read_bench
from .edit import EditRequest, check_edit, digit_choices, run_edit
from .jobs import CommandJob, Job
from .tune import TuneRequest, read_run, tune_command

__all__ = ["build_app", "run_folder"]

# every method of the name table that gives a latent a gradient (what Edit and Cost can compare)
_STRATEGIES = [name for name, cls in strategy_classes().items() if cls.gives_latent_gradient]
_METRICS = ["strategy", "CLIP before", "CLIP after", "L1 to image", "ink before", "ink after", "label before",
            "label after", "seconds"]


def _fresh(root: Path, kind: str) -> Path:
    """The name of a fresh folder for one run: ``<root>/<kind>-<time>-<random>``."""
    return root / f"{kind}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def run_folder(root: Path, kind: str) -> Path:
    """A fresh folder for one run, created; never an existing one."""
    folder = _fresh(root, kind)
    folder.mkdir(parents=True)
    return folder


def _command(root: Path, folder: Path, args: list[str]) -> CommandJob:
    """``python -m sdo <args>``, which writes into ``folder`` (it creates it), its output in ``<folder>.log``."""
    root.mkdir(parents=True, exist_ok=True)
    return CommandJob(args, root / f"{folder.name}.log")


def _picture(images: torch.Tensor, scale: int | None = None) -> np.ndarray:
    """The first image of a batch in [-1, 1] as 8-bit pixels, enlarged ``scale`` times (default: to about 128
    pixels wide; digits are 16x16)."""
    scale = scale or max(1, 128 // images.shape[-1])
    x = ((images[0].detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return (x.expand(3, -1, -1) if x.shape[0] == 1 else x).permute(1, 2, 0).numpy()


def _row(name: str, m: dict) -> list:
    first = lambda v: v[0] if isinstance(v, list) else v
    def cell(key, digits=None):  # the digits' ink and labels are not measured on a pipeline's image
        if key not in m:
            return "-"
        return round(first(m[key]), digits) if digits is not None else first(m[key])

    return [name, cell("clip_similarity_before", 3), cell("clip_similarity_after", 3), cell("l1_to_image_after", 3),
            cell("ink_mass_before", 1), cell("ink_mass_after", 1), cell("label_before"), cell("label_after"),
            round(m["seconds"], 1)]


def _curves(points: list[dict]):
    """The loss of every strategy against the iteration, as a matplotlib figure."""
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    for name in dict.fromkeys(p["strategy"] for p in points):
        mine = [p for p in points if p["strategy"] == name]
        ax.plot([p["iteration"] for p in mine], [p["loss"] for p in mine], label=name)
    ax.set(xlabel="iteration", ylabel="loss")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _one_line(err: BaseException | str) -> str:
    return "error: " + " ".join(str(err).split())


def _rewards(records: list[dict], title: str):
    """The reward of every update against the seconds spent, as a matplotlib figure."""
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    kept = [r for r in records if not r.get("skipped")]
    ax.plot([r["elapsed"] for r in kept], [r["reward_mean"] for r in kept])
    ax.set(xlabel="seconds of updates", ylabel="reward (mean over the batch)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _run_view(folder: Path) -> tuple:
    """(status, reward figure, latest sample grid, guard text) of a fine-tuning run folder."""
    run = read_run(folder)
    records = run["records"]
    guard = run["guard"]
    signal = ("no guard check yet" if guard is None else
              "guard: passed" if not guard.get("failed") else f"guard: FAILED ({'; '.join(guard['failed'])})")
    if run["summary"] is not None:
        status = f"done: {run['summary']['updates']} updates in {folder}"
        if run["summary"].get("keep"):
            status += f"; keep {run['summary']['keep']}"
    elif records:
        status = f"update {records[-1]['update']}: reward {records[-1]['reward_mean']:.3f}"
    else:
        status = "starting (loading the models)…"
    picture = run["final"] if run["summary"] is not None and run["final"] else run["samples"]
    return status, _rewards(records, folder.name), str(picture) if picture else None, signal


def build_app(output: Path, device: str = "cpu", model: str | None = None, clip: str | None = None,
              classifier: str | None = None):
    """The page: tabs Edit, Adversarial, Cost and Fine-tune, on the embedded digits. ``output``: the folder the runs
    write into. ``model`` and ``clip``: a local pipeline and CLIP folder, loaded once, and the page works on them:
    Edit edits an uploaded image (``sdo edit --model --clip``), Cost times the pipeline's denoiser (``sdo bench``
    on its config) and Fine-tune tunes it over prompts on the CLIP score (``sdo finetune --model --reward clip``).
    ``classifier``: with ``model``, an image classifier folder that Adversarial attacks the pipeline's generations
    against (``sdo adversarial --model --classifier``); without it Adversarial stays on the digits."""
    import functools

    output = Path(output)
    pipeline = attacked = None  # (pipe, clip, tokenizer); (pipe, image classifier)
    if model is not None:
        from .. import backbones

        pipeline = (backbones.load_pipeline(model, device), *backbones.load_clip(clip, device))
        if classifier is not None:
            attacked = (pipeline[0], backbones.ImageClassifier.from_folder(classifier, device))
    editing = functools.partial(run_edit, device=device, pipeline=pipeline)
    attacking_with = functools.partial(run_attack, device=device, pipeline=attacked)
    choices = digit_choices()

    def edit(digit, upload, prompt, strategies, iterations, lr, lam, start_t):
        req = EditRequest(prompt=prompt or "", strategies=list(strategies or []), digit=None if upload else digit,
                          image=upload or None, iterations=int(iterations), lr=float(lr), lam=float(lam),
                          start_t=int(start_t))
        try:
            check_edit(req, pipeline is not None)
        except (UsageError, OSError, TypeError, ValueError) as err:
            yield _one_line(err), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        folder = run_folder(output, "edit")
        points, pictures, rows = [], [], []
        with Job(editing, req, folder) as job:
            while True:
                finished = job.done
                for event in job.events(0.3 if not finished else 0.0):
                    if "iteration" in event:
                        points.append({k: event[k] for k in ("iteration", "loss", "strategy")})
                if finished:
                    break
                latest = points[-1] if points else None
                status = (f"running {latest['strategy']}: iteration {latest['iteration'] + 1} of {req.iterations}"
                          if latest else "inverting the digit…")
                yield status, _curves(points), gr.skip(), gr.skip(), gr.skip()
            if job.error is not None:
                yield _one_line(job.error), _curves(points), gr.skip(), gr.skip(), gr.skip()
                return
            for entry in job.result:
                if not pictures:
                    pictures.append((_picture(entry["before"]), "before"))
                pictures.append((_picture(entry["after"]), f"after: {entry['strategy']}"))
                rows.append(_row(entry["strategy"], entry))
            yield (f"done: {len(rows)} strategies in {folder}", _curves(points), pictures, rows,
                   str(folder) + ".zip")

    def tune(method, target, regularizer, seconds, lr, prompts, steps, batch):
        folder = _fresh(output, "finetune")
        try:
            task = ({"target": int(target)} if pipeline is None else
                    {"target": None, "prompts": prompts or "", "steps": int(steps), "batch_size": int(batch)})
            req = TuneRequest(method, regularizer=float(regularizer), seconds=float(seconds), lr=float(lr), **task)
            args = tune_command(req, folder, model, clip, device)
        except (UsageError, OSError, TypeError, ValueError) as err:
            yield _one_line(err), gr.skip(), gr.skip(), gr.skip()
            return
        with _command(output, folder, args) as job:
            while not job.done:
                job.wait(1.0)
                try:
                    yield _run_view(folder)
                except UsageError:  # the command has not written its first file yet
                    yield "starting (loading the models)…", gr.skip(), gr.skip(), gr.skip()
            if job.error is not None:
                yield _one_line(job.error), gr.skip(), gr.skip(), gr.skip()
                return
            yield _run_view(folder)

    def adversarial(methods, rule, samples, iterations, tau, prompt, attack_lr, steps):
        try:
            given = {} if attacked is None else {"prompt": prompt or "", "lr": float(attack_lr), "steps": int(steps)}
            req = AttackRequest(list(methods or []), rule, int(samples), iterations=int(iterations), tau=float(tau),
                                **given)
            check_attack(req, attacked is not None)
        except (UsageError, TypeError, ValueError) as err:
            yield _one_line(err), gr.skip(), gr.skip(), gr.skip()
            return
        folder = run_folder(output, "attack")
        points = []
        total = req.iterations * (req.samples if attacked is not None else 1)  # a pipeline's seeds, one after another
        with Job(attacking_with, req, folder) as job:
            while not job.done:
                for event in job.events(0.3):
                    if "iteration" in event:
                        points.append({"strategy": event["method"], "iteration": event["iteration"],
                                       "loss": event["loss"]})
                latest = points[-1] if points else None
                yield (f"attacking with {latest['strategy']}: iteration {latest['iteration'] + 1} of {total}"
                       if latest else "sampling…"), _curves(points), gr.skip(), gr.skip()
            if job.error is not None:
                yield _one_line(job.error), gr.skip(), gr.skip(), gr.skip()
                return
            rows = [[r["method"], r["rule"], r["lr"], f"{r['success']:.2f}",
                     f"[{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]", round(r["change"], 4), round(r["seconds"], 1)]
                    for r in job.result]
            yield (f"done: {len(rows)} methods on {req.samples} samples in {folder}", _curves(points),
                   str(folder / "samples.png"), rows)

    def cost(strategies, steps, sweep, batch):
        folder = _fresh(output, "cost")
        try:
            args = bench_command(CostRequest(list(strategies or []), int(steps), str(sweep), int(batch), model), folder,
                                 device)
        except (UsageError, TypeError, ValueError) as err:
            yield _one_line(err), gr.skip(), gr.skip()
            return
        with _command(output, folder, args) as job:
            while not job.done:
                job.wait(1.0)
                yield "measuring (sdo bench)…", gr.skip(), gr.skip()
            if job.error is not None:
                yield _one_line(job.error), gr.skip(), gr.skip()
                return
            found = read_bench(folder)
            yield f"done: {folder}", [str(p) for p in found["images"]], found["table"]

    def open_run(path):
        try:
            return _run_view(Path(str(path or "").strip()))
        except (UsageError, OSError) as err:
            return _one_line(err), gr.skip(), gr.skip(), gr.skip()

    with gr.Blocks(title="sdo") as app:
        where = ("the embedded digits models" if pipeline is None else
                 f"the pipeline `{model}` with CLIP `{clip}` (Edit: upload an image)" +
                 (f" and the classifier `{classifier}`" if attacked is not None else
                  "; Adversarial on the embedded digits (no --classifier)"))
        gr.Markdown("# sdo: backpropagation through diffusion sampling\nLocal and offline: " + where + ". Each run "
                    "writes a folder of its own under `" + str(output) + "`.")
        with gr.Tab("Edit", elem_id="tab-edit"):
            with gr.Row():
                with gr.Column(scale=1):
                    gallery = gr.Gallery([(_picture(choices[i : i + 1], 4), str(i)) for i in range(len(choices))],
                                         label="held-out digits (click one)", columns=8, height=260,
                                         elem_id="edit-gallery", allow_preview=False, visible=pipeline is None)
                    digit = gr.Number(3, label="held-out digit (0-296)", precision=0, elem_id="edit-digit",
                                      visible=pipeline is None)  # a pipeline edits an uploaded image
                    upload = gr.Image(type="filepath", label="or upload an image", elem_id="edit-upload", height=160)
                with gr.Column(scale=1):
                    prompt = gr.Textbox("a thick 8", label="the edit", elem_id="edit-prompt")
                    strategies = gr.CheckboxGroup(_STRATEGIES, value=["sdo", "full"], label="strategies (one after "
                                                  "another, from the same inverted latent)", elem_id="edit-strategies")
                    with gr.Row():
                        iterations = gr.Number(50, label="iterations", precision=0, elem_id="edit-iterations")
                        lr = gr.Number(0.01, label="lr", elem_id="edit-lr")
                        lam = gr.Number(0.5 if pipeline is None else 0.7, label="λ (fidelity)", elem_id="edit-lam")
                        start_t = gr.Number(600, label="start t", precision=0, elem_id="edit-start-t")
                    with gr.Row():
                        run = gr.Button("Run", variant="primary", elem_id="edit-run")
                        cancel = gr.Button("Cancel", elem_id="edit-cancel")
            status = gr.Markdown("", elem_id="edit-status")
            with gr.Row():
                curves = gr.Plot(_curves([]), label="loss per iteration", elem_id="edit-curves")
                images = gr.Gallery(label="before and after", columns=4, height=300, elem_id="edit-images")
            table = gr.Dataframe(headers=_METRICS, label="metrics", elem_id="edit-metrics", interactive=False)
            download = gr.File(label="the result folder (as sdo edit writes it)", elem_id="edit-download")
        with gr.Tab("Adversarial", elem_id="tab-attack"):
            on_pipeline = attacked is not None
            attack_prompt = gr.Textbox("a photo of a cat", label="prompt of the generations", visible=on_pipeline,
                                       elem_id="attack-prompt")
            with gr.Row():
                attack_methods = gr.CheckboxGroup(list(ATTACK_METHODS), value=["sdo", "full"], label="methods",
                                                  elem_id="attack-methods")
                rule = gr.Radio(["plain", "sign"], value="plain", elem_id="attack-rule",
                                label="step rule" + ("" if on_pipeline else " (each method at its tuned lr)"))
                samples = gr.Number(4 if on_pipeline else 8, label="samples (seeds)" if on_pipeline else "samples",
                                    precision=0, elem_id="attack-samples")
                attack_iterations = gr.Number(30, label="iterations", precision=0, elem_id="attack-iterations")
                tau = gr.Number(0.1, label="tau (L-inf radius on x_T)", elem_id="attack-tau")
                attack_lr = gr.Number(0.1, label="lr (every method)", visible=on_pipeline, elem_id="attack-lr")
                attack_steps = gr.Number(30, label="sampling steps", precision=0, visible=on_pipeline,
                                         elem_id="attack-steps")
            with gr.Row():
                attack_run = gr.Button("Attack", variant="primary", elem_id="attack-run")
                attack_cancel = gr.Button("Cancel", elem_id="attack-cancel")
            attack_status = gr.Markdown("", elem_id="attack-status")
            with gr.Row():
                attack_curves = gr.Plot(_curves([]), label="margin loss per iteration", elem_id="attack-curves")
                attack_images = gr.Image(type="filepath", label="originals; each method's samples and change x5",
                                         elem_id="attack-images")
            attack_table = gr.Dataframe(headers=["method", "rule", "lr", "success", "95% Wilson", "mean change",
                                                 "seconds"], label="success", elem_id="attack-table",
                                        interactive=False)
        with gr.Tab("Cost", elem_id="tab-cost"):
            if pipeline is not None:
                gr.Markdown(f"The denoiser of `{model}`, built from `{denoiser_config(model)}` with random weights "
                            "(`sdo bench --model` on that config): a gradient costs what it costs with the trained "
                            "weights. The objective is the mean square of x0, in latent space.")
            with gr.Row():
                cost_strategies = gr.CheckboxGroup(_STRATEGIES, value=["sdo", "full", "adjoint"],
                                                   label="strategies", elem_id="cost-strategies")
                cost_steps = gr.Number(20 if pipeline is None else 10, label="N (steps)", precision=0,
                                       elem_id="cost-steps")
                cost_sweep = gr.Textbox("5,10,20" if pipeline is None else "5,10", label="sweep over N",
                                        elem_id="cost-sweep")
                cost_batch = gr.Number(2 if pipeline is None else 1, label="batch", precision=0, elem_id="cost-batch")
            with gr.Row():
                cost_run = gr.Button("Measure", variant="primary", elem_id="cost-run")
                cost_cancel = gr.Button("Cancel", elem_id="cost-cancel")
            cost_status = gr.Markdown("", elem_id="cost-status")
            cost_images = gr.Gallery(label="time and memory of one latent gradient; the sweep over N", columns=3,
                                     object_fit="contain", height=380, elem_id="cost-images")
            cost_table = gr.Markdown("", elem_id="cost-table")
        with gr.Tab("Fine-tune", elem_id="tab-tune"):
            on_pipeline = pipeline is not None
            prompts = gr.Textbox("a photo of a cat|a watercolor of a lighthouse", visible=on_pipeline,
                                 label="prompts, separated by | (the reward: CLIP score, 100 cos, with --clip)",
                                 elem_id="tune-prompts")
            with gr.Row():
                method = gr.Dropdown(list(tune_methods()), value="sdo", label="method (--strategy)",
                                     elem_id="tune-method")
                target = gr.Number(3, label="target digit", precision=0, visible=not on_pipeline, elem_id="tune-target")
                regularizer = gr.Number(0 if on_pipeline else 30, label="DRaFT+ penalty weight",
                                        elem_id="tune-regularizer")
                seconds = gr.Number(120 if on_pipeline else 60, label="seconds of updates", elem_id="tune-seconds")
                tune_lr = gr.Number(1e-4 if on_pipeline else 3e-3, label="lr", elem_id="tune-lr")
                tune_steps = gr.Number(20, label="sampling steps", precision=0, visible=on_pipeline,
                                       elem_id="tune-steps")
                tune_batch = gr.Number(2, label="batch", precision=0, visible=on_pipeline, elem_id="tune-batch")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="tune-start")
                stop = gr.Button("Stop (keeps the checkpoint)", elem_id="tune-stop")
            with gr.Row():
                folder_box = gr.Textbox(label="or open an existing run folder", elem_id="tune-folder")
                open_button = gr.Button("Open", elem_id="tune-open")
            tune_status = gr.Markdown("", elem_id="tune-status")
            guard = gr.Markdown("", elem_id="tune-guard")
            with gr.Row():
                reward_plot = gr.Plot(label="reward", elem_id="tune-reward")
                grid = gr.Image(type="filepath", label="fixed-seed samples (the latest grid; final.png at the end)",
                                elem_id="tune-samples", height=320)
        def pick(event: gr.SelectData) -> int:
            return event.index

        gallery.select(pick, None, digit)
        started = run.click(edit, [digit, upload, prompt, strategies, iterations, lr, lam, start_t],
                            [status, curves, images, table, download])
        cancel.click(lambda: "cancelled", None, status, cancels=[started])
        attacking = attack_run.click(adversarial, [attack_methods, rule, samples, attack_iterations, tau,
                                                   attack_prompt, attack_lr, attack_steps],
                                     [attack_status, attack_curves, attack_images, attack_table])
        attack_cancel.click(lambda: "cancelled", None, attack_status, cancels=[attacking])
        measuring = cost_run.click(cost, [cost_strategies, cost_steps, cost_sweep, cost_batch],
                                   [cost_status, cost_images, cost_table])
        cost_cancel.click(lambda: "cancelled", None, cost_status, cancels=[measuring])
        training = start.click(tune, [method, target, regularizer, seconds, tune_lr, prompts, tune_steps, tune_batch],
                               [tune_status, reward_plot, grid, guard])
        stop.click(lambda: "stopped: the last update's checkpoint is kept", None, tune_status, cancels=[training])
        open_button.click(open_run, folder_box, [tune_status, reward_plot, grid, guard])
    return app
