"""What stops the trainer: each phase of ``train()`` raises one of these, and only the CLI entry
(``training.trainer.main``) turns it into the one message the user reads and exit code 1.

    raise CannotTrain(["--max_seq_length 4096 is above ...", "..."])  # "Cannot train:\\n  ...\\n  ..."
    raise CannotTrain("every eval row is longer than ...")            # "Cannot train: every eval row ..."
"""

from __future__ import annotations


class TrainerError(Exception):
    """A problem the trainer reports in one message (``report()``) instead of a traceback."""

    def report(self) -> str:
        return str(self)


class CannotTrain(TrainerError):
    """Settings, inputs or a model that cannot train: one problem, or a list shown one per line."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = problems
        super().__init__(problems if isinstance(problems, str) else "\n  ".join(problems))

    def report(self) -> str:
        return f"Cannot train: {self}" if isinstance(self.problems, str) else f"Cannot train:\n  {self}"


class CannotResume(TrainerError):
    """The checkpoint to resume from is unsafe or differs between ranks (the message says which)."""


class Preempted(TrainerError):
    """SIGTERM during training: the checkpoint of the step reached was saved (and uploaded)."""


class UploadsFailed(TrainerError):
    """Training finished and the model is on local disk, but some uploads did not complete."""
