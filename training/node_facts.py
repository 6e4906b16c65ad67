"""This node's facts for the preflight: GPUs (name, memory, compute capability, from NVML or
torch), the driver's CUDA, NCCL, torch's build, /dev/shm, host memory and free disk; or, in
`start`, the hardware a preset declares. ``training/preflight.py`` judges a plan against them.

    facts = gather_facts(gpus_requested=4, output_dir="/tmp/out")       # here (imports torch)
    facts = gather_node_facts(4, "/tmp/out")        # the train step: in a subprocess when GPUs are about
    python -m training.node_facts --gpus 4 --output-dir /tmp/out       # the facts as JSON
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.arguments import flash_attn_version
from training.memory_estimate import GIB, MIB

# A container's /dev/shm is 64 MiB unless something mounts a bigger one (Docker's --shm-size
# default; containerd's too). Metaflow's @kubernetes mounts a memory-backed /dev/shm of
# resources.shared_memory MiB only when that is set.
CONTAINER_DEFAULT_SHM = 64 * MIB


class NodeFactsError(RuntimeError):
    """The facts could not be read (the subprocess that reads them failed)."""


@dataclass(frozen=True)
class GpuFacts:
    """One GPU as the training processes see it (or as the config declares it)."""

    name: str
    compute_capability: tuple[int, int] | None = None
    total_memory_bytes: int | None = None



@dataclass
class HardwareFacts:
    """Everything a rule needs, as plain values; None means "not known here"."""

    gpus_requested: int  # per node (the config's resources.gpu)
    gpus: list[GpuFacts] | None  # visible to torch on this node; None: not known (start)
    num_nodes: int = 1
    cuda_visible_devices: str | None = None
    nvml_gpu_count: int | None = None  # what the driver sees, CUDA_VISIBLE_DEVICES or not
    driver_version: str | None = None
    driver_cuda: tuple[int, int] | None = None  # newest CUDA the driver supports (NVML)
    torch_version: str | None = None  # None: not known (start)
    torch_cuda: str | None = None  # torch.version.cuda; None for a CPU build of torch
    torch_arch_list: list[str] | None = None  # torch.cuda.get_arch_list(): sm_80, compute_90...
    nccl_version: tuple[int, ...] | None = None  # None: this torch has no NCCL (or not known)
    shm_bytes: int | None = None  # size of /dev/shm
    disk_free_bytes: int | None = None  # free at the output directory
    host_memory_bytes: int | None = None  # RAM this container may use
    flash_attn_version: str | None = None  # the flash-attn package; None: not installed (or start)
    output_dir: str | None = None
    notes: list[str] = field(default_factory=list)  # why a fact is missing (NVML error, ...)



def gather_facts(gpus_requested: int, output_dir: str | os.PathLike, num_nodes: int = 1, *,
                 cuda: bool = True) -> HardwareFacts:
    """The real facts of this node. Works without a GPU or driver (empty GPU list, None versions).

    GPU facts come from torch: the GPUs the trainer will see, CUDA_VISIBLE_DEVICES applied.
    Reading device properties initialises CUDA in this process but allocates nothing on a GPU;
    the trainer runs in processes of its own (fork + exec), which inherit no CUDA state.
    ``cuda=False`` (a node whose driver shows no GPU): no GPUs, and torch's build read from its
    files instead of imported.
    """
    notes: list[str] = []
    gpus = []
    if cuda:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                gpus.append(GpuFacts(props.name, (props.major, props.minor), int(props.total_memory)))
        torch_version, torch_cuda = torch.__version__, torch.version.cuda
    else:
        torch_version, torch_cuda = torch_build()
    nvml_count, driver_version, driver_cuda = _nvml_facts(notes)
    return HardwareFacts(
        gpus_requested=gpus_requested,
        gpus=gpus,
        num_nodes=num_nodes,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        nvml_gpu_count=nvml_count,
        driver_version=driver_version,
        driver_cuda=driver_cuda,
        torch_version=torch_version,
        torch_cuda=torch_cuda,
        torch_arch_list=torch.cuda.get_arch_list() if gpus else None,
        nccl_version=_nccl_version() if cuda else None,
        shm_bytes=_filesystem_bytes("/dev/shm", free=False),
        disk_free_bytes=_filesystem_bytes(_existing_parent(Path(output_dir)), free=True),
        host_memory_bytes=_host_memory_bytes(),
        flash_attn_version=flash_attn_version(),
        output_dir=str(output_dir),
        notes=notes,
    )



def torch_build() -> tuple[str | None, str | None]:
    """``(torch.__version__, torch.version.cuda)`` of the installed torch, read from its
    ``torch/version.py`` without importing torch (~1.5 s on 2 cores); Nones without torch."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    values: dict[str, Any] = {}
    source = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    for node in ast.parse(source.read_text()).body:  # parsed, never executed
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    values[target.id] = node.value.value
    return values.get("__version__"), values.get("cuda")



