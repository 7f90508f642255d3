"""The adversarial experiment (sdo.recipes.attack): Wilson intervals against published values, success at a wall-clock
budget, and the attack on the embedded digits for every method (the reported sample is misread exactly when some
sample seen on the way was, since the margin loss is below 1 only for a misread sample)."""

import pytest

from sdo.recipes.attack import METHODS, AttackRun, attack, correct_samples, success_within, wilson


def test_wilson_interval_against_published_values():
    assert wilson(1, 8) == pytest.approx((0.0224, 0.4709), abs=1e-4)
    assert wilson(96, 100) == pytest.approx((0.9016, 0.9843), abs=1e-4)
    low, high = wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    with pytest.raises(ValueError, match="n must be"):
        wilson(0, 0)


def test_success_within_a_time_budget():
    # 4 iterations of 1 s each: rows are the samples seen after 0, 1, 2, 3 updates and the final one
    run = AttackRun("sdo", "plain", 0.1, success=[True, True, False],
                    misread=[[False, False, False], [False, False, False], [True, False, False],
                             [True, False, False], [True, True, False]], change=0.0, seconds=4.0)
    assert success_within(run, 0.5) == 0  # only the original samples
    assert success_within(run, 2.0) == pytest.approx(1 / 3)  # two updates done
    assert success_within(run, 4.0) == pytest.approx(2 / 3) == run.rate
    assert run.interval() == wilson(2, 3)


@pytest.fixture(scope="module")
def samples(digits):
    return correct_samples(digits, 3, steps=6, seed=0)


def test_correct_samples_are_read_correctly(digits, samples):
    labels, x_T, originals = samples
    assert labels.tolist() == sorted(set(labels.tolist())) and labels.max() < 10  # the first ones of 0, 1, 2, ...
    assert (digits.classifier(originals.clamp(-1, 1)).argmax(1) == labels).all()
    assert x_T.shape == (3, 1, 16, 16)


@pytest.mark.parametrize("method", list(METHODS))
def test_attack_reports_what_it_saw(digits, samples, method):
    run, reported = attack(digits, *samples, method, "sign", 0.05, steps=6, iterations=3, tau=0.1,
                           return_samples=True)
    assert len(run.misread) == 4 and len(run.losses) == 3 and run.seconds > 0
    if method != "reversible":  # EDICT samples its own coupled chain, which may read differently from the start
        assert not any(run.misread[0])  # the originals are read correctly
    read = digits.classifier(reported).argmax(1)
    assert run.success == (read != samples[0]).tolist()
    assert run.success == [any(row[i] for row in run.misread) for i in range(3)]
    assert run.change == pytest.approx(float((reported - samples[2].clamp(-1, 1)).abs().mean()))
    assert reported.min() >= -1 and reported.max() <= 1
    with pytest.raises(ValueError, match="unknown method"):
        attack(digits, *samples, "doodl", "sign", 0.05)
