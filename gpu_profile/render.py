"""Metaflow card components for a GpuSampler snapshot; charts are PNGs, so the card works offline.

    from metaflow import current
    for component in card_components(sampler.snapshot()):
        current.card["gpu_profile"].append(component)

Order: verdict, status lines, summary table (and processes), one chart per GPU (utilization and
memory over time), the topology matrix with its legend, the host CPU/RAM chart. Without a GPU:
the verdict naming the reason, then the host chart.

The card is redrawn every few seconds while the step runs, so figures are small (about 720 x 190
pixels at 80 dpi) with fixed margins (constrained layout doubles the drawing time), and built as
bare `Figure` objects: no pyplot state to leak or close, and safe outside the main thread.

Text from a user, a data set or a driver (device names, status lines) goes into table cells, or
into Markdown only through `code_span`/`code_block`: see there why, for every card of the project.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from metaflow.cards import Image, Markdown, Table

from gpu_profile.summary import summarize, verdict
from gpu_profile.topology import LEGEND

if TYPE_CHECKING:  # matplotlib (0.4 s) only where a chart is drawn: every card process imports this
    from matplotlib.figure import Figure

_FIGSIZE = (9, 2.4)  # inches; at _DPI, 720 x 192 pixels
_DPI = 80
_SUMMARY_COLUMNS = [  # (summarize() key, header): one list, so headers cannot drift from values
    ("gpu", "GPU"),
    ("device", "Device"),
    ("driver", "Driver"),
    ("cuda", "CUDA"),
    ("util_max_pct", "Util max %"),
    ("util_mean_pct", "Util mean %"),
    ("mem_peak_gb", "Peak memory GB"),
    ("mem_total_gb", "Memory GB"),
    ("power_max_w", "Max power W"),
    ("energy_wh", "Energy Wh"),
    ("samples", "Samples"),
]


def code_span(text: str) -> str:
    """``text`` as inline Markdown that a Metaflow card shows as typed, and never as HTML or markup.

    Metaflow 2.19 renders a ``Markdown`` component with marked and svelte-markdown, no sanitizer:
    raw HTML in the source runs in the viewer's browser (a data set named
    ``data<img src=x onerror=...>`` ran its script when the card was opened), and links,
    images and emphasis are live. Escaping does not work there (seen in headless Chromium):
    ``&lt;`` is shown as the five characters ``&lt;``, and a backslash escape drops the character
    it escapes. A code span is shown as typed, whatever it holds, and ``Table`` cells and headers
    are text, so user text goes there. What the renderer does not keep: a code span loses its
    backticks (they become ˋ here, U+02CB, which looks the same) and cannot hold a line break
    (a blank line would end the span and start a new paragraph of live Markdown: every run of
    whitespace becomes one space).
    """
    return "`" + (" ".join(text.replace("`", "\u02cb").split()) or " ") + "`"


def code_block(text: str, language: str = "") -> str:
    """``text`` as a fenced Markdown code block, shown as typed (see ``code_span``): the fence is
    longer than any run of backticks in ``text``, so no line of it can close the block."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{fence}{language}\n{text}\n{fence}"


def card_components(data: dict[str, Any]) -> list:
    """The card for one snapshot, as a list of metaflow.cards components (see module docstring)."""
    components: list = [Markdown(f"**{verdict(data)}**")]
    # Without a GPU the verdict already carries the reason; do not say it twice.
    no_gpu_line = f"No NVIDIA GPU visible: {data['no_gpu_reason']}"
    status = [s for s in data["status"] if s != no_gpu_line]
    if status:  # they name devices and carry NVML's messages: table cells, shown as text
        components.append(Table(data=[[s] for s in status], headers=["Status"]))
    started = datetime.fromtimestamp(data["started_at"], tz=timezone.utc)
    started_text = started.strftime("%Y-%m-%d %H:%M:%S UTC")
    if data["num_gpus"]:
        components.append(_summary_table(data))
        processes = _processes_table(data)
        if processes is not None:
            components.append(processes)
        for device, gpu in zip(data["devices"], data["gpus"], strict=True):
            components.append(Image.from_matplotlib(_gpu_figure(device, gpu, started_text)))
        topology = data["topology"]
        if topology and len(topology["labels"]) > 1:
            components.extend(_topology(topology))
    components.append(Image.from_matplotlib(_host_figure(data["host"], started_text)))
    return components


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _summary_table(data: dict[str, Any]) -> Table:
    rows = []
    for row in summarize(data):
        cells = [_cell(row[key]) for key, _ in _SUMMARY_COLUMNS]
        if row["lost"]:
            cells[0] += " (lost)"
        rows.append(cells)
    return Table(data=rows, headers=[header for _, header in _SUMMARY_COLUMNS])


