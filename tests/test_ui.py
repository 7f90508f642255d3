"""sdo ui's handlers without a browser: the Edit tab's run writes what `sdo edit` writes (the same metrics), refuses
bad input with the command line's messages before any work, stops when cancelled, and two runs at once keep to their
own folders."""

import json
import signal
import threading
import time

import pytest

import sdo
from sdo.cli import main
from sdo.ui import EditRequest, Job, check_edit, run_edit
from sdo.ui.page import run_folder


def _metrics(folder):
    m = json.loads((folder / "metrics.json").read_text())
    m.pop("seconds")
    m.pop("settings")
    return m


def test_edit_writes_what_sdo_edit_writes(tmp_path):
    """Two strategies from the same held-out digit; each folder's metrics (the losses, the CLIP scores, ink, labels)
    equal `sdo edit --digit 3 --strategy NAME`'s, and the run is zipped."""
    events = []
    out = run_folder(tmp_path / "ui", "edit")
    finished = run_edit(EditRequest("a thick 8", ["sdo", "full"], digit=3, iterations=3), out, report=events.append)
    assert [f["strategy"] for f in finished] == ["sdo", "full"]
    assert [e["iteration"] for e in events if e.get("strategy") == "sdo" and "iteration" in e] == [0, 1, 2]
    assert (out.parent / f"{out.name}.zip").is_file()
    for name in ("sdo", "full"):
        assert main(["edit", "a thick 8", "--digit", "3", "--strategy", name, "--iterations", "3", "--no-progress",
                     "--output", str(tmp_path / f"cli-{name}")]) == 0
        assert _metrics(out / name) == _metrics(tmp_path / f"cli-{name}")
        assert {p.name for p in (out / name).iterdir()} == {"before_after.png", "loss.png", "metrics.json"}


