"""Numbers and a one-line verdict from a GpuSampler snapshot (the `gpu_profile_data` artifact).

Both read the exact whole-run statistics the sampler keeps per GPU (`stats`, `samples`,
`idle_samples`), never the downsampled series, so a peak cannot be averaged away:

    from metaflow import Flow
    data = Flow("DollyFlow").latest_run["train"].task.data.gpu_profile_data
    summarize(data)[0]["util_mean_pct"]     # 87.5
    verdict(data)                           # 'GPUs were busy: ...'
"""

from __future__ import annotations

from typing import Any

# Above this share of samples under the idle threshold, the GPUs were mostly waiting.
_MOSTLY_IDLE = 0.5
# A mean utilization below this leaves much of the GPU unused.
_UNDERUSED_PCT = 50
# Peak memory above this share of the GPU's memory leaves no headroom.
_MEMORY_FULL = 0.95


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per GPU: device, driver, CUDA, utilization max/mean, peak memory, energy.

    Missing numbers (unsupported queries, no samples yet) are None.
    """
    rows = []
    for device, gpu in zip(data["devices"], data["gpus"], strict=True):
        stats = gpu["stats"]
        energy_j = gpu["energy_j"]
        mem_total_mb = device["memory_total_mb"]
        rows.append({
            "gpu": gpu["index"],
            "device": device["name"],
            "driver": data["driver_version"],
            "cuda": data["cuda_driver_version"],
            "util_max_pct": stats.get("util", {}).get("max"),
            "util_mean_pct": stats.get("util", {}).get("mean"),
            "mem_peak_gb": _gb(stats.get("mem_used_mb", {}).get("max")),
            "mem_total_gb": _gb(mem_total_mb),
            "power_max_w": stats.get("power_w", {}).get("max"),
            "energy_wh": None if energy_j is None else round(energy_j / 3600, 2),
            "samples": gpu["samples"],
            "lost": gpu["lost"],
        })
    return rows


def _gb(mb: float | None) -> float | None:
    return None if mb is None else round(mb / 1024, 1)


def verdict(data: dict[str, Any]) -> str:
    """One line a person can act on, from the most to the least urgent finding."""
    if data["num_gpus"] == 0:
        return f"No NVIDIA GPU visible ({data['no_gpu_reason']}): host CPU/RAM only."
    gpus = data["gpus"]
    lost = [g for g in gpus if g["lost"]]
    if lost:
        names = ", ".join(f"GPU {g['index']} at {g['lost_at']:.0f} s" for g in lost)
        return (f"Lost {names}: check the node (nvidia-smi, `dmesg | grep -i xid`) before "
                "trusting this run's numbers.")
    if not any(g["samples"] for g in gpus):
        return "No GPU samples yet."
    sampled = [g for g in gpus if "util" in g["stats"]]
    if not sampled:
        return ("NVML reports no utilization for these GPUs (MIG instances do not): judge by "
                "memory and power in the table below.")
    idle_pct = data["idle_util_percent"]
    means = {g["index"]: g["stats"]["util"]["mean"] for g in sampled}
    idle_gpus = [i for i, m in means.items() if m < idle_pct]
    if idle_gpus and len(idle_gpus) < len(means) and max(means.values()) >= _UNDERUSED_PCT:
        busy = max(means, key=means.get)
        return (f"GPU {', '.join(map(str, idle_gpus))} averaged under {idle_pct}% busy while "
                f"GPU {busy} averaged {means[busy]:.0f}%: only some GPUs got work; check the "
                "launcher's --num_gpus and CUDA_VISIBLE_DEVICES.")
    idle_share = sum(g["idle_samples"] for g in sampled) / sum(g["samples"] for g in sampled)
    mean_util = sum(means.values()) / len(means)
    cpu = data["host"].get("stats", {}).get("cpu_percent", {}).get("mean")
    cpu_note = "" if cpu is None else f" (host CPU averaged {cpu:.0f}%)"
    if idle_share >= _MOSTLY_IDLE:
        return (f"GPUs were under {idle_pct}% busy for {idle_share:.0%} of the run: the input "
                f"pipeline or CPU is the bottleneck{cpu_note}; try more data loader workers, "
                "pre-tokenized data or a larger batch.")
    fullest = _fullest_memory(data)
    if fullest is not None and fullest[1] >= _MEMORY_FULL:
        index, share, peak_gb = fullest
        return (f"GPU {index} memory peaked at {peak_gb:.1f} GB ({share:.0%} of it): little "
                "headroom; a longer sequence or larger batch may run out of memory (ZeRO-3, "
                "activation checkpointing or a smaller per-device batch give room).")
    if mean_util < _UNDERUSED_PCT:
        return (f"GPUs averaged {mean_util:.0f}% busy ({idle_share:.0%} of the run under "
                f"{idle_pct}%){cpu_note}: they wait for input or communication part of the "
                "time; a larger batch or more data loader workers may help.")
    return f"GPUs were busy: {mean_util:.0f}% mean utilization; the run is GPU-bound."


def _fullest_memory(data: dict[str, Any]) -> tuple[int, float, float] | None:
    """(GPU index, peak used / total, peak GB) of the GPU whose memory came closest to full."""
    best = None
    for device, gpu in zip(data["devices"], data["gpus"], strict=True):
        peak = gpu["stats"].get("mem_used_mb", {}).get("max")
        total = device["memory_total_mb"]
        if peak is not None and total:
            candidate = (gpu["index"], peak / total, peak / 1024)
            if best is None or candidate[1] > best[1]:
                best = candidate
    return best