def _processes_table(data: dict[str, Any]) -> Table | None:
    rows = [
        [str(gpu["index"]), str(p["pid"]), p["name"], _cell(p["used_memory_mb"])]
        for gpu in data["gpus"]
        for p in gpu["processes"]
    ]
    if not rows:
        return None
    return Table(data=rows, headers=["GPU", "PID", "Process", "Peak GPU memory MB"])


def _topology(topology: dict[str, list]) -> list:
    labels, matrix = topology["labels"], topology["matrix"]
    table = Table(data=[[label, *row] for label, row in zip(labels, matrix, strict=True)],
                  headers=["", *labels])
    used = {"NV#" if cell.startswith("NV") else cell for row in matrix for cell in row}
    legend = "\n".join(f"- **{code}**: {text}" for code, text in LEGEND.items() if code in used)
    return [Markdown("**GPU topology** (as `nvidia-smi topo -m`)"), table, Markdown(legend)]


def _floats(values: list) -> list[float]:
    # None (a field missing in a sample) becomes a gap in the line.
    return [math.nan if v is None else v for v in values]


def _figure() -> tuple[Figure, Any, Any]:
    """An empty two-panel chart: (figure, left axes, right axes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    left, right = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.2, top=0.87, wspace=0.22)
    return fig, left, right


def _gpu_figure(device: dict[str, Any], gpu: dict[str, Any], started: str) -> Figure:
    fig, util_ax, mem_ax = _figure()
    t = gpu["t"]
    util_ax.plot(t, _floats(gpu["util"]), label="GPU busy")
    util_ax.plot(t, _floats(gpu["mem_util"]), label="memory bus busy")
    util_ax.set_ylim(0, 105)
    util_ax.set_ylabel("%")
    util_ax.legend(loc="upper left", fontsize="small")
    mem_ax.plot(t, [math.nan if v is None else v / 1024 for v in gpu["mem_used_mb"]],
                color="tab:purple", label="used (peak)")
    if device["memory_total_mb"]:
        mem_ax.axhline(device["memory_total_mb"] / 1024, color="gray", linestyle="--",
                       label="total")
    mem_ax.set_ylim(bottom=0)
    mem_ax.set_ylabel("memory GB")
    mem_ax.legend(loc="upper left", fontsize="small")
    for ax in (util_ax, mem_ax):
        ax.set_xlabel("seconds since start")
    lost = f", lost at {gpu['lost_at']:.0f} s" if gpu["lost"] else ""
    fig.suptitle(f"GPU {gpu['index']}: {device['name']} (started {started}{lost})",
                 fontsize="medium")
    return fig


def _host_figure(host: dict[str, Any], started: str) -> Figure:
    fig, cpu_ax, ram_ax = _figure()
    cpu_ax.plot(host["t"], _floats(host["cpu_percent"]), color="tab:green")
    cpu_ax.set_ylim(0, 105)
    cpu_ax.set_ylabel("CPU %")
    ram_ax.plot(host["t"], _floats(host["ram_used_gb"]), color="tab:orange", label="used (peak)")
    ram_ax.axhline(host["ram_total_gb"], color="gray", linestyle="--", label="total")
    ram_ax.set_ylim(bottom=0)
    ram_ax.set_ylabel("RAM GB")
    ram_ax.legend(loc="upper left", fontsize="small")
    for ax in (cpu_ax, ram_ax):
        ax.set_xlabel("seconds since start")
    fig.suptitle(f"Host CPU and RAM (started {started})", fontsize="medium")
    return fig
