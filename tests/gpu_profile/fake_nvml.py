"""A stand-in for the pynvml module: a node of simulated GPUs, for tests on machines without one.

It answers the pynvml calls the sampler makes, with pynvml's own constants and exception
classes (`pynvml.NVMLError(code)` becomes the subclass for that code, as in the real module),
so the sampler cannot tell it from a driver:

    nvml = FakeNvml(4, nvlinks={(0, 1): 4}, unsupported={(2, "nvmlDeviceGetPowerUsage")})
    nvml.gpus[0].util = 80          # what the next sample of GPU 0 reads
    nvml.advance(1.0)               # one second passes: energy and NVLink counters grow
    nvml.lose(3)                    # GPU 3 falls off the bus: every call on it fails from now on
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MB = 1024 * 1024
NVSWITCH_BUS_ID = "00000000:FF:00.0"


@dataclass
class FakeGpu:
    """One simulated GPU; tests set the fields the next sample reads."""

    index: int
    name: str = "NVIDIA A100-SXM4-80GB"
    memory_total_mb: int = 81920
    power_limit_w: float = 400.0
    util: int = 0
    mem_util: int = 0
    mem_used_mb: float = 1024.0
    power_w: float = 60.0
    temp_c: int = 35
    sm_clock_mhz: int = 1410
    pcie_tx_kbps: int = 0  # NVML reports PCIe throughput in KB/s
    pcie_rx_kbps: int = 0
    nvlink_mbps: float = 0.0  # what advance() adds to the TX counter (RX stays 0)
    nvlink_tx_kib: int = 0
    nvlink_rx_kib: int = 0
    energy_mj: int = 5_000_000  # counters start at an arbitrary value, as after a driver load
    processes: dict[int, float] = field(default_factory=dict)  # pid -> used MB
    links: list[str] = field(default_factory=list)  # remote bus id per NVLink
    lost: bool = False

    @property
    def bus_id(self) -> str:
        return f"00000000:{0x18 + self.index:02X}:00.0"


class FakeNvml:
    """Module-like pynvml double; `calls` counts each function per GPU index (or None)."""

    def __init__(
        self,
        num_gpus: int = 2,
        *,
        nvlinks: dict[tuple[int, int], int] | None = None,
        nvswitch_links: int = 0,
        pcie_levels: dict[tuple[int, int], int] | None = None,
        unsupported: set[tuple[int, str]] = frozenset(),
        init_error: int | None = None,
        process_names: dict[int, str] | None = None,
    ):
        self.gpus = [FakeGpu(i) for i in range(num_gpus)]
        for (a, b), count in (nvlinks or {}).items():
            self.gpus[a].links += [self.gpus[b].bus_id] * count
            self.gpus[b].links += [self.gpus[a].bus_id] * count
        for gpu in self.gpus:
            gpu.links += [NVSWITCH_BUS_ID] * nvswitch_links
        self.pcie_levels = pcie_levels or {}
        self.unsupported = set(unsupported)
        self.failing: dict[tuple[int, str], int] = {}  # (gpu, function) -> NVML error code
        self.init_error = init_error
        self.process_names = process_names or {}
        self.calls: Counter = Counter()
        self.shutdown_calls = 0

    def __getattr__(self, name: str) -> Any:
        # Constants (NVML_*) and exception classes (NVMLError*) are pynvml's own.
        if name.startswith(("NVML_", "NVMLError")):
            return getattr(pynvml, name)
        raise AttributeError(f"FakeNvml has no {name}; add it if the sampler needs it")

    # Simulation controls.
    def advance(self, seconds: float) -> None:
        """Let time pass for the cumulative counters (energy, NVLink bytes)."""
        for gpu in self.gpus:
            gpu.energy_mj += round(gpu.power_w * seconds * 1000)
            gpu.nvlink_tx_kib += round(gpu.nvlink_mbps * 1e6 / 1024 * seconds)

    def lose(self, index: int) -> None:
        self.gpus[index].lost = True

    # System calls.
    def nvmlInit(self) -> None:
        self.calls["nvmlInit", None] += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        if pid not in self.process_names:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return self.process_names[pid]

    # Device calls: every one goes through _gpu, which fails the way the driver would.
    def _gpu(self, handle: FakeGpu, function: str) -> FakeGpu:
        self.calls[function, handle.index] += 1
        if handle.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if (handle.index, function) in self.unsupported:
            raise pynvml.NVMLError_NotSupported()
        if (handle.index, function) in self.failing:
            raise pynvml.NVMLError(self.failing[handle.index, function])
        return handle

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self._gpu(self.gpus[index], "nvmlDeviceGetHandleByIndex")

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return f"GPU-{self._gpu(handle, 'nvmlDeviceGetUUID').index:08d}-fake"

    def nvmlDeviceGetPciInfo(self, handle: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(busId=self._gpu(handle, "nvmlDeviceGetPciInfo").bus_id)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        total, used = gpu.memory_total_mb * MB, round(gpu.mem_used_mb * MB)
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeGpu) -> int:
        return round(self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_w * 1000)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=gpu.util, memory=gpu.mem_util)

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        return round(self._gpu(handle, "nvmlDeviceGetPowerUsage").power_w * 1000)  # mW

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(handle, "nvmlDeviceGetTemperature").temp_c

    def nvmlDeviceGetClockInfo(self, handle: FakeGpu, clock: int) -> int:
        assert clock == pynvml.NVML_CLOCK_SM
        return self._gpu(handle, "nvmlDeviceGetClockInfo").sm_clock_mhz

    def nvmlDeviceGetPcieThroughput(self, handle: FakeGpu, counter: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPcieThroughput")
        return gpu.pcie_tx_kbps if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else gpu.pcie_rx_kbps

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGpu) -> int:
        return self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=round(mb * MB))
                for pid, mb in gpu.processes.items()]

    def nvmlDeviceGetNvLinkState(self, handle: FakeGpu, link: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetNvLinkState")
        if not gpu.links:
            raise pynvml.NVMLError_NotSupported()  # a PCIe-only GPU
        if link >= len(gpu.links):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: FakeGpu, link: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self._gpu(handle, "nvmlDeviceGetNvLinkRemotePciInfo")
                               .links[link])

    def nvmlDeviceGetTopologyCommonAncestor(self, a: FakeGpu, b: FakeGpu) -> int:
        self._gpu(a, "nvmlDeviceGetTopologyCommonAncestor")
        self._gpu(b, "nvmlDeviceGetTopologyCommonAncestor")
        pair = (min(a.index, b.index), max(a.index, b.index))
        return self.pcie_levels.get(pair, pynvml.NVML_TOPOLOGY_SYSTEM)

    def nvmlDeviceGetFieldValues(self, handle: FakeGpu, fields: list) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues")
        counters = {pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: gpu.nvlink_tx_kib,
                    pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: gpu.nvlink_rx_kib}
        values = []
        for field_id, scope_id in fields:
            assert scope_id == 0xFFFFFFFF, "the sampler asks for the sum over all links"
            ok = field_id in counters and gpu.links
            values.append(SimpleNamespace(
                fieldId=field_id, scopeId=scope_id,
                nvmlReturn=pynvml.NVML_SUCCESS if ok else pynvml.NVML_ERROR_NOT_SUPPORTED,
                value=SimpleNamespace(ullVal=counters.get(field_id, 0)),
            ))
        return values


class FakeClock:
    """A clock the test moves by hand: `clock.now += 1.0`."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now
