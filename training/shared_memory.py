"""DeepSpeed's CPU all-reduce segments in /dev/shm, and removing them.

DeepSpeed's CPU communication op (deepspeed_shm_comm_op, used when every rank is on one machine,
a single rank too) creates a 66 MB POSIX shared-memory segment per rank and never unlinks it, so
each local run kept 66 MB of RAM per rank in /dev/shm until reboot: 342 segments, 23 GB, had
piled up on a development machine, which then ran out of memory. Unlinking keeps the mappings
that ranks still hold. The names are the ones deepspeed/ops/csrc/cpu/comm/shm.cpp builds:
``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``.

    remove_deepspeed_segments("29500", rank="0", addr="127.0.0.1")   # one rank's, at its exit
    remove_deepspeed_segments("29500")                                # every rank of a launch

The op itself is compiled by torch's JIT the first time a Python environment needs it (40-90 s
on 2 cores, silent): :func:`cpu_comm_op_path` says where it lands, so that the trainer can say so.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def remove_deepspeed_segments(port: str, *, rank: str = "*", addr: str = "*") -> list[str]:
    """Unlink the segments of the launch on ``port`` (``rank``/``addr``: one, or any); returns
    the names removed. A no-op off Linux, where DeepSpeed does not use /dev/shm."""
    if not sys.platform.startswith("linux"):
        return []
    removed = []
    for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"):
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()
            removed.append(segment.name)
    return removed


def cpu_comm_op_path() -> Path:
    """Where torch's JIT keeps DeepSpeed's compiled CPU communication op for this environment
    (``$TORCH_EXTENSIONS_DIR``, as the flow sets it, or torch's default folder); the trainer
    announces the one-time build when the file is missing."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    from torch.utils.cpp_extension import get_default_build_root

    name = ShareMemCommBuilder().name
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name / f"{name}.so"
