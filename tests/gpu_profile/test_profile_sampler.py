"""GpuSampler against a simulated node: what lands in the snapshot, and every way NVML fails."""

from __future__ import annotations

import copy
import json
import random
import sys
import time

import pynvml
import pytest
from fake_nvml import FakeClock, FakeNvml

from gpu_profile.device import MAX_PROCESSES
from gpu_profile.sampler import MAX_STATUS_MESSAGES, GpuSampler


def test_once_per_task_facts(sampler):
    data = sampler.snapshot()
    assert data["num_gpus"] == 4
    assert data["status"] == []
    assert data["driver_version"] == "550.54.15"
    assert data["cuda_driver_version"] == "12.4"
    assert data["interval"] == 1.0
    assert abs(data["started_at"] - time.time()) < 60
    assert data["devices"][1] == {
        "index": 1, "name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-00000001-fake",
        "bus_id": "00000000:19:00.0", "memory_total_mb": 81920, "power_limit_w": 400.0,
    }


def test_topology_matrix_like_nvidia_smi_topo(sampler):
    topo = sampler.snapshot()["topology"]
    assert topo == {
        "labels": ["GPU0", "GPU1", "GPU2", "GPU3"],
        "matrix": [["X", "NV4", "SYS", "SYS"],
                   ["NV4", "X", "SYS", "SYS"],
                   ["SYS", "SYS", "X", "NV2"],
                   ["SYS", "SYS", "NV2", "X"]],
    }


def test_nvswitch_and_pcie_only_nodes():
    switch = GpuSampler(nvml=FakeNvml(3, nvswitch_links=18))
    assert switch.snapshot()["topology"]["matrix"][0] == ["X", "NV18", "NV18"]
    pcie = GpuSampler(nvml=FakeNvml(2, pcie_levels={(0, 1): pynvml.NVML_TOPOLOGY_MULTIPLE}))
    assert pcie.snapshot()["topology"]["matrix"] == [["X", "PXB"], ["PXB", "X"]]
    pcie.sample_once()
    assert "nvlink_mbps" not in pcie.snapshot()["gpus"][0]  # no NVLink, no NVLink series


def test_sampled_values_land_in_the_snapshot(node, sampler, tick):
    gpu = node.gpus[0]
    gpu.util, gpu.mem_util, gpu.mem_used_mb, gpu.power_w = 35, 12, 2048.0, 150.0
    gpu.temp_c, gpu.sm_clock_mhz, gpu.pcie_tx_kbps, gpu.pcie_rx_kbps = 51, 1410, 250_000, 5_000
    gpu.nvlink_mbps = 2000.0
    gpu.processes = {4242: 1500.0}
    tick()
    gpu.util, gpu.mem_used_mb, gpu.processes = 90, 6144.0, {4242: 5000.0, 77: 10.0}
    tick(seconds=2.0)
    g = sampler.snapshot()["gpus"][0]
    assert g["index"] == 0
    assert g["t"] == [1.0, 3.0]
    assert g["util"] == [35.0, 90.0]
    assert g["mem_util"] == [12.0, 12.0]
    assert g["mem_used_mb"] == [2048.0, 6144.0]
    assert g["power_w"] == [150.0, 150.0]
    assert g["temp_c"] == [51.0, 51.0]
    assert g["sm_clock_mhz"] == [1410.0, 1410.0]
    assert g["pcie_tx_mbps"] == [250.0, 250.0]
    assert g["pcie_rx_mbps"] == [5.0, 5.0]
    # NVLink counters are cumulative: the first sample has no rate yet, then 2000 MB/s.
    assert g["nvlink_mbps"][0] is None
    assert g["nvlink_mbps"][1] == pytest.approx(2000.0, rel=1e-3)
    assert g["processes"] == [
        {"pid": 4242, "name": "python", "used_memory_mb": 5000},  # peak over the run
        {"pid": 77, "name": "unknown", "used_memory_mb": 10},  # NVML could not name it
    ]
    assert g["stats"]["util"] == {"max": 90.0, "mean": 62.5}
    assert g["stats"]["mem_used_mb"]["max"] == 6144.0
    assert g["samples"] == 2 and g["idle_samples"] == 0
    assert g["lost"] is False and g["unsupported"] == []
    assert sampler.snapshot()["host"]["t"] == [1.0, 3.0]


def test_host_cpu_and_ram(sampler, tick):
    tick(3)
    host = sampler.snapshot()["host"]
    assert len(host["cpu_percent"]) == 3
    assert all(0.0 <= c <= 100.0 for c in host["cpu_percent"])
    assert all(0.0 < r <= host["ram_total_gb"] for r in host["ram_used_gb"])


def test_unsupported_query_is_recorded_once_and_not_retried(node, sampler, tick):
    tick(5)
    data = sampler.snapshot()
    g2 = data["gpus"][2]
    assert g2["unsupported"] == ["power_w"]
    assert g2["power_w"] == [None] * 5
    assert g2["util"] == [0.0] * 5  # the rest of the GPU is still sampled
    assert node.calls["nvmlDeviceGetPowerUsage", 2] == 1
    assert data["gpus"][1]["unsupported"] == ["energy_counter"]
    assert data["status"] == []  # not an error


