"""The reward-hacking guard (sdo.finetuning.guard) on real digits, noise and a collapse; in a fine-tuning run: the
warning, the LoRA it keeps, stop_on_hacking, resume; and the error for a LoRA that gets no gradient."""

import json

import pytest
import torch
from test_finetune import SMALL, _task

from sdo.checks import UsageError
from sdo.embedded.digits import load_dataset
from sdo.finetuning import FinetuneConfig, finetune
from sdo.finetuning.guard import Guard, GuardLimits, diversity, drift
from sdo.finetuning.lora_files import read_lora


@pytest.fixture(scope="module")
def real():
    images, _ = load_dataset("test")
    return images[:32], images[32:64]


def test_signals_by_hand(real):
    base, other = real
    flat = base.flatten(1)
    pairs = [(flat[i] - flat[j]).pow(2).mean().sqrt() for i in range(32) for j in range(32) if i != j]
    assert diversity(base) == pytest.approx(float(torch.stack(pairs).mean()), rel=1e-5)
    assert drift(other, base) == pytest.approx(float((other - base).flatten(1).pow(2).mean(1).sqrt().mean()), rel=1e-6)
    assert diversity(base[:1]) == 0.0 and drift(base, base) == 0.0


def test_guard_passes_real_digits_and_fails_noise_and_collapse(digits, judge, real):
    base, other = real
    task = _task(digits, judge)
    guard = Guard(base, [digits.null_class] * 32, task.describe)
    assert guard.base_rejected is not None and guard.base_rejected <= 0.2
    check = guard.check(3, other)  # other real digits: as diverse, as far from the base as two base samples
    assert check.passed and check.update == 3, check
    assert 0.8 < check.diversity < 1.2 and 0.8 < check.drift < 1.3
    # salt-and-pepper noise, what hacked digits look like (ShortFT before the penalty fix: 3.4x the diversity)
    noise = torch.randint(0, 2, (32, 1, 16, 16), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    check = guard.check(4, noise)
    assert len(check.failed) == 3, check  # rejected, too diverse and too far
    assert check.rejected > 0.9 and check.diversity > 1.5 and check.drift > 1.5
    collapsed = guard.check(5, other[:1].expand(32, -1, -1, -1))
    assert collapsed.diversity == 0 and [f.split()[0] for f in collapsed.failed] == ["diversity"], collapsed
    strict = Guard(base, [digits.null_class] * 32, task.describe, GuardLimits(drift=0.5))
    assert [f.split()[0] for f in strict.check(6, other).failed] == ["samples"]  # moved 1x > 0.5x
    unjudged = Guard(base, [digits.null_class] * 32)  # a task without a judge: diversity and drift only
    assert unjudged.check(7, noise).rejected is None and len(unjudged.check(7, noise).failed) == 2


def test_guard_keeps_the_last_passing_lora_and_stops(digits, judge, tmp_path, capsys):
    """A learning rate that wrecks the samples: the guard warns, keeps the last LoRA that passed, and with
    stop_on_hacking stops after two failed checks in a row; summary.json and the result name the kept LoRA."""
    kw = dict(strategy="sdo", lr=0.3, max_grad_norm=None, guard_every=1, guard_count=16, checkpoint_every=1, **SMALL)
    assert FinetuneConfig(output=tmp_path).guard_patience == 2
    result = finetune(_task(digits, judge), FinetuneConfig(output=tmp_path / "go", updates=6, **kw))
    failed = [r["update"] for r in result.metrics if r["guard"]["failed"]]
    assert failed, "lr 0.3 should wreck the samples"
    assert "WARNING: reward hacking suspected" in capsys.readouterr().err
    passed = [r["update"] for r in result.metrics if not r["guard"]["failed"]]
    assert result.kept_update == max([0] + passed)  # every passing check becomes the LoRA to keep
    summary = json.loads((tmp_path / "go" / "summary.json").read_text())
    assert summary["guard"]["failed"] == failed and result.updates == 6
    if result.kept_update != 6:
        assert summary["keep"] == "kept/lora" and result.keep == tmp_path / "go" / "kept" / "lora"
        assert summary["kept"]["update"] == result.kept_update and "judge_rejected" in summary["kept"]["evaluation"]

    # stop_on_hacking, patience 2: the same run (the guard does not touch its random streams) stops at the second
    # failed check in a row, keeping the last LoRA that passed before it
    second = next(u for u in failed if u - 1 in failed)
    stop = finetune(_task(digits, judge),
                    FinetuneConfig(output=tmp_path / "stop", updates=6, stop_on_hacking=True, **kw))
    assert stop.stopped_on_hacking and stop.updates == second
    assert stop.kept_update == max([0] + [u for u in passed if u < second])
    assert stop.keep == tmp_path / "stop" / "kept" / "lora"
    kept, _ = read_lora(tmp_path / "stop" / "kept" / "lora")
    if stop.kept_update == 0:  # the LoRA before any update: B = 0, the base model
        assert all(float(v.abs().max()) == 0 for k, v in kept.items() if "lora_B" in k)
    else:  # the same weights as a run stopped there by its update count
        ref = finetune(_task(digits, judge), FinetuneConfig(output=tmp_path / "ref", updates=stop.kept_update,
                                                                  **{**kw, "guard_every": 0}))
        assert ref.keep is None
        mine, _ = read_lora(tmp_path / "ref" / "lora")
        for k in kept:
            torch.testing.assert_close(kept[k], mine[k])


def test_reward_without_gradient_to_the_lora_is_an_error(digits, judge, tmp_path):
    task = _task(digits, judge)
    task.reward = lambda images, conditions: (0 * images).flatten(1).sum(1)  # has a graph, its gradient is exactly 0
    with pytest.raises(UsageError, match="no gradient reached the trainable LoRA"):
        finetune(task, FinetuneConfig(output=tmp_path, updates=2, **SMALL))


def test_warmup_with_a_constant_schedule_is_an_error(tmp_path):
    """diffusers' "constant" schedule ignores num_warmup_steps: a warm-up that would silently do nothing."""
    with pytest.raises(ValueError, match="constant_with_warmup"):
        FinetuneConfig(output=tmp_path, warmup=10)
    assert FinetuneConfig(output=tmp_path, warmup=10, lr_scheduler="constant_with_warmup").warmup == 10