@pytest.mark.parametrize(("change", "message"), [
    ({"prompt": " "}, "prompt"), ({"strategies": []}, "at least one strategy"), ({"strategies": ["bogus"]}, "bogus"),
    ({"strategies": ["refl"]}, "gives no gradient to the latent"), ({"iterations": 0}, "iterations"),
    ({"lr": -1.0}, "lr"), ({"digit": 400}, "digit"), ({"digit": None}, "pick a held-out digit"),
    ({"start_t": 1000}, "start_t"), ({"image": "/nonexistent.png"}, "/nonexistent.png"),
])
def test_bad_input_is_refused_before_any_work(change, message, tmp_path):
    req = EditRequest(**{"prompt": "a thick 8", "strategies": ["sdo"], **change})
    with pytest.raises((sdo.UsageError, FileNotFoundError), match=message):
        check_edit(req)
    with pytest.raises((sdo.UsageError, FileNotFoundError), match=message):
        run_edit(req, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cancel_stops_the_run_at_its_next_iteration(tmp_path):
    """A job cancelled after its second iteration ends within one more, runs no later strategy, writes no zip."""
    seen = threading.Event()

    def watch(event):
        if event.get("iteration") == 1:
            seen.set()

    out = tmp_path / "run"
    job = Job(lambda req, out, report, stop: run_edit(req, out, lambda e: (report(e), watch(e)), stop),
              EditRequest("a thick 8", ["sdo", "full"], iterations=500), out)
    assert seen.wait(120)
    job.cancel()
    assert job.done and job.error is None
    iterations = [e["iteration"] for e in job.events(0) if "iteration" in e]
    assert max(iterations) <= 3 and job.result == []
    assert not (tmp_path / "run.zip").exists() and not (out / "full").exists()


def test_two_runs_at_once_keep_to_their_own_folders(tmp_path):
    a, b = run_folder(tmp_path, "edit"), run_folder(tmp_path, "edit")
    assert a != b
    jobs = [Job(run_edit, EditRequest(prompt, ["sdo"], digit=digit, iterations=2), folder)
            for prompt, digit, folder in (("a thick 8", 3, a), ("a slanted 4", 7, b))]
    assert all(job.wait(300) and job.error is None for job in jobs)
    assert json.loads((a / "sdo" / "metrics.json").read_text())["prompt"] == "a thick 8"
    assert json.loads((b / "sdo" / "metrics.json").read_text())["settings"]["digit"] == 7


def test_tune_command_checks_its_options_before_any_work(tmp_path):
    from sdo.ui.tune import TuneRequest, tune_command

    args = tune_command(TuneRequest("drtune", 7, 10.0, 30.0, 1e-3), tmp_path / "run")
    assert args[:2] == ["finetune", "--output"] and args[args.index("--strategy") + 1] == "drtune"
    assert args[args.index("--checkpoint-every") + 1] == "1"  # stopping keeps the last update
    for req, message in ((TuneRequest("bogus"), "bogus"), (TuneRequest(target=12), "target"),
                         (TuneRequest(regularizer=-1.0), "regularizer"), (TuneRequest(seconds=0.0), "time_budget"),
                         (TuneRequest(lr=0.0), "lr")):
        with pytest.raises(sdo.UsageError, match=message):
            tune_command(req, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_a_stopped_training_keeps_its_checkpoint_and_resumes(tmp_path):
    """`sdo finetune` run by the page's CommandJob, interrupted after its second update as Ctrl-C does, even from a
    page that ignores Ctrl-C itself (started in the background): the process ends, the checkpoint of its last
    update is on disk, read_run reads the folder, and `--resume` continues it."""
    from sdo.ui.jobs import CommandJob
    from sdo.ui.tune import TuneRequest, read_run, tune_command

    folder = tmp_path / "run"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a page started in the background (`sdo ui &`)
    try:
        job = CommandJob([*tune_command(TuneRequest(seconds=600.0, sample_every=1), folder), "--steps", "10"],
                         tmp_path / "run.log")
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 180
    while not (folder / "metrics.jsonl").is_file() or len(read_run(folder)["records"]) < 2:
        assert not job.done, (tmp_path / "run.log").read_text()[-2000:]
        assert time.monotonic() < deadline
        job.wait(0.5)
    job.cancel()
    assert job.done and job.error is None and job.returncode == 130  # interrupted as Ctrl-C does, not killed
    run = read_run(folder)
    assert run["checkpoint"] and run["summary"] is None and run["samples"] is not None
    updates = len(run["records"])
    assert main(["finetune", "--output", str(folder), "--resume", "--time-budget", "600", "--updates",
                 str(updates + 1), "--no-progress"]) == 0
    assert read_run(folder)["summary"]["updates"] == updates + 1


def test_read_run_refuses_a_folder_that_is_not_a_run(tmp_path):
    """A missing folder and one that holds no run are refused; a run's partial last record is not read."""
    from sdo.ui.tune import read_run

    with pytest.raises(sdo.UsageError, match="no such run folder"):
        read_run(tmp_path / "missing")
    with pytest.raises(sdo.UsageError, match="holds no sdo finetune run"):
        read_run(tmp_path)
    # a run being written: the last line is not complete yet, and is left for the next read
    (tmp_path / "metrics.jsonl").write_text('{"update": 1, "reward_mean": 0.5}\n{"update": 2, "rew')
    with pytest.warns(UserWarning, match="line 2: dropped a partial record"):
        assert [r["update"] for r in read_run(tmp_path)["records"]] == [1]


def test_attack_rows_match_the_recipe_and_cancel_skips_the_rest(tmp_path):
    """The Adversarial tab's run: each method at its tuned lr with the recipe's own success and interval; a stop
    during the first method ends it and runs no other (nothing written)."""
    from sdo.recipes.attack import TUNED_LR, attack, correct_samples
    from sdo.ui.attack import AttackRequest, check_attack, run_attack
    from sdo.ui.edit import embedded_models

    req = AttackRequest(["sdo", "full"], samples=3, steps=8, iterations=3)
    rows = run_attack(req, tmp_path / "a")
    models = embedded_models()[0]
    labels, x_T, originals = correct_samples(models, 3, 8, 0)
    for row in rows:
        run = attack(models, labels, x_T, originals, row["method"], "plain", TUNED_LR[(row["method"], "plain")],
                     steps=8, iterations=3)
        assert row["success"] == run.rate and row["interval"] == list(run.interval())
    assert json.loads((tmp_path / "a" / "results.json").read_text())["results"][1]["method"] == "full"
    stop = threading.Event()
    cut = run_attack(req, tmp_path / "b", report=lambda e: stop.set() if e.get("iteration") == 1 else None, stop=stop)
    assert cut == [] and not (tmp_path / "b").exists()
    for bad, message in ((AttackRequest([]), "at least one"), (AttackRequest(["drtune"]), "drtune"),
                         (AttackRequest(rule="pgd"), "rule"), (AttackRequest(tau=0.0), "tau"),
                         (AttackRequest(samples=0), "samples")):
        with pytest.raises(sdo.UsageError, match=message):
            check_attack(bad)


def test_cost_command_is_sdo_bench_and_its_folder_is_read(tmp_path):
    from sdo.ui.cost import CostRequest, bench_command, read_bench

    args = bench_command(CostRequest(["sdo", "full"], steps=4, sweep="2,4", batch=1), tmp_path / "b")
    assert main(args) == 0
    found = read_bench(tmp_path / "b")
    assert [p.name for p in found["images"]] == ["cost.png", "sweep_time.png", "sweep_memory.png"]
    assert "x sdo" in found["table"]
    with pytest.raises(SystemExit) as exit_:  # argparse's own answer: usage and one error line, exit code 2
        main(bench_command(CostRequest(["sdo"], sweep="2,x"), tmp_path / "c"))
    assert exit_.value.code == 2


def test_edit_on_a_pipeline_writes_what_sdo_edit_model_writes(pipeline_folder, clip, tokenizer, tmp_path):
    """`sdo ui --model --clip`: the Edit tab edits an uploaded image with the pipeline; its folder's metrics equal
    `sdo edit --model --clip --image`'s; without an image it says to upload one."""
    import numpy as np
    from PIL import Image

    from sdo import backbones

    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(picture)
    pipeline = (backbones.load_pipeline(pipeline_folder), *backbones.load_clip(tmp_path / "clip"))
    req = EditRequest("a red square", ["sdo"], image=str(picture), iterations=2, lam=0.7, steps=10)
    out = run_folder(tmp_path / "ui", "edit")
    run_edit(req, out, pipeline=pipeline)
    assert main(["edit", "a red square", "--model", str(pipeline_folder), "--clip", str(tmp_path / "clip"), "--image",
                 str(picture), "--strategy", "sdo", "--iterations", "2", "--steps", "10", "--no-progress",
                 "--output", str(tmp_path / "cli")]) == 0
    assert _metrics(out / "sdo") == _metrics(tmp_path / "cli")
    with pytest.raises(sdo.UsageError, match="needs an image: upload one"):
        check_edit(EditRequest("a red square"), pipeline=True)


def test_attack_on_a_pipeline_writes_what_sdo_adversarial_writes(pipeline_folder, classifier_folder, tmp_path):
    """`sdo ui --model --classifier`: the Adversarial tab runs `sdo adversarial` on each seed's generation, per method
    at one lr; each seed's folder has the command's metrics, and the row's success is over the seeds with its Wilson
    interval. A pipeline attack needs a prompt; the digits attack takes none."""
    from sdo import backbones
    from sdo.recipes.attack import wilson
    from sdo.ui.attack import AttackRequest, check_attack, run_attack

    pipeline = (backbones.load_pipeline(pipeline_folder), backbones.ImageClassifier.from_folder(classifier_folder))
    req = AttackRequest(["sdo", "full"], samples=2, steps=3, iterations=2, prompt="a red square", lr=0.1)
    events = []
    rows = run_attack(req, tmp_path / "ui", report=events.append, pipeline=pipeline)
    assert [r["method"] for r in rows] == ["sdo", "full"]
    assert [e["iteration"] for e in events if e.get("method") == "sdo" and "iteration" in e] == [0, 1, 2, 3]
    for seed in (0, 1):
        assert main(["adversarial", "a red square", "--model", str(pipeline_folder), "--classifier",
                     str(classifier_folder), "--strategy", "full", "--steps", "3", "--iterations", "2", "--seed",
                     str(seed), "--no-progress", "--output", str(tmp_path / f"cli-{seed}")]) == 0
        assert _metrics(tmp_path / "ui" / "full" / f"seed-{seed}") == _metrics(tmp_path / f"cli-{seed}")
    for row in rows:
        success = [json.loads((tmp_path / "ui" / row["method"] / f"seed-{s}" / "metrics.json").read_text())
                   ["success"][0] for s in (0, 1)]
        assert row["success"] == sum(success) / 2 and row["interval"] == list(wilson(sum(success), 2))
        assert row["reported"].shape[0] == 2 and row["lr"] == 0.1
    assert (tmp_path / "ui" / "samples.png").is_file()
    assert json.loads((tmp_path / "ui" / "results.json").read_text())["request"]["prompt"] == "a red square"
    with pytest.raises(sdo.UsageError, match="prompt is empty"):
        check_attack(AttackRequest(prompt=" "), pipeline=True)
    with pytest.raises(sdo.UsageError, match="lr must be"):
        check_attack(AttackRequest(prompt="a cat", lr=-1.0), pipeline=True)
    with pytest.raises(sdo.UsageError, match="no prompt or lr"):
        check_attack(AttackRequest(prompt="a cat"))


def test_cost_on_a_pipeline_times_its_denoiser(pipeline_folder, tmp_path):
    """`sdo ui --model`: the Cost tab runs `sdo bench` on the pipeline denoiser's config (random weights, the same
    architecture); a folder that is not a pipeline is refused before any work."""
    from sdo.ui.cost import CostRequest, bench_command, denoiser_config, read_bench

    args = bench_command(CostRequest(["sdo", "full"], steps=3, sweep="2,3", batch=1, model=str(pipeline_folder)),
                         tmp_path / "b")
    assert args[1:3] == ["--model", str(pipeline_folder / "unet" / "config.json")]
    assert main(args) == 0
    found = read_bench(tmp_path / "b")
    assert "x sdo" in found["table"] and "UNet2DConditionModel" in found["table"]
    assert len(found["images"]) == 3
    with pytest.raises(sdo.UsageError, match="neither unet/config.json nor transformer/config.json"):
        denoiser_config(tmp_path)
    (tmp_path / "sd3" / "transformer").mkdir(parents=True)  # SD3, PixArt and FLUX folders hold a transformer
    (tmp_path / "sd3" / "transformer" / "config.json").write_text("{}")
    assert denoiser_config(tmp_path / "sd3") == tmp_path / "sd3" / "transformer" / "config.json"


def test_tune_on_a_pipeline_runs_sdo_finetune_over_prompts(pipeline_folder, clip, tokenizer, tmp_path):
    """`sdo ui --model --clip`: the Fine-tune tab runs `sdo finetune --model --prompts --reward clip`; its folder
    holds the reward curve, the sample grids, the guard's checks and the final evaluation; bad prompts are refused
    before any work."""
    from sdo.ui.tune import TuneRequest, read_run, tune_command

    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    req = TuneRequest("sdo", None, 0.0, 1.0, 1e-4, sample_every=1, prompts=" a red square | a blue circle",
                      steps=2, batch_size=2)
    args = tune_command(req, tmp_path / "run", str(pipeline_folder), str(tmp_path / "clip"))
    assert args[args.index("--prompts") + 1] == "a red square|a blue circle" and "--cpu" in args
    assert main([*args, "--guard-every", "1"]) == 0
    run = read_run(tmp_path / "run")
    assert run["records"] and run["summary"]["updates"] == len(run["records"])
    assert all(abs(r["reward_mean"]) <= 100 for r in run["records"])  # the CLIP score, 100 cos
    assert run["samples"] is not None and run["guard"] is not None and run["checkpoint"]
    assert set(run["summary"]["evaluation"]) == {"0", "1"}
    for prompts, message in (("a cat||a dog", "prompts is empty"), (None, "prompts must be a string")):
        with pytest.raises(sdo.UsageError, match=message):
            tune_command(TuneRequest(target=None, prompts=prompts), tmp_path / "x", str(pipeline_folder), "clip")
    with pytest.raises(sdo.UsageError, match="prompts are for a pipeline"):
        tune_command(TuneRequest(prompts="a cat"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_command_serves_the_page_on_this_machine_and_ctrl_c_stops_it(tmp_path):
    """`sdo ui` itself, as a user starts it: it says where the page is, serves its four tabs on 127.0.0.1 with
    analytics off and writes nothing into --output until a run does; Ctrl-C (SIGINT) ends it."""
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "sdo", "ui", "--port", str(port), "--output",
                                str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"sdo ui: http://127.0.0.1:{port} (runs write into {tmp_path / 'runs'})"), line
        for _ in range(120):
            try:
                config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read())
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("the page never answered")
        assert config["title"] == "sdo" and config["analytics_enabled"] is False
        tabs = [c["props"]["label"] for c in config["components"] if c["type"] in ("tab", "tabitem")]
        assert tabs == ["Edit", "Adversarial", "Cost", "Fine-tune"], tabs
        assert not any((tmp_path / "runs").iterdir())
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    assert process.returncode == 0  # Gradio closes the server on Ctrl-C and the command returns
