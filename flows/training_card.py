"""The train step's live ``training`` card: curves, progress/ETA and the evaluation table.

The trainer writes its metrics stream (``training/progress.py``); while it runs, a thread in the
train step reads the new lines every few seconds and redraws the card. When the trainer exits, the
card gets its last components: Metaflow renders them at the task's end, and when the trainer
failed the block redraws at once (Metaflow renders no card for a failed task), so the card shows
how far it got:

    with LiveTrainingCard(workdir / PROGRESS_FILE) as live:
        run_streaming(launch.command, env=launch.env)
    self.training_history = live.history()

    python flows/dolly_flow.py card view train --id training     # after (or during) a run

Charts are PNGs drawn on bare matplotlib ``Figure`` objects (no pyplot state, safe off the main
thread), so the card needs no network to show.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaflow import current
from metaflow.cards import Image, Markdown, Table

from gpu_profile.live_card import refresh_interval_s, wait_out_floor
from gpu_profile.render import code_span
from training.progress import ProgressReader

if TYPE_CHECKING:  # matplotlib (0.4 s) only where a chart is drawn: every card process imports this
    from matplotlib.figure import Figure

CARD_ID = "training"
ANSWER_CHARS = 280  # an answer longer than this is cut in the table (the artifact has it whole)
_FIGSIZE, _DPI = (9, 2.4), 80  # 720 x 192 pixels, like the gpu_profile card
CURVES = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second")


def duration(seconds: float | None) -> str:
    """``3725`` -> ``"1h 02m"``; ``185`` -> ``"3m 05s"``; None -> ``"n/a"``."""
    if seconds is None:
        return "n/a"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(view: dict[str, Any], failed: str | None = None) -> str:
    """One line: status, step x/y (pct), epoch, elapsed, ETA and the latest numbers."""
    step, max_steps = view["step"], view["max_steps"]
    if failed:
        status = f"Failed at step {step}: {failed}"
    elif view["status"] == "starting":
        return "Starting: loading the model and data (no training step yet)."
    else:
        status = {"training": "Training", "done": "Done", "preempted": "Preempted"}[view["status"]]
    parts = [f"**{status}**", f"step {step}/{max_steps}" + (f" ({step / max_steps:.0%})" if max_steps else "")]
    if view["epoch"] is not None:
        parts.append(f"epoch {view['epoch']:.2f}/{view['epochs']:g}")
    parts.append(f"elapsed {duration(view['elapsed_s'])}")
    if view["status"] == "training" and not failed:
        parts.append(f"ETA {duration(view['eta_s'])}")
    if view["loss"]:
        parts.append(f"loss {view['loss'][-1][1]:.4f}")
    if view["eval_loss"]:
        parts.append(f"eval loss {view['eval_loss'][-1][1]:.4f}")
    if view["tokens_per_second"]:
        parts.append(f"{view['tokens_per_second'][-1][1]:,.0f} tokens/s")
    if view["world_size"]:
        parts.append(f"{view['world_size']} rank(s)")
    return " · ".join(parts)


def card_components(view: dict[str, Any], failed: str | None = None, charts: list | None = None) -> list:
    """The whole card for one view of the stream (``training.progress.progress_view``).

    ``charts``: the chart components of this view when the caller already drew them.
    """
    components: list = [Markdown("## Training"), Markdown(progress_line(view, failed))]
    components.extend(chart_components(view) if charts is None else charts)
    if view["evaluation"]:
        marker = _end_marker(view["evaluation"])
        components.append(Markdown(
            "## Evaluation\nThe same instructions answered by the base model (first row) and "
            f"after each epoch; greedy decoding. *[no {code_span(marker)}]*: the answer ran to the token limit."
        ))
        components.append(evaluation_table(view["evaluation"]))
    return components


def preflight_components(record: dict[str, Any]) -> list:
    """This node's preflight (training.preflight.preflight_record): verdict, findings, facts."""
    facts = record["facts"]
    findings = record["findings"]
    verdict = "every check passed" if not findings else (
        f"{sum(f['severity'] == 'error' for f in findings)} error(s), "
        f"{sum(f['severity'] == 'warning' for f in findings)} warning(s)")
    gpus = facts.get("gpus") or []
    names = ", ".join(sorted({g["name"] for g in gpus})) or "none"
    estimate = record.get("memory_estimate")
    rows = [
        ["GPUs requested / visible", f"{facts['gpus_requested']} / {len(gpus)} ({names})"],
        ["Driver (CUDA it supports)", f"{facts.get('driver_version') or 'n/a'} ({_version(facts.get('driver_cuda'))})"],
        ["torch (CUDA build), NCCL", f"{facts.get('torch_version') or 'n/a'} ({facts.get('torch_cuda') or 'CPU'}), "
                                     f"{_version(facts.get('nccl_version'))}"],
        ["/dev/shm", _gib(facts.get("shm_bytes"))],
        ["Free disk / needed for checkpoints",
         f"{_gib(facts.get('disk_free_bytes'))} / {_gib(record.get('checkpoint_disk_bytes'))}"],
    ]
    if estimate and gpus:
        smallest = min((g["total_memory_bytes"] for g in gpus if g.get("total_memory_bytes")), default=None)
        rows.append(["GPU memory estimate / smallest GPU", f"{_gib(estimate['per_gpu'])} / {_gib(smallest)}"])
    components: list = [Markdown(f"## Preflight on this node: {verdict}")]
    if findings:  # messages quote paths, devices and versions: table cells, shown as text
        components.append(Table(data=[[f["severity"], f["code"], f["message"]] for f in findings],
                                headers=["Severity", "Check", "Finding"]))
    return [*components, Table(data=rows, headers=["Fact", "Value"])]