def test_energy_from_counter_or_integrated_power(node, sampler, tick):
    node.gpus[0].power_w = node.gpus[1].power_w = 100.0
    sampler.sample_once()  # t = 0: the baseline
    node.gpus[0].power_w = node.gpus[1].power_w = 300.0
    tick(seconds=10.0)
    gpus = sampler.snapshot()["gpus"]
    # GPU 0 reads the driver's counter, which advance() filled at 300 W for 10 s.
    assert gpus[0]["energy_j"] == pytest.approx(3000.0)
    # GPU 1 has no counter: trapezoid over the samples, (100 + 300) / 2 W * 10 s.
    assert gpus[1]["energy_j"] == pytest.approx(2000.0)
    # GPU 2 cannot report power but has the counter, which needs no power samples.
    assert gpus[2]["energy_j"] == pytest.approx(600.0)  # 60 W default for 10 s


def test_energy_unknown_without_counter_or_power():
    node = FakeNvml(1, unsupported={(0, "nvmlDeviceGetPowerUsage"),
                                    (0, "nvmlDeviceGetTotalEnergyConsumption")})
    s = GpuSampler(nvml=node)
    s.sample_once()
    s.sample_once()
    assert s.snapshot()["gpus"][0]["energy_j"] is None


def test_lost_gpu_stops_alone_and_is_reported(node, sampler, tick):
    tick(3)
    node.lose(3)
    tick(2)
    calls_after_loss = node.calls["nvmlDeviceGetUtilizationRates", 3]
    tick(2)
    data = sampler.snapshot()
    g3 = data["gpus"][3]
    assert g3["lost"] is True and g3["lost_at"] == 4.0
    assert g3["t"] == [1.0, 2.0, 3.0]
    assert node.calls["nvmlDeviceGetUtilizationRates", 3] == calls_after_loss  # not asked again
    assert [len(g["t"]) for g in data["gpus"][:3]] == [7, 7, 7]
    assert len(data["host"]["t"]) == 7
    assert len(data["status"]) == 1
    assert data["status"][0].startswith("GPU 3: NVIDIA A100-SXM4-80GB lost at 4 s (GPU is lost)")


