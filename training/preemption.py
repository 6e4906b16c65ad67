"""SIGTERM (a preempted node, Kubernetes evicting the pod): checkpoint now, upload, then stop.

Kubernetes sends SIGTERM and, ``terminationGracePeriodSeconds`` later (30 s by default), SIGKILL.
On SIGTERM the Trainer finishes the step it is in, saves a checkpoint (which the S3 uploader
takes at once) and stops; the trainer then waits for the upload for what is left of
``--preemption_grace_s`` (25 s by default, inside Kubernetes' 30 s) and exits non-zero, so a
retry resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import time
from typing import Any


class PreemptionWatch:
    """Turns SIGTERM into "save and stop at the end of this step" for the HF Trainer."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.requested_at: float | None = None
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            print(f"[trainer] SIGTERM: saving a checkpoint after this step (grace {self.grace_s:.0f} s)", flush=True)

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def remaining_s(self) -> float:
        """Seconds of the grace period left (the full period if no SIGTERM came)."""
        if self.requested_at is None:
            return self.grace_s
        return max(0.0, self.grace_s - (time.monotonic() - self.requested_at))

    def callback(self) -> Any:
        from transformers import TrainerCallback

        watch = self

        class SaveAndStopOnSigterm(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if watch.requested:
                    control.should_save = True
                    control.should_training_stop = True

        return SaveAndStopOnSigterm()
