"""Sample every NVIDIA GPU of the node and the host CPU/RAM in a background thread.

    sampler = GpuSampler(interval=1.0)
    sampler.start()                  # first sample at once, then one every `interval` seconds
    ...                              # training runs; snapshot() any time for a live card
    sampler.stop()
    data = sampler.snapshot()        # the `gpu_profile_data` artifact (JSON-serializable)

What is read (through NVML, the library behind nvidia-smi, without running nvidia-smi):
once per task the driver and CUDA driver versions, each GPU's name, UUID, PCI bus id, memory
size and power limit, and the GPU-to-GPU topology (`nvidia-smi topo -m`); every `interval`
seconds each GPU's utilization, memory, power, temperature, SM clock, PCIe and NVLink
throughput and processes, plus host CPU % and RAM (psutil). GPU indices are NVML's (PCI bus
order, as in nvidia-smi) and cover the whole node: CUDA_VISIBLE_DEVICES does not apply to NVML.

Nothing here fails the step. Without NVML (no driver, no GPU, a CPU laptop) the host is still
sampled and `status` says why there is no GPU; a lost GPU stops being sampled while the rest go
on; a query a GPU cannot answer is listed under that GPU's `unsupported`.

Memory and artifact size are bounded (see gpu_profile.series). Each series keeps at most
`max_points` points whatever the run length: a 30 h run at 1 s on 8 GPUs is 108,000 samples per
GPU but at most 2048 points. Per GPU the snapshot then holds at most 2048 x (t + 9 columns) =
20,480 numbers, each rounded to one decimal (at most 9 characters, "1234567.8") plus ", ":
<= 225,280 bytes of JSON, so <= 1.80 MB for 8 GPUs, + 2048 x 3 x 11 = 68 kB for the host, + at
most 51 status lines and 32 processes per GPU: under 1.9 MB. Measured on that 30 h / 8 GPU case
with realistic values (tests/gpu_profile/test_profile_sampler.py): 1.23 MB.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from gpu_profile.device import IDLE_UTIL_PERCENT, GpuDevice
from gpu_profile.nvml_errors import no_gpu_reason
from gpu_profile.series import Series
from gpu_profile.topology import nvlink_peers, topology_matrix

GB = 1024**3
# Status lines are for people; past this many, more of them would only bloat the artifact.
MAX_STATUS_MESSAGES = 50


class GpuSampler:
    """Background NVML + psutil sampler; see the module docstring.

    `nvml` is the pynvml module (None imports it); tests pass a double. `clock` gives the
    seconds used for the time axis (monotonic, so a wall-clock jump cannot bend it).
    """

    def __init__(
        self,
        interval: float = 1.0,
        nvml: Any = None,
        max_points: int = 2048,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        if interval <= 0:
            raise ValueError(f"GpuSampler interval must be positive seconds, got {interval}")
        self.interval = interval
        self.max_points = max_points
        self._clock = clock
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._status: list[str] = []
        self.started_at = time.time()
        self._t0 = clock()

        self._host = Series(("cpu_percent", "ram_used_gb"), max_points,
                            peak_columns=("ram_used_gb",))
        self._ram_total_gb = psutil.virtual_memory().total / GB
        # The first cpu_percent() call has no previous reading to compare with and returns 0.
        psutil.cpu_percent(interval=None)

        self._nvml: Any = None
        self.no_gpu_reason: str | None = None
        self.driver_version: str | None = None
        self.cuda_driver_version: str | None = None
        self._devices: list[GpuDevice] = []
        self._topology: dict[str, list] | None = None
        self._open_nvml(nvml)

    def _report(self, message: str) -> None:
        # Callers hold the lock (or run in __init__, before the thread exists).
        if message in self._status or len(self._status) > MAX_STATUS_MESSAGES:
            return
        if len(self._status) == MAX_STATUS_MESSAGES:
            message = "Further status messages were dropped."
        self._status.append(message)

    def _no_gpu(self, reason: str) -> None:
        self.no_gpu_reason = reason
        self._report(f"No NVIDIA GPU visible: {reason}")

    def _open_nvml(self, nvml: Any) -> None:
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                self._no_gpu("the nvidia-ml-py package (module pynvml) is not installed")
                return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            self._no_gpu(no_gpu_reason(nvml, err))
            return
        self._nvml = nvml
        self.driver_version = self._system_query("driver version", nvml.nvmlSystemGetDriverVersion)
        cuda = self._system_query("CUDA driver version", nvml.nvmlSystemGetCudaDriverVersion)
        if cuda is not None:
            # NVML encodes CUDA 12.4 as 12040.
            self.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        count = self._system_query("GPU count", nvml.nvmlDeviceGetCount)
        if not count:
            self._no_gpu("NVML is loaded but sees no GPU on this node")
            return
        self._devices = [GpuDevice(nvml, i, self.max_points, self._report) for i in range(count)]
        bus_ids = [d.info["bus_id"] for d in self._devices]
        for d in self._devices:
            if not d.lost:
                d.nvlinks = nvlink_peers(nvml, d.handle, bus_ids, d.report)
        self._topology = topology_matrix(
            nvml, [d.handle for d in self._devices], [d.nvlinks for d in self._devices],
            self._report,
        )

    def _system_query(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._nvml.NVMLError as err:
            self._report(f"NVML could not read the {what}: {err}")
            return None

    def sample_once(self) -> None:
        """Take one sample of every GPU and the host now (the thread calls this each tick)."""
        with self._lock:
            if self._closed:
                return
            t = self._clock() - self._t0
            ram = psutil.virtual_memory()
            self._host.append(t, {
                "cpu_percent": psutil.cpu_percent(interval=None),
                # total - available: memory that new allocations cannot get (page cache can).
                "ram_used_gb": (ram.total - ram.available) / GB,
            })
            for device in self._devices:
                device.sample(t)

    def start(self) -> None:
        """Start the daemon sampling thread; a second call while it runs does nothing."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gpu_profile-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            try:
                self.sample_once()
            except Exception as err:
                # An uncaught error would end the thread silently and freeze the profile;
                # profiling must never fail the training step, so say so and keep sampling.
                with self._lock:
                    self._report(f"Sampling failed ({type(err).__name__}: {err}); still trying")
            next_at = max(next_at + self.interval, time.monotonic())
            if self._stop_event.wait(next_at - time.monotonic()):
                return

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and shut NVML down; safe to call more than once."""
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Stuck inside an NVML call (a hung GPU) while holding the lock: shutting NVML
                # down under it is undefined, and the daemon thread ends with the process.
                return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError as err:
                    self._report(f"nvmlShutdown failed: {err}")

    def snapshot(self) -> dict[str, Any]:
        """Everything sampled so far as a JSON-serializable dict (the artifact); thread-safe."""
        with self._lock:
            return {
                "num_gpus": len(self._devices),
                "status": list(self._status),
                "no_gpu_reason": self.no_gpu_reason,
                "started_at": self.started_at,
                "interval": self.interval,
                "idle_util_percent": IDLE_UTIL_PERCENT,
                "driver_version": self.driver_version,
                "cuda_driver_version": self.cuda_driver_version,
                "devices": [dict(d.info) for d in self._devices],
                "topology": self._topology,
                "gpus": [d.to_dict() for d in self._devices],
                "host": {
                    **self._host.to_dict(),
                    "ram_total_gb": round(self._ram_total_gb, 1),
                    "stats": {c: {k: round(v, 1) for k, v in s.items()}
                              for c, s in self._host.stats().items()},
                },
            }
