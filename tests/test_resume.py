"""Nothing lost, nothing silent on resume (issue #17): a run killed mid-write (a partial last metrics line, a
truncated newest checkpoint) resumes from the previous kept checkpoint to the weights of an uninterrupted run; each
kind of bad checkpoint falls back with a warning naming the file; NaN is never written to a checkpoint; an update
that makes the weights non-finite stops the run with the last checkpoint intact."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file
from test_finetune import SMALL, _assert_same, _lora, _task

from sdo.checks import NonFiniteError, UsageError
from sdo.finetuning import FinetuneConfig, finetune
from sdo.finetuning.checkpoints import load_checkpoint, load_latest, save_checkpoint
from sdo.finetuning.results import read_metrics as _read_metrics


class _Killed(Exception):
    """Stands for a SIGKILL: the run stops where it is, leaving its files as they are."""


class _DiesAt:
    """The task's reward, until its ``call``-th call."""

    def __init__(self, reward, call):
        self.reward, self.call, self.calls = reward, call, 0

    def __call__(self, images, conditions):
        self.calls += 1
        if self.calls == self.call:
            raise _Killed
        return self.reward(images, conditions)


def _messages(caught) -> str:
    return "\n".join(str(w.message) for w in caught)


def test_killed_mid_write_resumes_to_the_same_weights(digits, judge, tmp_path):
    """Killed during update 7 of 8 (checkpoints every 2, two kept: steps 4 and 6), with what a kill while
    writing leaves: a half-written last line in metrics.jsonl and a truncated newest LoRA file. --resume falls back
    to step 4 with warnings naming both files, replays 5-8, and ends with an uninterrupted run's LoRA and one
    record per update."""
    updates = 8
    cfg = dict(updates=updates, checkpoint_every=2, keep_checkpoints=2, lr=0.01, **{**SMALL, "eval_count": 2})
    task = _task(digits, judge)
    task.reward = _DiesAt(task.reward, 7)
    with pytest.raises(_Killed):
        finetune(task, FinetuneConfig(output=tmp_path / "killed", **cfg))
    run, checkpoints = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000004", "step-0000006"]
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as log:
        log.write('{"update": 7, "reward_mean": -0.')
    lora = checkpoints / "step-0000006" / "lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:-100])

    with pytest.warns(UserWarning) as caught:
        finetune(_task(digits, judge), FinetuneConfig(output=run, resume=True, **cfg))
    said = _messages(caught)
    assert f"{lora}: unreadable" in said and f"resuming from {checkpoints / 'step-0000004'} instead" in said
    assert f"{metrics}, line 7: dropped a partial record" in said

    finetune(_task(digits, judge), FinetuneConfig(output=tmp_path / "whole", **cfg))
    _assert_same(_lora(run), _lora(tmp_path / "whole"), rtol=1e-5, atol=1e-7)
    assert [json.loads(line)["update"] for line in metrics.read_text().splitlines()] == list(range(1, updates + 1))
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000006", "step-0000008"]


def _two_checkpoints(root):
    for step in (1, 2):
        save_checkpoint(root, step, {"lora": {"w": torch.full((3,), float(step))}, "rng": {"s": torch.arange(3)}},
                        {"note": step})


def _write_nan(path):
    save_file({"w": torch.tensor([1.0, math.nan, 2.0])}, str(path / "lora.safetensors"))


