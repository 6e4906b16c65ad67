"""Fixtures for the gpu_profile tests: a simulated 4-GPU node, a hand-moved clock, a sampler."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pynvml
import pytest
from fake_nvml import FakeClock, FakeNvml

from gpu_profile.sampler import GpuSampler


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node() -> FakeNvml:
    """4 GPUs: NVLink x4 between 0-1, x2 between 2-3, PCIe elsewhere (0/1 and 2/3 on two NUMA
    nodes); GPU 2 cannot report power, GPU 1 has no energy counter."""
    return FakeNvml(
        4,
        nvlinks={(0, 1): 4, (2, 3): 2},
        pcie_levels={(0, 2): pynvml.NVML_TOPOLOGY_SYSTEM, (1, 2): pynvml.NVML_TOPOLOGY_SYSTEM,
                     (0, 3): pynvml.NVML_TOPOLOGY_SYSTEM, (1, 3): pynvml.NVML_TOPOLOGY_SYSTEM},
        unsupported={(2, "nvmlDeviceGetPowerUsage"), (1, "nvmlDeviceGetTotalEnergyConsumption")},
        process_names={4242: "python"},
    )


@pytest.fixture
def sampler(node: FakeNvml, clock: FakeClock) -> Iterator[GpuSampler]:
    s = GpuSampler(interval=1.0, nvml=node, clock=clock)
    yield s
    s.stop()


@pytest.fixture
def tick(node: FakeNvml, clock: FakeClock, sampler: GpuSampler) -> Callable[..., None]:
    """tick(n=1, seconds=1.0): let `seconds` pass on the node and the clock, then sample; n times."""

    def run(n: int = 1, seconds: float = 1.0) -> None:
        for _ in range(n):
            clock.now += seconds
            node.advance(seconds)
            sampler.sample_once()

    return run
