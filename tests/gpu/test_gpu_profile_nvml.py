"""The real NVML path of @gpu_profile's sampler. Skipped without an NVIDIA GPU."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import nvml_gpu_count

pytest.importorskip("pynvml")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(nvml_gpu_count() == 0, reason="needs an NVIDIA GPU and driver (NVML)")]


def test_real_nvml_samples_every_gpu():
    from gpu_profile.sampler import GpuSampler

    sampler = GpuSampler(interval=0.2)
    for _ in range(3):
        sampler.sample_once()
    sampler.stop()
    data = sampler.snapshot()
    assert data["num_gpus"] == nvml_gpu_count()
    assert data["driver_version"] and data["cuda_driver_version"]
    for gpu, device in zip(data["gpus"], data["devices"], strict=True):
        assert device["name"] and device["uuid"].startswith("GPU-")
        assert len(gpu["t"]) == 3 and not gpu["lost"]
        assert all(0 <= u <= 100 for u in gpu["util"])
        assert 0 < max(gpu["mem_used_mb"]) <= device["memory_total_mb"]
    if shutil.which("nvidia-smi"):  # the same driver version nvidia-smi reports
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        assert data["driver_version"] in smi.stdout