@pytest.mark.parametrize("bad,damage,used", [
    ("latest.json", lambda root: (root / "latest.json").write_text('{"step": 2, "pa'), "step-0000002"),
    ("latest.json", lambda root: (root / "latest.json").write_text('{"step": 3, "path": "step-0000003"}'),
     "step-0000002"),
    ("step-0000002/meta.json", lambda root: (root / "step-0000002" / "meta.json").write_text('{"step": '),
     "step-0000001"),
    ("step-0000002/lora.safetensors",
     lambda root: (root / "step-0000002" / "lora.safetensors").write_bytes(b"\x10\x00\x00"), "step-0000001"),
    ("step-0000002/lora.safetensors", lambda root: (root / "step-0000002" / "lora.safetensors").unlink(),
     "step-0000001"),
    ("step-0000002/lora.safetensors", lambda root: _write_nan(root / "step-0000002"), "step-0000001"),
])
def test_a_bad_checkpoint_falls_back_with_a_warning(tmp_path, bad, damage, used):
    _two_checkpoints(tmp_path)
    assert load_latest(tmp_path)[0] == tmp_path / "step-0000002"
    damage(tmp_path)
    with pytest.warns(UserWarning) as caught:
        path, tensors, meta = load_latest(tmp_path)
    assert path == tmp_path / used and meta["step"] == int(used[5:])
    assert tensors["lora"]["w"].tolist() == [float(meta["step"])] * 3
    said = _messages(caught)
    assert str(tmp_path / bad) in said and f"resuming from {tmp_path / used} instead" in said
    assert "\n" not in said


def test_no_checkpoint_that_loads_is_a_usage_error(tmp_path):
    assert load_latest(tmp_path / "none") is None
    _two_checkpoints(tmp_path)
    (tmp_path / "step-0000002" / "meta.json").write_text("")
    _write_nan(tmp_path / "step-0000001")
    with pytest.raises(UsageError) as error:
        load_latest(tmp_path)
    message = str(error.value)
    assert "\n" not in message and f"no checkpoint in {tmp_path} loads" in message
    assert str(tmp_path / "step-0000002" / "meta.json") in message
    assert f"{tmp_path / 'step-0000001' / 'lora.safetensors'} tensor w holds 1 non-finite value(s)" in message


def test_save_checkpoint_refuses_nan(tmp_path):
    _two_checkpoints(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(NonFiniteError, match="step 3 .*: lora tensor w holds NaN or infinity"):
        save_checkpoint(tmp_path, 3, {"lora": {"w": torch.tensor([0.0, math.inf])}}, {})
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_update_that_makes_the_weights_non_finite_stops_before_saving(digits, judge, tmp_path, monkeypatch):
    """The third optimizer step overflows one LoRA weight to infinity (its gradient was finite); the run stops at
    update 3, before logging or saving it, and the checkpoint of update 2 is intact. (AdamW itself cannot get
    there with a finite lr: its step is at most about lr, so a huge lr makes the next loss NaN, the skipped-update
    path, and an lr / (1 - beta1^t) past float32's range is torch's own overflow error.)"""
    step, calls = torch.optim.AdamW.step, []

    def overflowing_third_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            self.param_groups[0]["params"][0].data.view(-1)[0] = math.inf
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_third_step)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"update 3 made the LoRA weights non-finite .* the last checkpoint "
                                             r"\(.*step-0000002\) is intact. Lower lr"):
        finetune(_task(digits, judge), FinetuneConfig(output=out, updates=6, checkpoint_every=2, **SMALL))
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000002"]
    tensors, _ = load_checkpoint(out / "checkpoints" / "step-0000002")  # checks every tensor is finite
    assert tensors["lora"] and all(torch.isfinite(v).all() for v in tensors["lora"].values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_metrics_partial_last_line_warns_and_a_bad_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"update": i, "reward_mean": 0.5}) for i in (1, 2, 3)]
    path.write_text("\n".join(records) + "\n\n")
    assert [r["update"] for r in _read_metrics(path, 2)] == [1, 2]
    path.write_text("\n".join(records) + '\n{"update": 4, "rew')
    with pytest.warns(UserWarning, match=f"{re.escape(str(path))}, line 4: dropped a partial record"):
        assert [r["update"] for r in _read_metrics(path, 10)] == [1, 2, 3]
    path.write_text("\n".join([records[0], '{"update": 2, "rew', records[2]]) + "\n")
    with pytest.raises(UsageError, match=f"{re.escape(str(path))}, line 2: not a JSON record"):
        _read_metrics(path, 10)
    path.write_text("\n".join([records[0], "[2]", records[2]]) + "\n")
    with pytest.raises(UsageError, match=f"{re.escape(str(path))}, line 2: not a metrics record"):
        _read_metrics(path, 10)