def test_other_errors_are_reported_once_and_retried(node, sampler, tick):
    node.failing[0, "nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_UNKNOWN
    tick(3)
    del node.failing[0, "nvmlDeviceGetTemperature"]
    node.gpus[0].temp_c = 60
    tick()
    data = sampler.snapshot()
    assert data["gpus"][0]["temp_c"] == [None, None, None, 60.0]
    assert data["status"] == ["GPU 0: reading temp_c failed (Unknown Error); retrying every sample"]
    assert data["gpus"][0]["lost"] is False


def test_gpu_that_cannot_be_opened_is_listed_as_lost():
    node = FakeNvml(2)
    node.failing[1, "nvmlDeviceGetHandleByIndex"] = pynvml.NVML_ERROR_NO_PERMISSION
    s = GpuSampler(nvml=node)
    s.sample_once()
    data = s.snapshot()
    assert data["num_gpus"] == 2
    assert data["gpus"][1]["lost"] is True and data["gpus"][1]["t"] == []
    assert data["gpus"][0]["samples"] == 1
    assert data["topology"]["matrix"][0][1] == "?"
    assert any(m.startswith("GPU 1: cannot be opened (Insufficient Permissions)")
               for m in data["status"])


@pytest.mark.parametrize("code, reason", [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML library not found (libnvidia-ml.so.1)"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "the NVIDIA kernel driver is not loaded"),
])
def test_nvml_missing_keeps_sampling_the_host(code, reason):
    node = FakeNvml(init_error=code)
    s = GpuSampler(nvml=node)
    s.sample_once()
    s.sample_once()
    s.stop()
    data = s.snapshot()
    assert data["num_gpus"] == 0 and data["gpus"] == [] and data["topology"] is None
    assert data["no_gpu_reason"].startswith(reason)
    assert data["status"] == [f"No NVIDIA GPU visible: {data['no_gpu_reason']}"]
    assert len(data["host"]["t"]) == 2
    assert node.shutdown_calls == 0  # nothing to shut down after a failed nvmlInit


def test_no_pynvml_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    data = GpuSampler().snapshot()
    assert data["status"] == [
        "No NVIDIA GPU visible: the nvidia-ml-py package (module pynvml) is not installed"]


def test_real_pynvml_on_this_machine():
    s = GpuSampler()
    s.sample_once()
    s.stop()
    data = s.snapshot()
    if data["num_gpus"]:
        pytest.skip("this machine has an NVIDIA GPU; tests/gpu covers it")
    assert data["status"][0].startswith("No NVIDIA GPU visible: ")
    assert len(data["host"]["t"]) == 1


def test_status_messages_are_capped():
    node = FakeNvml(60)
    for i in range(60):
        node.failing[i, "nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_UNKNOWN
    s = GpuSampler(nvml=node)
    s.sample_once()
    status = s.snapshot()["status"]
    assert len(status) == MAX_STATUS_MESSAGES + 1
    assert status[-1] == "Further status messages were dropped."


def test_process_list_is_bounded_to_the_largest():
    node = FakeNvml(1)
    node.gpus[0].processes = {pid: float(pid) for pid in range(1, 101)}
    s = GpuSampler(nvml=node)
    s.sample_once()
    procs = s.snapshot()["gpus"][0]["processes"]
    assert len(procs) == MAX_PROCESSES
    assert min(p["used_memory_mb"] for p in procs) == 100 - MAX_PROCESSES + 1


def test_many_samples_through_the_sampler_stay_bounded(node, clock):
    s = GpuSampler(nvml=node, max_points=64, clock=clock)
    for i in range(500):
        node.gpus[0].util = i % 100
        clock.now += 1.0
        s.sample_once()
    data = s.snapshot()
    for g in data["gpus"]:
        assert len(g["t"]) <= 64 and g["t"][0] == 1.0 and g["t"][-1] == 500.0
        assert all(len(g[k]) == len(g["t"]) for k in ("util", "mem_used_mb", "power_w"))
    assert data["gpus"][0]["stats"]["util"] == {"max": 99.0, "mean": 49.5}
    assert len(data["host"]["t"]) <= 64


def test_30_hours_at_1s_on_8_gpus_stays_bounded():
    """108,000 samples per GPU: the store keeps 2048 points, the artifact stays under 1.9 MB.

    One store is fed directly (the NVML path is covered above) and copied to all 8 GPUs, since
    the size depends on the number of points and digits, not on which GPU they came from.
    """
    s = GpuSampler(nvml=FakeNvml(8, nvswitch_links=18), clock=FakeClock(0.0))
    devices = s._devices
    rng = random.Random(0)
    series = devices[0].series
    for i in range(108_000):
        # Values with as many digits as real ones get: the JSON size bound is about digits.
        series.append(float(i), {
            "util": rng.uniform(0, 100), "mem_util": rng.uniform(0, 100),
            "mem_used_mb": rng.uniform(10_000, 81_920), "power_w": rng.uniform(100, 700),
            "temp_c": rng.uniform(30, 90), "sm_clock_mhz": rng.uniform(1000, 1980),
            "pcie_tx_mbps": rng.uniform(0, 64_000), "pcie_rx_mbps": rng.uniform(0, 64_000),
            "nvlink_mbps": rng.uniform(0, 900_000),
        })
    assert len(series) <= 2048
    for d in devices[1:]:
        d.series = copy.deepcopy(series)
    for i in range(108_000):
        s._host.append(float(i), {"cpu_percent": rng.uniform(0, 100), "ram_used_gb": 1500.5})
    data = s.snapshot()
    for g in data["gpus"]:
        assert len(g["t"]) <= 2048 and g["t"][0] == 0.0 and g["t"][-1] == 107_999.0
        assert "nvlink_mbps" in g
    size = len(json.dumps(data, allow_nan=False))
    assert size < 1_900_000, size  # the bound derived in gpu_profile/sampler.py (1.23 MB)


def test_snapshot_is_plain_json(sampler, tick):
    tick(3)
    data = sampler.snapshot()
    assert json.loads(json.dumps(data, allow_nan=False)) == data


def test_thread_samples_and_stops_cleanly(node):
    s = GpuSampler(interval=0.01, nvml=node)
    s.start()
    s.start()  # a second start does not start a second thread
    deadline = time.monotonic() + 30  # the loop ends at the third sample; this only bounds a failure
    while len(s.snapshot()["host"]["t"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread = s._thread
    s.stop()
    assert not thread.is_alive()
    count = len(s.snapshot()["host"]["t"])
    assert count >= 3
    s.stop()
    s.sample_once()  # after stop: no more samples, no NVML calls on a shut-down library
    assert len(s.snapshot()["host"]["t"]) == count
    assert node.shutdown_calls == 1
    assert s.snapshot()["gpus"][0]["samples"] >= 3


def test_stop_without_start_shuts_nvml_down_once(node):
    s = GpuSampler(nvml=node)
    s.stop()
    s.stop()
    assert node.shutdown_calls == 1


def test_thread_survives_an_unexpected_error(node):
    def broken(handle):
        raise RuntimeError("driver returned garbage")

    node.nvmlDeviceGetUtilizationRates = broken
    s = GpuSampler(interval=0.01, nvml=node)
    s.start()
    deadline = time.monotonic() + 30
    while len(s.snapshot()["host"]["t"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = s._thread.is_alive()
    s.stop()
    data = s.snapshot()
    assert alive and len(data["host"]["t"]) >= 3
    assert data["status"] == ["Sampling failed (RuntimeError: driver returned garbage); still trying"]