def _nvml_facts(notes: list[str]) -> tuple[int | None, str | None, tuple[int, int] | None]:
    """GPU count, driver version and driver CUDA version from NVML; Nones when NVML cannot tell."""
    try:
        import pynvml
    except ImportError:
        notes.append("the nvidia-ml-py package (module pynvml) is not installed")
        return None, None, None
    from gpu_profile.nvml_errors import no_gpu_reason

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        notes.append(no_gpu_reason(pynvml, err))
        return None, None, None
    try:
        count = pynvml.nvmlDeviceGetCount()
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # CUDA 12.4 is 12040
        return count, str(driver), (cuda // 1000, cuda % 1000 // 10)
    except pynvml.NVMLError as err:
        notes.append(f"NVML could not read the driver versions: {err}")
        return None, None, None
    finally:
        pynvml.nvmlShutdown()



def _nccl_version() -> tuple[int, ...] | None:
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        return None
    version = torch.cuda.nccl.version()  # (2, 21, 5) in current builds; an int in old ones
    return tuple(version) if isinstance(version, tuple) else (version,)



def _existing_parent(path: Path) -> Path:
    """The output directory may not exist yet: its nearest existing ancestor has the same disk."""
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path



def _filesystem_bytes(path: str | Path, *, free: bool) -> int | None:
    try:
        stat = os.statvfs(path)
    except OSError:  # no /dev/shm (macOS), or not readable
        return None
    return (stat.f_bavail if free else stat.f_blocks) * stat.f_frsize



def _host_memory_bytes() -> int | None:
    """Physical RAM, or the container's cgroup limit when lower (Kubernetes' memory limit)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():  # "max" (v2) means no limit; v1 writes a huge number instead
            total = min(total, int(limit))
    return total



def declared_facts(
    *,
    gpus: int,
    gpu_name: str | None = None,
    gpu_memory_gib: float | None = None,
    compute_capability: tuple[int, int] | None = None,
    shared_memory_mb: int | None = None,
    memory_mb: int | None = None,
    num_nodes: int = 1,
) -> HardwareFacts:
    """Facts as the config declares them, for ``check(..., where="start")``.

    ``shared_memory_mb`` and ``memory_mb`` are the config's resources (MiB, Metaflow's unit).
    Without ``shared_memory_mb`` the container keeps its 64 MiB /dev/shm (@kubernetes mounts one
    only when it is set). GPU facts left out are not judged.
    """
    gpu_list: list[GpuFacts] | None = []
    if gpus and (gpu_name or gpu_memory_gib or compute_capability):
        memory = None if gpu_memory_gib is None else int(gpu_memory_gib * GIB)
        gpu_list = [GpuFacts(gpu_name or "GPU", compute_capability, memory)] * gpus
    elif gpus:
        gpu_list = None
    return HardwareFacts(
        gpus_requested=gpus,
        gpus=gpu_list,
        num_nodes=num_nodes,
        shm_bytes=CONTAINER_DEFAULT_SHM if shared_memory_mb is None else shared_memory_mb * MIB,
        host_memory_bytes=None if memory_mb is None else memory_mb * MIB,
    )



def json_ready(value: Any) -> Any:
    """Tuples to lists, so the record survives a JSON round trip unchanged."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value



def facts_from_json(data: dict[str, Any]) -> HardwareFacts:
    """The inverse of ``asdict(gather_facts(...))`` after a JSON round trip."""
    data = dict(data)
    if data.get("gpus") is not None:
        data["gpus"] = [GpuFacts(g["name"], tuple(g["compute_capability"]) if g["compute_capability"] else None,
                                 g["total_memory_bytes"]) for g in data["gpus"]]
    for key in ("driver_cuda", "nccl_version"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return HardwareFacts(**data)



def gather_node_facts(gpus_requested: int, output_dir: str | os.PathLike, num_nodes: int = 1) -> HardwareFacts:
    """This node's facts for the train step, read where it is cheapest and safe.

    With GPUs requested or seen by the driver: in a short-lived process of this interpreter
    (``gather_facts_in_subprocess``), so that the step process never initialises CUDA itself.
    Without either (a CPU run) there is no CUDA to initialise: here, without importing torch,
    which spares a process and torch's import (~1.5 s of every CPU run).
    """
    if gpus_requested == 0 and not _nvml_facts([])[0]:
        return gather_facts(gpus_requested, output_dir, num_nodes, cuda=False)
    return gather_facts_in_subprocess(gpus_requested, output_dir, num_nodes)



def gather_facts_in_subprocess(gpus_requested: int, output_dir: str | os.PathLike, num_nodes: int = 1) -> HardwareFacts:
    """``gather_facts`` in a short-lived process of this interpreter.

    The step process then never initialises CUDA itself (no context on GPU 0 held for the whole
    training), and the facts are those of the environment the trainer processes will get.
    """
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "training.node_facts", "--gpus", str(gpus_requested), "--output-dir", str(output_dir),
         "--nodes", str(num_nodes)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if result.returncode != 0:
        raise NodeFactsError(f"preflight: could not read this node's facts:\n{result.stderr[-2000:]}")
    return facts_from_json(json.loads(result.stdout))



def main(argv: list[str] | None = None) -> None:
    """``python -m training.node_facts --gpus 4 --output-dir /tmp/out``: this node's facts as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs the run requests on this node.")
    parser.add_argument("--output-dir", default=".", help="Where checkpoints will be written (free disk).")
    parser.add_argument("--nodes", type=int, default=1, help="Nodes in the run.")
    args = parser.parse_args(argv)
    print(json.dumps(json_ready(asdict(gather_facts(args.gpus, args.output_dir, args.nodes)))))


if __name__ == "__main__":
    main()
