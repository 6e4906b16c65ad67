"""The trainer's errors as the CLI prints them: one problem inline, several one per line."""

from __future__ import annotations

import pytest

from training.trainer import main
from training.trainer_errors import CannotResume, CannotTrain


def test_one_problem_inline_several_one_per_line():
    assert CannotTrain("raise --max_seq_length.").report() == "Cannot train: raise --max_seq_length."
    assert CannotTrain(["--a: bad", "--b: bad"]).report() == "Cannot train:\n  --a: bad\n  --b: bad"
    assert CannotResume("Cannot resume: the ranks differ").report() == "Cannot resume: the ranks differ"


def test_the_cli_turns_a_phase_error_into_its_message(monkeypatch, tmp_path):
    def refuse(*args):
        raise CannotTrain(["--precision bf16 needs a GPU", "--deepspeed: x.json does not exist"])

    monkeypatch.setattr("training.trainer.check_settings", refuse)
    with pytest.raises(SystemExit) as stopped:
        main(["--output_dir", str(tmp_path)])
    assert stopped.value.code == "Cannot train:\n  --precision bf16 needs a GPU\n  --deepspeed: x.json does not exist"
