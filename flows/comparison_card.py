"""A sweep's results: one row per point, the best point, and the ``comparison`` card.

    rows = [result_row(point, metrics, evaluation, ...) for each branch]
    best = pick_best(rows, "eval_loss")
    current.card["comparison"].extend(comparison_components(rows, best, "eval_loss", answers))

    python flows/dolly_sweep_flow.py card view compare --id comparison

The card needs no network: the chart is a PNG drawn on a bare matplotlib ``Figure``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metaflow.cards import Image, Markdown, Table
from summary_card import change, or_na
from training_card import duration

from gpu_profile.render import code_span

if TYPE_CHECKING:  # matplotlib (0.4 s) only where a chart is drawn: every card process imports this
    from matplotlib.figure import Figure

# --select: the metric, which way is better, and how it is shown.
SELECTIONS = {
    "eval_loss": ("eval_loss_after", min, "lowest eval loss after training"),
    "ended_share": ("ended_share_final", max, "largest share of evaluation answers that end by themselves"),
}
ANSWER_CHARS = 400


def result_row(point: dict[str, Any], *, metrics: dict[str, Any] | None, error: str | None, wall_s: float | None,
               gpus: int, model_location: str | None) -> dict[str, Any]:
    """One point's row of the ``results`` artifact; a failed point keeps its settings and error."""
    metrics = metrics or {}
    return {
        "point": point["index"],
        "name": point["name"],
        "settings": point["settings"],
        "status": "failed" if error else "ok",
        "error": error,
        "eval_loss_before": metrics.get("eval_loss_before"),
        "eval_loss_after": metrics.get("eval_loss_after"),
        "ended_share_base": metrics.get("ended_share_base"),
        "ended_share_final": metrics.get("ended_share_final"),
        "end_marker": metrics.get("end_marker", "### End"),
        "tokens_per_second": metrics.get("tokens_per_second"),
        "wall_s": wall_s,
        # What the point cost: the step's wall time on every GPU it held (0 on CPU).
        "gpu_hours": (wall_s or 0.0) * gpus / 3600,
        "global_step": metrics.get("global_step"),
        "eval_loss_history": metrics.get("eval_loss_history", []),
        "model_location": model_location if not error else None,
    }


def pick_best(rows: list[dict[str, Any]], select: str) -> dict[str, Any] | None:
    """The best successful row by ``select``; ties go to the other metric, then to the earlier
    point of the grid. None when no point has the metric (every point failed)."""
    key, better, _ = SELECTIONS[select]
    other_key, other_better, _ = SELECTIONS["ended_share" if select == "eval_loss" else "eval_loss"]
    usable = [row for row in rows if row["status"] == "ok" and row[key] is not None]
    if not usable:
        return None

    def sign(function: Any) -> int:
        return 1 if function is min else -1

    def rank(row: dict[str, Any]) -> tuple:
        other = row[other_key]
        return (sign(better) * row[key], sign(other_better) * other if other is not None else 0.0, row["point"])

    return min(usable, key=rank)


def ordered(rows: list[dict[str, Any]], select: str) -> list[dict[str, Any]]:
    """Rows best first by ``select``; failed points last, in grid order."""
    key, better, _ = SELECTIONS[select]
    sign = 1 if better is min else -1
    ok = sorted((r for r in rows if r["status"] == "ok" and r[key] is not None),
                key=lambda r: (sign * r[key], r["point"]))
    return ok + [r for r in rows if r not in ok]


def comparison_components(rows: list[dict[str, Any]], best: dict[str, Any] | None, select: str,
                          answers: dict[int, list[dict[str, Any]]]) -> list:
    """The card: the table sorted by ``select``, every point's eval loss on one chart, and each
    evaluation instruction answered by every point. ``answers``: point -> its final answers."""
    _, _, meaning = SELECTIONS[select]
    failed = [r for r in rows if r["status"] == "failed"]
    headline = (f"**Best: point {best['point'] + 1}, {code_span(best['name'])}** (by --select {select}: {meaning}; "
                "ties go to the other metric, then to the earlier point)." if best else "**No point finished.**")
    components: list = [
        Markdown(f"# Sweep: {len(rows)} points, {len(rows) - len(failed)} finished, {len(failed)} failed\n{headline}"),
    ]
    table = []
    for rank, row in enumerate(ordered(rows, select), start=1):
        mark = "★ " if best is not None and row["point"] == best["point"] else ""
        table.append([
            f"{mark}{rank}" if row["status"] == "ok" else "-",
            f"{row['point'] + 1}: {row['name']}",
            row["status"] if not row["error"] else f"failed: {row['error']}",
            change(row["eval_loss_before"], row["eval_loss_after"], ".4f"),
            f"{change(row['ended_share_base'], row['ended_share_final'], '.0%')} ({row['end_marker']})",
            or_na(row["tokens_per_second"], ",.0f"),
            duration(row["wall_s"]),
            f"{row['gpu_hours']:.2f}",
            row["model_location"] or "-",
        ])
    components.append(Table(data=table, headers=["Rank", "Point", "Status", "Eval loss", "Answers that end",
                                                 "Tokens/s", "Wall time", "GPU-hours", "Model"]))
    if any(row["eval_loss_history"] for row in rows):
        components.append(Image.from_matplotlib(eval_loss_figure(rows)))
    instructions = _instructions(answers)
    if instructions:
        components.append(Markdown("## The same instructions, every point's final answer (greedy)"))
    for number, instruction in enumerate(instructions, start=1):
        lines = []
        for row in rows:
            answer = next((a for a in answers.get(row["point"], []) if a["instruction"] == instruction), None)
            if answer is None:
                continue
            text = " ".join(answer["response"].split()) or "(empty)"
            text = text if len(text) <= ANSWER_CHARS else text[: ANSWER_CHARS - 1] + "…"
            unended = "" if answer["ended"] else f" [no {row['end_marker']}]"
            lines.append([f"{row['point'] + 1}: {row['name']}", text + unended])
        # The instruction heads its answers' column: a table header is text, whatever the data holds.
        components.append(Table(data=lines, headers=["Point", f"{number}. {instruction}"]))
    return components


def _instructions(answers: dict[int, list[dict[str, Any]]]) -> list[str]:
    seen: list[str] = []
    for point_answers in answers.values():
        for answer in point_answers:
            if answer["instruction"] not in seen:
                seen.append(answer["instruction"])
    return seen


def eval_loss_figure(rows: list[dict[str, Any]]) -> Figure:
    """Every point's eval loss against the step, on one chart."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), dpi=80)
    ax = fig.add_subplot(1, 1, 1)
    for row in rows:
        if row["eval_loss_history"]:
            steps, losses = zip(*row["eval_loss_history"], strict=True)
            # A point's name holds grid values (paths, names): a pair of '$' would be mathtext.
            name = row["name"].replace("$", r"\$")
            ax.plot(steps, losses, marker="o", label=f"{row['point'] + 1}: {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.legend(loc="upper right", fontsize="small")
    fig.suptitle("Eval loss of every point", fontsize="medium")
    fig.tight_layout()
    return fig