def _version(value: Any) -> str:
    return ".".join(str(v) for v in value) if value else "n/a"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1024**3:.1f} GiB"


def chart_components(view: dict[str, Any]) -> list:
    """The loss/learning-rate and gradient-norm/throughput charts, as Image components."""
    charts = []
    if view["loss"] or view["eval_loss"]:
        charts.append(Image.from_matplotlib(_loss_figure(view)))
    if view["grad_norm"] or view["tokens_per_second"]:
        charts.append(Image.from_matplotlib(_health_figure(view)))
    return charts


def evaluation_table(points: list[dict[str, Any]]) -> Table:
    """One row per evaluation point (base first), one column per instruction."""
    instructions = [a["instruction"] for a in points[0]["answers"]]
    marker = _end_marker(points)
    headers = ["Model", "Step", f"Ends at {marker}", "Mean tokens"] + [_cut(text, 70) for text in instructions]
    rows = []
    for point in points:
        answers = [_cut(a["response"], ANSWER_CHARS) + ("" if a["ended"] else f" [no {marker}]")
                   for a in point["answers"]]
        rows.append([point["label"], str(point.get("global_step", "")), f"{point['ended_share']:.0%}",
                     f"{point['mean_new_tokens']:.0f}", *answers])
    return Table(data=rows, headers=headers)


def _end_marker(points: list[dict[str, Any]]) -> str:
    """What answers end with: ``### End``, or a chat template's end of turn (``<|im_end|>``)."""
    return points[0].get("end_marker", "### End")


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _panels() -> tuple[Figure, Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    left, right = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.2, top=0.87, wspace=0.22)
    return fig, left, right


def _xy(points: list) -> tuple[list, list]:
    return [p[0] for p in points], [p[1] for p in points]


