"""summarize() numbers for known inputs, and verdict() for each kind of run."""

from __future__ import annotations

import pynvml
from fake_nvml import FakeClock, FakeNvml

from gpu_profile.sampler import GpuSampler
from gpu_profile.summary import summarize, verdict


def run(node: FakeNvml, utils: list[list[int]], mem_mb: list[list[float]] | None = None) -> dict:
    """Sample `node` once per column of `utils` (one row per GPU), 1 s apart."""
    clock = FakeClock(0.0)
    s = GpuSampler(nvml=node, clock=clock)
    for k in range(len(utils[0])):
        for i, gpu in enumerate(node.gpus):
            gpu.util = utils[i][k]
            if mem_mb is not None:
                gpu.mem_used_mb = mem_mb[i][k]
        s.sample_once()
        clock.now += 1.0
        node.advance(1.0)
    s.stop()
    return s.snapshot()


def test_summary_numbers_for_known_inputs():
    node = FakeNvml(2, unsupported={(1, "nvmlDeviceGetTotalEnergyConsumption")})
    node.gpus[0].power_w = node.gpus[1].power_w = 360.0
    data = run(node, [[0, 50, 100, 50], [10, 10, 10, 10]],
               mem_mb=[[1024, 40960, 20480, 1024], [512, 512, 512, 512]])
    rows = summarize(data)
    assert rows[0] == {
        "gpu": 0, "device": "NVIDIA A100-SXM4-80GB", "driver": "550.54.15", "cuda": "12.4",
        "util_max_pct": 100.0, "util_mean_pct": 50.0, "mem_peak_gb": 40.0, "mem_total_gb": 80.0,
        "power_max_w": 360.0,
        # The counter saw 3 s between the first and last sample at 360 W: 1080 J = 0.3 Wh.
        "energy_wh": 0.3, "samples": 4, "lost": False,
    }
    assert rows[1]["util_max_pct"] == rows[1]["util_mean_pct"] == 10.0
    assert rows[1]["mem_peak_gb"] == 0.5
    assert rows[1]["energy_wh"] == 0.3  # integrated from power: 360 W x 3 s, the same


def test_summary_reports_missing_numbers_as_none():
    node = FakeNvml(1, unsupported={(0, "nvmlDeviceGetPowerUsage"),
                                    (0, "nvmlDeviceGetTotalEnergyConsumption")})
    row = summarize(run(node, [[50]]))[0]
    assert row["power_max_w"] is None and row["energy_wh"] is None
    assert summarize(GpuSampler(nvml=FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)).snapshot()) == []


def test_verdict_busy():
    text = verdict(run(FakeNvml(2), [[90, 95, 100], [85, 90, 95]]))
    assert text == "GPUs were busy: 92% mean utilization; the run is GPU-bound."


def test_verdict_idle_names_the_share_and_the_bottleneck():
    # 5 of 8 samples under 10% on both GPUs: 62% of the run.
    utils = [2, 3, 0, 90, 1, 95, 4, 90]
    text = verdict(run(FakeNvml(2), [utils, utils]))
    assert text.startswith("GPUs were under 10% busy for 62% of the run: the input pipeline or "
                           "CPU is the bottleneck (host CPU averaged ")


def test_verdict_underused():
    text = verdict(run(FakeNvml(1), [[30, 40, 20, 50]]))
    assert text.startswith("GPUs averaged 35% busy (0% of the run under 10%)")


def test_verdict_only_some_gpus_worked():
    text = verdict(run(FakeNvml(4), [[95, 96], [0, 1], [2, 0], [0, 0]]))
    assert text.startswith("GPU 1, 2, 3 averaged under 10% busy while GPU 0 averaged 96%")
    assert "--num_gpus" in text


def test_verdict_memory_nearly_full():
    text = verdict(run(FakeNvml(1), [[90, 90]], mem_mb=[[40000, 80000]]))
    assert text.startswith("GPU 0 memory peaked at 78.1 GB (98% of it): little headroom")


def test_verdict_lost_gpu_comes_first():
    node, clock = FakeNvml(2), FakeClock(0.0)
    s = GpuSampler(nvml=node, clock=clock)
    s.sample_once()
    node.lose(1)
    clock.now = 12.0
    s.sample_once()
    text = verdict(s.snapshot())
    assert text.startswith("Lost GPU 1 at 12 s: check the node")


def test_verdict_without_gpu_names_the_reason():
    data = GpuSampler(nvml=FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)).snapshot()
    assert verdict(data) == (
        "No NVIDIA GPU visible (NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on "
        "this machine or container): host CPU/RAM only.")


def test_verdict_before_the_first_sample():
    assert verdict(GpuSampler(nvml=FakeNvml(2)).snapshot()) == "No GPU samples yet."


def test_verdict_when_utilization_is_unsupported():
    s = GpuSampler(nvml=FakeNvml(1, unsupported={(0, "nvmlDeviceGetUtilizationRates")}))
    s.sample_once()
    assert verdict(s.snapshot()).startswith("NVML reports no utilization for these GPUs")
