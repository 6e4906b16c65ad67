"""`import pynvml` answered by a simulated 4-GPU node, for flow runs in tests (no GPU needed).

Put this folder and tests/gpu_profile on PYTHONPATH of the flow's process: the step's sampler
then imports this module, which loads the real pynvml (for its constants and exception classes)
and puts a FakeNvml node in its place in sys.modules.
"""

import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_real_path = next(
    os.path.join(entry, "pynvml.py")
    for entry in sys.path
    if entry and os.path.abspath(entry) != _here and os.path.isfile(os.path.join(entry, "pynvml.py"))
)
_spec = importlib.util.spec_from_file_location("pynvml", _real_path)
_real = importlib.util.module_from_spec(_spec)
sys.modules["pynvml"] = _real
_spec.loader.exec_module(_real)

from fake_nvml import FakeNvml  # noqa: E402  (needs the real pynvml in sys.modules first)

node = FakeNvml(
    4,
    nvlinks={(0, 1): 4, (2, 3): 4},
    pcie_levels={(a, b): _real.NVML_TOPOLOGY_SYSTEM for a in (0, 1) for b in (2, 3)},
    unsupported={(3, "nvmlDeviceGetPowerUsage")},
    process_names={os.getpid(): "python"},
)
for gpu, busy in zip(node.gpus, (97, 91, 12, 0), strict=True):
    gpu.util = busy
    gpu.mem_used_mb = 20_000 + 10_000 * gpu.index
    gpu.power_w = 80 + 3 * busy
    gpu.processes = {os.getpid(): gpu.mem_used_mb}
sys.modules["pynvml"] = node
