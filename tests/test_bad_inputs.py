"""Every bad input of the table in bad_inputs.py gets a clear answer: the exact exit code (2 for a user's mistake)
or a UsageError-family exception, in one line that names the offending option or file, with no file that existed
before changed (hashed before and after). A warning where the answer is a warning (an over-long prompt)."""

import pytest
from bad_inputs import CASES, World, run_case


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("bad-inputs"))


def test_the_table_covers_every_command_and_is_large():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 150
    commands = {case.argv[0] for case in CASES if case.argv}
    assert commands == {"demo", "bench", "edit", "style", "aesthetic", "adversarial", "noise", "train", "lora",
                        "finetune", "shortft", "ui", "nonsense"}
    assert sum(case.call is not None for case in CASES) >= 70  # and the public functions


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_a_clear_answer(case, world):
    verdict, detail = run_case(case, world, timeout=120)
    assert verdict == "clear", detail