def _loss_figure(view: dict[str, Any]) -> Figure:
    fig, loss_ax, lr_ax = _panels()
    if view["loss"]:
        loss_ax.plot(*_xy(view["loss"]), label="train loss")
    if view["eval_loss"]:
        loss_ax.plot(*_xy(view["eval_loss"]), marker="o", label="eval loss")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(loc="upper right", fontsize="small")
    if view["learning_rate"]:
        lr_ax.plot(*_xy(view["learning_rate"]), color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in (loss_ax, lr_ax):
        ax.set_xlabel("step")
    fig.suptitle("Loss and learning rate", fontsize="medium")
    return fig


def _health_figure(view: dict[str, Any]) -> Figure:
    fig, grad_ax, speed_ax = _panels()
    if view["grad_norm"]:
        grad_ax.plot(*_xy(view["grad_norm"]), color="tab:red")
    grad_ax.set_ylabel("gradient norm")
    if view["tokens_per_second"]:
        speed_ax.plot(*_xy(view["tokens_per_second"]), color="tab:purple")
    speed_ax.set_ylim(bottom=0)
    speed_ax.set_ylabel("tokens/s (training steps)")
    for ax in (grad_ax, speed_ax):
        ax.set_xlabel("step")
    fig.suptitle("Gradient norm and throughput (all ranks)", fontsize="medium")
    return fig


class LiveTrainingCard:
    """Redraws the ``training`` card from the stream every few seconds while the block runs."""

    def __init__(self, stream: Path, card_id: str = CARD_ID, node: int = 0,
                 preflight: dict[str, Any] | None = None) -> None:
        self.reader = ProgressReader(stream)
        self.card_id = card_id
        self.node = node  # a node after the first: the stream (world rank 0) is on node 0
        self.preflight = preflight  # this node's preflight record, shown at the end of the card
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="training-card", daemon=True)
        self._charts: tuple[int, list] = (-1, [])  # (events drawn, chart components)
        self._rendered_at = 0.0

    def __enter__(self) -> LiveTrainingCard:
        self._render()  # "starting" at once, so the card exists before the first step
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.reader.poll()
        failed = f"{exc_type.__name__}" if exc_type is not None else None
        # On success Metaflow renders these components at task end (a render and a refresh
        # process per card): a redraw of our own now would add two more. On failure it renders
        # nothing, so force a runtime render that `card view` shows.
        self._render(failed=failed, force=exc_type is not None, redraw=exc_type is not None)

    def history(self) -> dict[str, Any]:
        """The curves as lists of (step, value): the ``training_history`` artifact."""
        view = self.reader.view()
        return {name: view[name] for name in CURVES}

    def _loop(self) -> None:
        # Each redraw is a process: spaced by the CPUs (gpu_profile/live_card.py).
        interval = refresh_interval_s()
        while not self._stop.wait(interval):
            self.reader.poll()
            self._render()  # also when nothing is new: elapsed time and ETA move on

    def _render(self, failed: str | None = None, force: bool = False, redraw: bool = True) -> None:
        # A forced render (a failure, e.g. a preflight error right after the first redraw) waits
        # out Metaflow's floor, or it would be dropped.
        if redraw:
            self._rendered_at = wait_out_floor(self._rendered_at) if force else time.monotonic()
        try:
            card = current.card[self.card_id]
            card.clear()
            if self.node:
                card.append(Markdown(f"## Training\nThis is node {self.node} of a multi-node run: the curves, "
                                     "progress and evaluation are on node 0's `training` card; this node's "
                                     "GPUs are on its `gpu_profile` card."))
            else:
                view = self.reader.view()
                # Charts are redrawn only when new events came in; the progress line every time.
                if self._charts[0] != len(self.reader.events):
                    self._charts = (len(self.reader.events), chart_components(view))
                card.extend(card_components(view, failed, charts=self._charts[1]))
            if self.preflight is not None:
                card.extend(preflight_components(self.preflight))
            if redraw:
                card.refresh(force=force)
        except Exception as err:  # a card must never fail the training it shows
            print(f"training card: could not render ({type(err).__name__}: {err})", file=sys.stderr)
