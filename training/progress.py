"""The trainer's metrics stream: one JSON event per line, written while training runs.

The trainer (world rank 0) appends to ``<output_dir>/logs/progress.jsonl``; the flow's train step
reads it every few seconds and redraws the live ``training`` card. Any other process can follow
it too (``tail -f``, or ``ProgressReader`` below).

    reader = ProgressReader(Path("outputs/dolly/logs/progress.jsonl"))
    reader.poll()              # reads the lines added since the last poll
    view = reader.view()       # curves, progress, ETA and evaluation points, ready to draw

Events (every one has ``event`` and ``time``, seconds since the epoch):

    begin       max_steps, epochs, start_step (>0 when resumed), world_size
    step        step, epoch, tokens (input tokens seen, all ranks), step_s (this step's seconds)
    log         step, epoch, loss, learning_rate, grad_norm      (every --logging_steps)
    eval        step, epoch, eval_loss                          (held-out loss)
    evaluation  one evaluation point (training.evaluation.answer_all): label, answers, ...
    end         step, status ("done" or "preempted")

A resumed run's stream starts with what its checkpoint carries (the Trainer's log history and the
evaluation points before the checkpoint), marked ``"restored": true``, so its curves and its
evaluation table start at step 0 as an uninterrupted run's do.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

PROGRESS_FILE = Path("logs") / "progress.jsonl"  # under the trainer's --output_dir
# Keys copied from the Trainer's log dict into "log" events.
LOG_KEYS = ("loss", "learning_rate", "grad_norm")


class ProgressWriter:
    """Appends events to the stream; one line per event, flushed, so readers never wait."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # A new attempt (a retry, a resumed run) starts a new stream; a resumed run first
        # re-emits the log history its checkpoint carries, so the curves stay whole.
        self._file = path.open("w", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": time.time(), **fields}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def progress_callback(path: Path) -> Any:
    """A TrainerCallback writing the stream on world rank 0 (other ranks write nothing).

    Its running totals (seconds inside steps, seconds in training) are saved with every
    checkpoint, so a resumed run's throughput and runtime cover the whole run.
    """
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    from training.run_history import restored_attributes

    class StreamProgress(TrainerCallback, ExportableState):
        def __init__(self) -> None:
            self.writer: ProgressWriter | None = None
            self._step_started = 0.0
            self.step_seconds = 0.0  # inside optimizer steps, since step 0 (every rank)
            self.restored_train_seconds = 0.0  # in earlier attempts, up to the resumed checkpoint
            self._began = time.perf_counter()

        @property
        def train_seconds(self) -> float:
            """Seconds in training since step 0: earlier attempts (up to their checkpoint) and this one."""
            return self.restored_train_seconds + time.perf_counter() - self._began

        def state(self) -> dict[str, Any]:  # saved with each checkpoint (trainer_state.json)
            return {"args": {}, "attributes": {"step_seconds": self.step_seconds,
                                               "restored_train_seconds": self.train_seconds}}

        def on_train_begin(self, args, state, control, **kwargs):
            self._began = time.perf_counter()
            restored = restored_attributes(state, self)
            self.step_seconds = float(restored.get("step_seconds", 0.0))
            self.restored_train_seconds = float(restored.get("restored_train_seconds", 0.0))
            if not state.is_world_process_zero:
                return
            self.writer = ProgressWriter(path)
            self.writer.write("begin", max_steps=state.max_steps, epochs=args.num_train_epochs,
                              start_step=state.global_step, world_size=args.world_size)
            for logs in state.log_history:  # restored from the checkpoint of a resumed run
                self.log(logs, restored=True)

        def on_step_begin(self, args, state, control, **kwargs):
            self._step_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            # Only the step itself is timed: evaluation and generation happen between steps,
            # so tokens / step_s is the training throughput.
            step_s = time.perf_counter() - self._step_started
            self.step_seconds += step_s
            if self.writer is not None:
                self.writer.write("step", step=state.global_step, epoch=state.epoch,
                                  tokens=int(state.num_input_tokens_seen), step_s=step_s)

        def log(self, logs: dict[str, Any], restored: bool = False) -> None:
            extra = {"restored": True} if restored else {}
            if "eval_loss" in logs:
                self.writer.write("eval", step=logs.get("step"), epoch=logs.get("epoch"),
                                  eval_loss=logs["eval_loss"], **extra)
            elif "loss" in logs:
                self.writer.write("log", step=logs.get("step"), epoch=logs.get("epoch"),
                                  **{k: logs.get(k) for k in LOG_KEYS}, **extra)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.writer is not None and logs:
                self.log({**logs, "step": state.global_step, "epoch": state.epoch})

        def evaluation_point(self, point: dict[str, Any], restored: bool = False) -> None:
            if self.writer is not None:
                self.writer.write("evaluation", **point, **({"restored": True} if restored else {}))

        def end(self, step: int, status: str) -> None:
            if self.writer is not None:
                self.writer.write("end", step=step, status=status)
                self.writer.close()
                self.writer = None

    return StreamProgress()


class ProgressReader:
    """Follows a stream as it grows; a half-written last line waits for the next poll."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._offset = 0
        self._head = b""  # the first line read: a new attempt's stream starts with another one

    def poll(self) -> bool:
        """Read new complete lines; True when there were any."""
        try:
            with self.path.open("rb") as f:
                head = f.readline()
                if self._head and head != self._head:
                    self.events, self._offset = [], 0  # a retried attempt rewrote the file
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return False
        complete = chunk[: chunk.rfind(b"\n") + 1]
        if self._offset == 0 and complete:
            self._head = complete[: complete.index(b"\n") + 1]
        self._offset += len(complete)
        new = [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
        self.events.extend(new)
        return bool(new)

    def view(self, now: float | None = None) -> dict[str, Any]:
        """Everything the card draws, derived from the events read so far."""
        return progress_view(self.events, now=now)


def progress_view(events: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """Curves, throughput, progress/ETA and evaluation points from a list of events."""
    now = time.time() if now is None else now
    begin = next((e for e in reversed(events) if e["event"] == "begin"), None)
    end = next((e for e in reversed(events) if e["event"] == "end"), None)
    steps = [e for e in events if e["event"] == "step"]
    logs = [e for e in events if e["event"] == "log"]
    evals = [e for e in events if e["event"] == "eval"]
    points = [{k: v for k, v in e.items() if k not in ("event", "time", "restored")}
              for e in events if e["event"] == "evaluation"]

    step = steps[-1]["step"] if steps else (begin["start_step"] if begin else 0)
    max_steps = begin["max_steps"] if begin else 0
    start_step = begin["start_step"] if begin else 0
    elapsed = ((end["time"] if end else now) - begin["time"]) if begin else 0.0
    done_here = step - start_step
    # ETA from this attempt's wall-clock pace, evaluation and generation pauses included.
    eta = elapsed / done_here * (max_steps - step) if done_here > 0 and not end else None
    return {
        "status": end["status"] if end else ("training" if begin else "starting"),
        "step": step,
        "max_steps": max_steps,
        "epoch": steps[-1]["epoch"] if steps else None,
        "epochs": begin["epochs"] if begin else None,
        "world_size": begin["world_size"] if begin else None,
        "elapsed_s": elapsed,
        "eta_s": eta,
        "loss": [(e["step"], e["loss"]) for e in logs if e.get("loss") is not None],
        "learning_rate": [(e["step"], e["learning_rate"]) for e in logs if e.get("learning_rate") is not None],
        "grad_norm": [(e["step"], e["grad_norm"]) for e in logs
                      if e.get("grad_norm") is not None and math.isfinite(e["grad_norm"])],
        "eval_loss": [(e["step"], e["eval_loss"]) for e in evals],
        "tokens_per_second": _throughput(steps),
        "evaluation": points,
    }


def _throughput(steps: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, tokens/s): tokens trained / seconds spent in steps, over windows of a few steps."""
    deltas = []  # (step, tokens, seconds) per step
    # A resumed stream starts at a restored token count: its first step has nothing to subtract.
    previous = 0 if steps and steps[0]["step"] == 1 else None
    for s in steps:
        if previous is not None:
            deltas.append((s["step"], s["tokens"] - previous, s["step_s"]))
        previous = s["tokens"]
    window = max(5, len(deltas) // 300)  # at most ~300 points on a long run
    series = []
    for i in range(0, len(deltas), window):
        chunk = deltas[i : i + window]
        seconds = sum(c[2] for c in chunk)
        if seconds > 0:
            series.append((chunk[-1][0], sum(c[1] for c in chunk) / seconds))
    return series
