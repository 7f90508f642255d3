"""The sdo command: a --quick demo writes every report file; bad input is a one-line error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdo.cli import main

REPORT_FILES = ["metrics.json", "index.html", "adversarial.png", "adversarial_loss.png", "style.png", "style_loss.png",
                "cost.png"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert main(["demo", "--quick", "--output", str(out), "--no-progress", "--seed", "1"]) == 0
    return out


def test_quick_demo_writes_every_report_file(quick_demo, capsys):
    for name in REPORT_FILES:
        assert (quick_demo / name).is_file() and (quick_demo / name).stat().st_size > 0, name
    html = (quick_demo / "index.html").read_text()
    assert all(name in html for name in REPORT_FILES if name.endswith(".png"))
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    from sdo.recipes.attack import METHODS, TUNED_LR, wilson

    adversarial = metrics["adversarial"]["strategies"]
    assert set(adversarial) == {f"{m}/plain" for m in METHODS}  # the paper's rule by default
    for key, row in adversarial.items():
        assert row["lr"] == TUNED_LR[(row["method"], row["rule"])] and row["n"] == 4
        assert row["success_rate"] == row["successes"] / row["n"]
        assert (row["wilson_low"], row["wilson_high"]) == pytest.approx(wilson(row["successes"], row["n"]))
        assert row["mean_abs_change"] > 0, key  # every attack moved its samples
    # the exact adjoint's gradient is Full's; the others' are not
    assert adversarial["adjoint/plain"]["gradient_cosine_to_full"] == pytest.approx(1.0, abs=1e-4)
    assert adversarial["adjoint/plain"]["gradient_norm_ratio_to_full"] == pytest.approx(1.0, abs=1e-3)
    assert adversarial["sdo/plain"]["gradient_cosine_to_full"] < 0.999
    style = metrics["style"]
    assert {"loss_before", "loss_after", "classifier_agreement_before", "classifier_agreement_after"} <= set(style)
    assert style["loss_after"] <= style["loss_before"]
    cost = metrics["cost"]["strategies"]
    assert {"sdo", "full", "checkpoint", "truncated", "random-truncated", "no-grad sampling"} == set(cost)
    for row in cost.values():  # the minimum of at least cost_repeats rounds, with its spread
        assert 0 < row["seconds"] <= row["median_seconds"] <= row["max_seconds"] and row["rounds"] >= 1
    nograd = cost["no-grad sampling"]
    assert nograd["below_floor"] == (nograd["seconds"] > cost["sdo"]["seconds"])  # never a silent sub-floor ratio


def test_quick_demo_is_deterministic(quick_demo, tmp_path):
    out = tmp_path / "again"
    assert main(["demo", "--quick", "--output", str(out), "--no-progress", "--seed", "1"]) == 0
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (quick_demo, out))
    assert first["adversarial"]["strategies"]["full/plain"]["gradient_cosine_to_full"] == pytest.approx(1.0)
    for name, row in first["adversarial"]["strategies"].items():
        other = second["adversarial"]["strategies"][name]
        for key in ("successes", "mean_abs_change"):
            assert row[key] == other[key], (name, key)
    for key in ("loss_before", "loss_after", "classifier_agreement_after"):
        assert first["style"][key] == second["style"][key], key


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--steps", "-3"], "--steps: must be >= 1"),
        (["demo", "--tau", "0"], "--tau: must be a finite number > 0"),
        (["demo", "--tau", "nan"], "--tau: must be a finite number > 0"),
        (["demo", "--iterations", "many"], "expected a whole number"),
        (["demo", "--content-weight", "-1"], "--content-weight: must be a finite number >= 0"),
        (["demo", "--device", "cuda:7"], "CUDA is not available"),
        (["demo", "--device", "banana"], "not a torch device"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "digits", "--unet-steps", "0"], "--unet-steps: must be >= 1"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_output_that_is_a_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(SystemExit):
        main(["demo", "--output", str(path)])
    err = capsys.readouterr().err
    assert "exists and is not a folder" in err and len(err.strip().splitlines()) == 1


def test_train_never_replaces_the_shipped_weights_unasked(tmp_path, capsys, monkeypatch):
    """`sdo train` once wrote into the installed package's weights folder by default. Now: a fresh folder by default,
    the shipped folder only with --replace-shipped, a non-empty --output only with --overwrite; each refusal comes
    before any training and changes no file."""
    import argparse
    import hashlib

    from sdo.cli.train import train_output as _train_output
    from sdo.embedded import weights_dir

    shipped = Path(str(weights_dir()))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("keep me")

    def digest():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in (shipped, tmp_path)
                for p in sorted(root.rglob("*")) if p.is_file()}

    before = digest()
    for argv, message in [(["train", "student", "--output", str(shipped)], "pass --replace-shipped"),
                          (["train", "digits", "--output", str(tmp_path / "used")], "pass --overwrite"),
                          (["train", "digit-clip", "--output", str(tmp_path / "x"), "--replace-shipped"], "not both")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert digest() == before
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(model="digits", output=None, replace_shipped=False, overwrite=False)
    fresh = _train_output(args)
    assert fresh.name.startswith("sdo-train-digits-") and fresh.is_dir() and not any(fresh.iterdir())
    assert _train_output(argparse.Namespace(**{**vars(args), "replace_shipped": True})) == shipped
    assert _train_output(argparse.Namespace(**{**vars(args), "output": tmp_path / "used", "overwrite": True})) == (
        tmp_path / "used")


@pytest.mark.parametrize("argv", [["demo", "--quick"], ["bench", "--quick"], ["edit", "a thick 8", "--digit", "0"],
                                  ["train", "digit-clip", "--steps", "1"]])
def test_an_output_holding_files_is_refused_before_any_work(argv, tmp_path, capsys):
    """Into a folder holding an earlier run's files, a command once replaced them without a word: now it stops at
    once, names --overwrite, and every file is as it was."""
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}')
    (out / "before_after.png").write_bytes(b"not a png")
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert ((out / "metrics.json").read_text() == '{"mine": 1}'
            and (out / "before_after.png").read_bytes() == b"not a png")
    assert sorted(p.name for p in out.iterdir()) == ["before_after.png", "metrics.json"]


def test_help_and_module_entry_point(capsys):
    out = subprocess.run([sys.executable, "-m", "sdo", "demo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--quick" in out and "--tau" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "digits", "--help"])
    assert exit_info.value.code == 0 and "--unet-steps" in capsys.readouterr().out


def test_bench_writes_its_report_with_the_counted_costs(tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--no-params", "--strategies", "full,sdo,adjoint,reversible", "--sweep", "2,3",
            "--depths", "1,3", "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    for name in ("bench.json", "bench.md", "index.html", "cost.png", "sweep_time.png", "sweep_memory.png", "depth.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "bench.json").read_text())
    main_rows, n = results["main"], 5
    assert (main_rows["sdo"]["forward"], main_rows["sdo"]["backward"]) == (n, 1)
    assert (main_rows["full"]["forward"], main_rows["full"]["backward"]) == (n, n)
    assert (main_rows["adjoint"]["forward"], main_rows["reversible"]["forward"]) == (2 * n + 1, 4 * n)
    for row in main_rows.values():  # every ratio is the row's own time over SDO's
        assert row["time_vs_sdo"] == pytest.approx(row["seconds"] / main_rows["sdo"]["seconds"])
    assert main_rows["full"]["saved_mb"] > main_rows["sdo"]["saved_mb"] > 0
    assert set(results["sweep"]) == {"2", "3"} and set(results["sweep"]["2"]) == {
        "nograd", "full", "sdo", "adjoint", "reversible"}
    assert set(results["fidelity"]) == {"sdo", "adjoint", "reversible"}
    assert 0 < results["fidelity"]["sdo"]["cosine"] < 0.999  # an approximation that points Full's way, not Full's
    assert results["depth"]["depths"] == [1, 3] and len(results["depth"]["norms"]["full"]) == 2
    assert "sdo_time / adjoint_time" in results["derived"]
    quality = results["quality"]
    assert set(quality) == {"plain", "guidance rho=0.05", "guidance rho=0.2", "guidance rho=0.05 r=3",
                            "sdo, 2 Adam steps lr 0.05"}
    assert quality["plain"]["mean_abs_change"] == 0
    assert quality["guidance rho=0.2"]["objective"] < quality["plain"]["objective"]
    assert (out / "quality.png").is_file()


def test_bench_times_a_conditional_unet_built_from_its_config(tmp_path):
    """The path an SD-1.5-sized UNet takes on a GPU (benchmarks/configs/sd15_unet.json), with a tiny config."""
    config = {
        "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "cross_attention_dim": 12,
        "attention_head_dim": 2, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(path), "--quick", "--strategies", "full,sdo,adjoint", "--sweep", "none",
            "--guidance-scales", "none", "--quality-iterations", "0", "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "bench.json").read_text())
    assert results["meta"]["latent_shape"] == [2, 4, 8, 8]
    assert results["main"]["adjoint+params"]["forward"] == 11
    assert results["fidelity"]["adjoint"]["cosine"] > 0.5
    assert "quality" not in results and results["sweep"] == {}


def test_sd15_config_is_a_valid_unet_config():
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    config = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/configs/sd15_unet.json").read_text())
    assert UNet2DConditionModel.extract_init_dict(config)[1] == {}  # every key is a constructor argument
    assert config["block_out_channels"] == [320, 640, 1280, 1280] and config["cross_attention_dim"] == 768


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--strategies", "sdo,bptt"], "unknown strategies"),
        (["bench", "--sweep", "10,x"], "comma-separated integers"),
        (["bench", "--steps", "0"], "must be >= 1"),
    ],
)
def test_bench_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_bench_needs_an_existing_config_and_sdo(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "missing.json"), "--output", str(tmp_path / "o")]) == 2
    assert "no such model config" in capsys.readouterr().err
    assert main(["bench", "--strategies", "full,adjoint", "--output", str(tmp_path / "o")]) == 2
    assert "keep 'sdo'" in capsys.readouterr().err


def test_every_flag_of_every_command_has_help():
    import argparse

    from sdo.cli.app import build_parser as _build_parser

    bare = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                bare.append(" ".join([*path, *(action.option_strings or [action.dest])]))

    walk(_build_parser(), ["sdo"])
    assert not bare


def test_finetune_help_states_the_config_defaults():
    """Each `sdo finetune` flag's "(default X)" is the FinetuneConfig default, and the learning-rate schedules
    are diffusers' (spelled out so that parsing imports no torch)."""
    import dataclasses

    from diffusers.optimization import SchedulerType

    from sdo.cli import finetune as cli_finetune
    from sdo.finetuning import FinetuneConfig

    assert cli_finetune._LR_SCHEDULERS == tuple(kind.value for kind in SchedulerType)
    for field in dataclasses.fields(FinetuneConfig):
        help_text = cli_finetune._HELP.get(field.name)
        if help_text is None or isinstance(field.default, bool):
            continue
        value = field.default
        shown = ("none" if value is None else ",".join(f"{v:g}" if isinstance(v, float) else v for v in value)
                 if isinstance(value, (tuple, type(None))) else f"{value:g}" if isinstance(value, float) else value)
        assert f"(default {shown})" in help_text, (field.name, help_text)


def test_a_users_mistake_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from sdo.checks import UsageError
    from sdo.cli import app as cli

    def mistake(args):
        raise UsageError("--steps must be\n a whole number")

    def bug(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "_demo", mistake)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == "sdo demo: error: --steps must be a whole number\n"
    monkeypatch.setattr(cli, "_demo", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["demo"])
    monkeypatch.setattr(cli, "_demo", lambda args: Path("/nonexistent/folder/file").read_text())  # an OSError
    assert main(["demo"]) == 2
    assert "/nonexistent/folder/file" in capsys.readouterr().err
