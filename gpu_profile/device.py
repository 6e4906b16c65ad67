"""One GPU as the sampler sees it: static facts read once, a bounded series of samples, energy.

Every NVML query goes through one gate that sorts failures three ways: a query the GPU cannot
answer is listed in `unsupported` once and never asked again; a lost GPU stops being sampled
(the rest of the node is unaffected); any other error is reported once and retried next sample.

    device = GpuDevice(pynvml, index=0, max_points=2048, report=print)
    device.sample(t=0.0)          # seconds since the profile started
    device.to_dict()["util"]      # [37.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpu_profile.nvml_errors import is_gpu_lost, is_unsupported
from gpu_profile.series import Series
from gpu_profile.topology import NvLinks

# Below this utilization (percent) a GPU counts as idle; the verdict quotes the number.
IDLE_UTIL_PERCENT = 10

COLUMNS = (
    "util",  # % of time a kernel ran
    "mem_util",  # % of time device memory was read or written
    "mem_used_mb",
    "power_w",
    "temp_c",
    "sm_clock_mhz",
    "pcie_tx_mbps",  # MB/s
    "pcie_rx_mbps",
    "nvlink_mbps",  # MB/s, TX + RX over all links; only on GPUs with active NVLinks
)
# Memory is charted at its peak: an OOM happens at the peak, not the average.
PEAK_COLUMNS = ("mem_used_mb",)

# Processes are listed with their peak memory; a run that spawns many keeps the largest few.
MAX_PROCESSES = 32

MB = 1024 * 1024
# NVLink counters with scopeId UINT_MAX are summed over all links (nvml.h).
_ALL_LINKS = 0xFFFFFFFF


class _GpuLost(Exception):
    """Raised inside a sample when NVML says the GPU is gone; ends sampling of this GPU."""


class GpuDevice:
    """Samples one GPU through NVML; not thread-safe (the sampler holds its lock around it)."""

    def __init__(self, nvml: Any, index: int, max_points: int, report: Callable[[str], None]):
        self.index = index
        self.nvml = nvml
        self._report = report
        self.series = Series(COLUMNS, max_points, peak_columns=PEAK_COLUMNS)
        self.unsupported: list[str] = []
        self._failed: set[str] = set()
        self.lost_at: float | None = None
        self.idle_samples = 0
        self.nvlinks = NvLinks()  # the sampler fills this in once all bus ids are known
        self.energy_j: float | None = None
        self._energy_baseline_mj: int | None = None
        self._last_power: tuple[float, float] | None = None
        self._last_nvlink: tuple[float, int] | None = None
        self._processes: dict[int, dict] = {}
        self.info: dict[str, Any] = {"index": index, "name": None, "uuid": None, "bus_id": None,
                                     "memory_total_mb": None, "power_limit_w": None}
        try:
            self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as err:
            self.handle = None
            self.lost_at = 0.0
            self.report(f"cannot be opened ({err}); it is not sampled")
            return
        try:
            self._read_info()
        except _GpuLost as lost:
            self._mark_lost(0.0, lost)

    @property
    def lost(self) -> bool:
        return self.lost_at is not None

    def report(self, message: str) -> None:
        """Pass a status message on, naming this GPU."""
        self._report(f"GPU {self.index}: {message}")

    def _query(self, field: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), or None when the field is unsupported or this read failed."""
        if field in self.unsupported:
            return None
        try:
            return fn(*args)
        except self.nvml.NVMLError as err:
            if is_unsupported(self.nvml, err):
                self.unsupported.append(field)
            elif is_gpu_lost(self.nvml, err):
                raise _GpuLost(str(err)) from err
            elif field not in self._failed:
                self._failed.add(field)
                self.report(f"reading {field} failed ({err}); retrying every sample")
            return None

    def _read_info(self) -> None:
        nvml, h = self.nvml, self.handle
        self.info["name"] = self._query("name", nvml.nvmlDeviceGetName, h)
        self.info["uuid"] = self._query("uuid", nvml.nvmlDeviceGetUUID, h)
        pci = self._query("bus_id", nvml.nvmlDeviceGetPciInfo, h)
        self.info["bus_id"] = None if pci is None else pci.busId
        mem = self._query("memory_total_mb", nvml.nvmlDeviceGetMemoryInfo, h)
        self.info["memory_total_mb"] = None if mem is None else round(mem.total / MB)
        # The limit is a setting, not a measurement: once per task is enough.
        limit_mw = self._query("power_limit_w", nvml.nvmlDeviceGetEnforcedPowerLimit, h)
        self.info["power_limit_w"] = None if limit_mw is None else limit_mw / 1000

    def _mark_lost(self, t: float, lost: _GpuLost) -> None:
        self.lost_at = t
        self.report(
            f"{self.info['name'] or 'GPU'} lost at {t:.0f} s ({lost}); no further samples from "
            "it, the other GPUs and the host are still sampled"
        )

    def sample(self, t: float) -> None:
        """Read every field once and append it at `t` (seconds since the profile started)."""
        if self.lost:
            return
        try:
            values = self._read_sample(t)
        except _GpuLost as lost:
            self._mark_lost(t, lost)
            return
        self.series.append(t, values)
        if values["util"] is not None and values["util"] < IDLE_UTIL_PERCENT:
            self.idle_samples += 1

    def _read_sample(self, t: float) -> dict[str, float | None]:
        nvml, h, q = self.nvml, self.handle, self._query
        util = q("util", nvml.nvmlDeviceGetUtilizationRates, h)
        mem = q("mem_used_mb", nvml.nvmlDeviceGetMemoryInfo, h)
        power_mw = q("power_w", nvml.nvmlDeviceGetPowerUsage, h)
        temp = q("temp_c", nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
        sm_clock = q("sm_clock_mhz", nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_SM)
        # NVML reports PCIe throughput in KB/s over the last 20 ms.
        tx = q("pcie_tx_mbps", nvml.nvmlDeviceGetPcieThroughput, h, nvml.NVML_PCIE_UTIL_TX_BYTES)
        rx = q("pcie_rx_mbps", nvml.nvmlDeviceGetPcieThroughput, h, nvml.NVML_PCIE_UTIL_RX_BYTES)
        power_w = None if power_mw is None else power_mw / 1000
        self._update_energy(t, power_w)
        self._update_processes()
        return {
            "util": None if util is None else float(util.gpu),
            "mem_util": None if util is None else float(util.memory),
            "mem_used_mb": None if mem is None else mem.used / MB,
            "power_w": power_w,
            "temp_c": None if temp is None else float(temp),
            "sm_clock_mhz": None if sm_clock is None else float(sm_clock),
            "pcie_tx_mbps": None if tx is None else tx / 1000,
            "pcie_rx_mbps": None if rx is None else rx / 1000,
            "nvlink_mbps": self._nvlink_rate(t) if self.nvlinks.active else None,
        }

    def _update_energy(self, t: float, power_w: float | None) -> None:
        # The driver's energy counter (Volta and newer) sees every millisecond; integrating our
        # 1 s power samples (trapezoid rule) is the fallback for GPUs without it.
        mj = self._query("energy_counter", self.nvml.nvmlDeviceGetTotalEnergyConsumption,
                         self.handle)
        if mj is not None:
            if self._energy_baseline_mj is None:
                self._energy_baseline_mj = mj
            self.energy_j = (mj - self._energy_baseline_mj) / 1000
        elif "energy_counter" in self.unsupported and power_w is not None:
            if self._last_power is None:
                self.energy_j = 0.0
            else:
                t0, p0 = self._last_power
                self.energy_j += (p0 + power_w) / 2 * (t - t0)
            self._last_power = (t, power_w)

    def _nvlink_rate(self, t: float) -> float | None:
        fields = [(self.nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, _ALL_LINKS),
                  (self.nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _ALL_LINKS)]
        values = self._query("nvlink_mbps", self._read_fields, fields)
        if values is None:
            return None
        kib = sum(values)  # cumulative KiB sent + received since the driver loaded
        previous, self._last_nvlink = self._last_nvlink, (t, kib)
        if previous is None or t <= previous[0]:
            return None
        return (kib - previous[1]) * 1024 / 1e6 / (t - previous[0])

    def _read_fields(self, fields: list[tuple[int, int]]) -> list[int]:
        # nvmlDeviceGetFieldValues succeeds as a whole but reports each field's own status.
        result = self.nvml.nvmlDeviceGetFieldValues(self.handle, fields)
        for value in result:
            if value.nvmlReturn != self.nvml.NVML_SUCCESS:
                raise self.nvml.NVMLError(value.nvmlReturn)
        return [value.value.ullVal for value in result]

    def _update_processes(self) -> None:
        running = self._query("processes", self.nvml.nvmlDeviceGetComputeRunningProcesses,
                              self.handle)
        for proc in running or []:
            # usedGpuMemory is None where the driver cannot attribute memory (Windows WDDM).
            used = None if proc.usedGpuMemory is None else round(proc.usedGpuMemory / MB)
            entry = self._processes.get(proc.pid)
            if entry is None:
                self._processes[proc.pid] = {"pid": proc.pid, "name": self._process_name(proc.pid),
                                             "used_memory_mb": used}
            elif used is not None and (entry["used_memory_mb"] or 0) < used:
                entry["used_memory_mb"] = used
        if len(self._processes) > MAX_PROCESSES:
            keep = sorted(self._processes.values(), key=lambda p: -(p["used_memory_mb"] or 0))
            self._processes = {p["pid"]: p for p in keep[:MAX_PROCESSES]}

    def _process_name(self, pid: int) -> str:
        try:
            return self.nvml.nvmlSystemGetProcessName(pid)
        except self.nvml.NVMLError:
            # Typical inside a container: the PID belongs to the host's PID namespace.
            return "unknown"

    def to_dict(self) -> dict[str, Any]:
        """This GPU's part of the snapshot (see GpuSampler.snapshot)."""
        data: dict[str, Any] = {"index": self.index, **self.series.to_dict()}
        if not self.nvlinks.active:
            del data["nvlink_mbps"]
        data.update(
            unsupported=list(self.unsupported),
            energy_j=None if self.energy_j is None else round(self.energy_j, 1),
            processes=[dict(p) for p in self._processes.values()],
            lost=self.lost,
            lost_at=self.lost_at,
            samples=self.series.samples,
            idle_samples=self.idle_samples,
            stats={c: {k: round(v, 1) for k, v in s.items()}
                   for c, s in self.series.stats().items()},
        )
        return data
