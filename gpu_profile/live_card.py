"""How often a live card redraws while its step runs.

Every redraw of a Metaflow runtime card is a new process (``flow.py card create``: Python, the
flow's imports, the render), about 2-3 CPU-seconds. At Metaflow's floor of one redraw per 5 s,
the train step's two live cards (``training`` and ``gpu_profile``) kept one core of a 2-core
machine busy and the trainer got the other: the default CPU run trained at about half the speed
it reaches without them (``benchmarks/live_card_cost.py`` measures both). Redraws are
therefore spaced by the CPUs the step may use, so that they cost ~4% of them:

    refresh_interval_s()        # 60 s on 2 CPUs, 15 s on 8, 5 s (the floor) from 24 CPUs
    DOLLY_CARD_REFRESH_S=10 python flows/dolly_flow.py run    # choose it yourself (>= 5)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

METAFLOW_FLOOR_S = 5.0  # Metaflow drops a runtime refresh sooner than this after the previous one
CPU_SECONDS_PER_MINUTE = 120.0  # redraw budget: 2 cards x ~2.5 CPU-s, ~4% of the CPUs
ENV = "DOLLY_CARD_REFRESH_S"


def usable_cpus() -> float:
    """CPUs this process may use: its affinity, capped by a cgroup v2 quota (a Kubernetes CPU
    limit shows as ``cpu.max``; the affinity still lists every core of the node)."""
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return max(cpus, 1.0)


def refresh_interval_s(cpus: float | None = None) -> float:
    """Seconds between two redraws of a live card: ``$DOLLY_CARD_REFRESH_S`` if set, else
    ``CPU_SECONDS_PER_MINUTE / cpus`` (never below Metaflow's 5 s floor).

    Raises ValueError for a setting that is not a number of seconds >= 5."""
    setting = os.environ.get(ENV, "").strip()
    if setting:
        try:
            seconds = float(setting)
        except ValueError:
            seconds = -1.0
        if not seconds >= METAFLOW_FLOOR_S:
            raise ValueError(f"{ENV}={setting!r}: must be a number of seconds >= {METAFLOW_FLOOR_S:g} "
                             f"(Metaflow redraws a live card at most every {METAFLOW_FLOOR_S:g} s); unset it "
                             "for the default, which depends on the CPUs.")
        return seconds
    return max(METAFLOW_FLOOR_S, CPU_SECONDS_PER_MINUTE / (cpus if cpus is not None else usable_cpus()))


def wait_out_floor(last_render: float) -> float:
    """Sleep until a forced redraw would be taken, then return the time to record as its render
    (``time.monotonic()``). Metaflow drops a refresh sooner than its floor after the previous
    one, forced or not: a failure shown right after a redraw would not reach the card."""
    time.sleep(max(0.0, last_render + METAFLOW_FLOOR_S + 0.5 - time.monotonic()))
    return time.monotonic()
