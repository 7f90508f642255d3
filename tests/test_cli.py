"""The sdo command: a --quick demo writes every report file; bad input is a one-line error."""

import json
import subprocess
import sys

import pytest

from sdo.cli import main

REPORT_FILES = ["metrics.json", "index.html", "adversarial.png", "adversarial_loss.png", "style.png", "style_loss.png", "cost.png"]


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
    adversarial = metrics["adversarial"]["strategies"]
    assert set(adversarial) == {"sdo", "full", "truncated"}
    for row in adversarial.values():
        assert 0 <= row["success_rate"] <= 1 and row["mean_abs_change"] >= 0 and row["seconds"] > 0
        assert row["max_abs_latent_change"] <= metrics["config"]["tau"] + 1e-6
    style = metrics["style"]
    assert {"loss_before", "loss_after", "classifier_agreement_before", "classifier_agreement_after"} <= set(style)
    assert style["loss_after"] <= style["loss_before"]
    cost = metrics["cost"]["strategies"]
    assert {"sdo", "full", "checkpoint", "truncated", "random-truncated", "no-grad sampling"} == set(cost)
    assert cost["sdo"]["time_vs_sdo"] == pytest.approx(1.0)
    assert all(row["seconds"] > 0 and row["peak_mb"] >= 0 for row in cost.values())


def test_quick_demo_is_deterministic(quick_demo, tmp_path):
    out = tmp_path / "again"
    assert main(["demo", "--quick", "--output", str(out), "--no-progress", "--seed", "1"]) == 0
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (quick_demo, out))
    assert first["adversarial"]["strategies"]["full"]["gradient_cosine_to_full"] == pytest.approx(1.0)
    for name, row in first["adversarial"]["strategies"].items():
        other = second["adversarial"]["strategies"][name]
        for key in ("success_rate", "mean_abs_change", "best_loss", "max_abs_latent_change"):
            assert row[key] == other[key], (name, key)
    for key in ("loss_before", "loss_after", "classifier_agreement_after"):
        assert first["style"][key] == second["style"][key], key


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--steps", "-3"], "--steps: must be >= 1"),
        (["demo", "--tau", "0"], "--tau: must be a finite number > 0"),
        (["demo", "--tau", "nan"], "--tau: must be a finite number > 0"),
        (["demo", "--iterations", "many"], "expected a positive integer"),
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


def test_help_and_module_entry_point(capsys):
    out = subprocess.run([sys.executable, "-m", "sdo", "demo", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--quick" in out and "--tau" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "digits", "--help"])
    assert exit_info.value.code == 0 and "--unet-steps" in capsys.readouterr().out
