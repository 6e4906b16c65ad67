"""Preflight: can this hardware and environment run the chosen training? Refuse early if not.

The flow checks twice. In ``start``, on the launching machine (often a laptop with no GPU), only
what the config declares can be judged: the precision against the preset's GPU, /dev/shm against
``resources.shared_memory``, the memory-fit estimate against the preset's GPU memory. In
``train``, on the GPU node, before the trainer starts, every rule runs on the node's real facts.
Each problem comes back as a :class:`Finding` that names what is wrong and the fix; errors stop
the run, warnings are printed.

    from training.memory_estimate import model_size_from_config
    from training.node_facts import declared_facts, gather_facts
    from training.preflight import check, plan_from_args, preflight_record, require_ok

    plan = plan_from_args(model_args, data_args, train_args,
                          **model_size_from_config(AutoConfig.from_pretrained(base_model)))
    # start: facts from the config (no GPU here)
    facts = declared_facts(gpus=4, gpu_name="A100 80GB", gpu_memory_gib=80,
                           compute_capability=(8, 0), shared_memory_mb=32768, memory_mb=245760)
    findings = check(facts, plan, where="start")
    # train: the node's real facts
    facts = gather_facts(gpus_requested=4, output_dir="/tmp/out")
    findings = check(facts, plan, where="train")
    record = preflight_record(facts, plan, findings)   # JSON-serialisable: artifact and card
    require_ok(findings)                               # PreflightError listing every error

The plan itself is plain data in :mod:`training.plan`; the memory and disk estimates (what each
byte is for) and the model's shape are in :mod:`training.memory_estimate`; this module holds the
node's facts and the rules that judge the plan against them.

Messages use the trainer's flags (``--precision``, ``--deepspeed``,
``--per_device_train_batch_size``...), like :func:`training.arguments.find_problems`, so the flow's
``in_flow_terms`` renames them to its own parameters and config keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from training.arguments import (
    DataArguments,
    ModelArguments,
    TrainArguments,
    check_attention,
    check_deepspeed_config,
    resolve_precision,
)
from training.memory_estimate import (
    GIB,
    MIB,
    checkpoint_disk_bytes,
    estimate_memory,
    format_gib,
    memory_options,
    trainable_parameters,
)
from training.node_facts import GpuFacts, HardwareFacts, json_ready
from training.paths import resolve_repo_path
from training.plan import LinearLayers, TrainingPlan

# --- thresholds, each with its reason -----------------------------------------------------------

# /dev/shm wanted per GPU on a multi-GPU node. NCCL's shared-memory transport (between GPUs
# without P2P/NVLink, common on cloud PCIe nodes) allocates its buffers there: NCCL_BUFFSIZE
# (4 MiB by default) per channel and direction of every connection, tens of MiB to a few hundred
# per rank; PyTorch's DataLoader workers hand batches over through it too. NVIDIA's container
# guides run with --shm-size=1g or --ipc=host, and PyTorch's tutorial CI raised its GPU
# containers to 2 GB after NCCL crashed in ncclShmOpen under the 64 MB default
# (pytorch/tutorials#2475). 1 GiB per GPU keeps that margin at 2-8 GPUs; the GPU presets
# declare 8 GiB per GPU.
SHM_PER_GPU = 1 * GIB

WHERE = ("start", "train")


# --- what the rules look at ---------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    code: str  # short id: "precision", "gpu-memory", ...
    message: str  # the problem and its fix


class PreflightError(ValueError):
    """The hardware or environment cannot run the planned training; the message lists why."""


# --- building facts and plans -------------------------------------------------------------------


def read_zero_settings(deepspeed_config: str) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) of a DeepSpeed JSON config.

    An empty path (no DeepSpeed) is stage 0. A bad file raises ValueError with
    ``check_deepspeed_config``'s message.
    """
    import json

    if not deepspeed_config:
        return 0, False, False
    if problems := check_deepspeed_config(deepspeed_config):
        raise ValueError(problems[0])
    zero = json.loads(resolve_repo_path(deepspeed_config).read_text()).get("zero_optimization", {})

    def offloaded(key: str) -> bool:  # "cpu" or "nvme": off the GPU either way
        return (zero.get(key) or {}).get("device", "none") != "none"

    return int(zero.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param")


def plan_from_args(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainArguments,
    *,
    num_parameters: int,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    vocab_size: int | None = None,
    largest_layer_params: int | None = None,
    linear_layers: LinearLayers | None = None,
) -> TrainingPlan:
    """The plan of the trainer's parsed arguments (``training.arguments.parse_args``)."""
    stage, offload_optimizer, offload_param = read_zero_settings(train_args.deepspeed)
    return TrainingPlan(
        num_parameters=num_parameters,
        precision=train_args.precision,
        zero_stage=stage,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        deepspeed_config=train_args.deepspeed,
        per_device_batch_size=train_args.per_device_train_batch_size,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        max_seq_length=data_args.max_seq_length,
        gradient_checkpointing=model_args.gradient_checkpointing,
        attn_implementation=model_args.attn_implementation,
        save_total_limit=train_args.save_total_limit,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=vocab_size,
        largest_layer_params=largest_layer_params,
        peft=model_args.peft,
        lora_r=model_args.lora_r,
        lora_target_modules=model_args.lora_target_modules,
        merge_adapter=model_args.merge_adapter,
        linear_layers=linear_layers,
    )


# --- the rules ----------------------------------------------------------------------------------


def check(facts: HardwareFacts, plan: TrainingPlan, *, where: str) -> list[Finding]:
    """Every finding for ``plan`` on ``facts``; ``where`` is "start" (declared facts) or "train".

    In ``start`` only the rules the config can decide run (precision, /dev/shm, memory fit);
    on the node (``train``) all of them: GPU count, precision, CUDA driver, GPU architecture,
    NCCL, /dev/shm, disk, memory fit.
    """
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")
    rules = (_precision, _attention, _shared_memory, _memory_fit)
    if where == "train":
        rules = (_gpu_count, _precision, _attention, _cuda_driver, _gpu_arch, _nccl, _shared_memory, _disk,
                 _memory_fit)
    return [finding for rule in rules for finding in rule(facts, plan, where)]


def _error(code: str, message: str) -> Finding:
    return Finding("error", code, message)


def _warning(code: str, message: str) -> Finding:
    return Finding("warning", code, message)


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _gpu_count(facts: HardwareFacts, plan: TrainingPlan, where: str) -> list[Finding]:
    visible, requested = len(facts.gpus or []), facts.gpus_requested
    if visible < requested:
        why = ""
        if facts.torch_cuda is None:
            why = (f" torch {facts.torch_version} is a CPU build: install a CUDA build of torch in "
                   "the image (on Linux x86_64 the PyPI torch wheel is one).")
        elif facts.nvml_gpu_count is None:
            why = f" The NVIDIA driver does not answer ({'; '.join(facts.notes) or 'NVML failed'})."
        elif facts.cuda_visible_devices is not None:
            why = (f" The driver sees {facts.nvml_gpu_count}; CUDA_VISIBLE_DEVICES="
                   f"{facts.cuda_visible_devices!r} hides the rest.")
        return [_error("gpu-count", (
            f"{_gpus(requested)} requested (resources.gpu) but {visible} visible to torch on this node."
            f"{why} Run on a node with {requested} GPUs, or set resources.gpu to {visible} and raise "
            "--gradient_accumulation_steps to keep the global batch."
        ))]
    if visible > requested:
        return [_warning("gpu-count", (
            f"{visible} GPUs visible but {requested} requested (resources.gpu): the trainer starts "
            f"one process per visible GPU, so the global batch is {visible} x "
            f"{plan.per_device_batch_size} x {plan.gradient_accumulation_steps}. Set "
            f"CUDA_VISIBLE_DEVICES to {requested} GPUs or resources.gpu to {visible}."
        ))]
    return []


def _weakest_gpu(facts: HardwareFacts, where: str) -> tuple[bool, int | None, GpuFacts | None] | None:
    """(CUDA or not, index and facts of the GPU with the lowest compute capability, None when
    unknown) as the precision and attention rules judge them; None when they cannot judge: no GPU
    on a node that asked for some, which the gpu-count error explains."""
    cuda = facts.gpus_requested > 0 if where == "start" else bool(facts.gpus)
    if where == "train" and facts.gpus_requested > 0 and not cuda:
        return None
    gpus = [(i, g) for i, g in enumerate(facts.gpus or []) if g.compute_capability is not None]
    # The oldest GPU decides: every rank runs the same precision and the same kernels.
    index, weakest = min(gpus, key=lambda ig: ig[1].compute_capability) if gpus else (None, None)
    return cuda, index, weakest


def _precision(facts: HardwareFacts, plan: TrainingPlan, where: str) -> list[Finding]:
    if (judged := _weakest_gpu(facts, where)) is None:
        return []
    cuda, index, weakest = judged
    if cuda and weakest is None:
        return []  # the GPU's compute capability is not known here: decided on the node
    capability = weakest.compute_capability if weakest else None
    try:
        resolve_precision(plan.precision, cuda=cuda, compute_capability=capability)
    except ValueError as err:
        if weakest is None or plan.precision != "bf16":
            return [_error("precision", str(err))]
        which = "The preset's GPU" if where == "start" else f"GPU {index}"
        return [_error("precision", (
            f"{which} is a {weakest.name} (compute capability {capability[0]}.{capability[1]}). "
            f"{err} The v100x8 preset (flows/configs/v100x8.json) trains in fp16 on such GPUs."
        ))]
    return []


def _attention(facts: HardwareFacts, plan: TrainingPlan, where: str) -> list[Finding]:
    """flash_attention_2: the package (on the node only), a GPU of compute capability 8.0+, bf16/fp16."""
    if plan.attn_implementation != "flash_attention_2" or (judged := _weakest_gpu(facts, where)) is None:
        return []
    cuda, _, weakest = judged
    capability = weakest.compute_capability if weakest else None
    try:
        precision = resolve_precision(plan.precision, cuda=cuda, compute_capability=capability)
    except ValueError:
        return []  # the precision rule reports it
    # In start the image's packages are not known: only the node can tell (None would mean "missing").
    installed = facts.flash_attn_version if where == "train" else "not judged in start"
    return [_error("attention", problem) for problem in check_attention(
        plan.attn_implementation, cuda=cuda, compute_capability=capability, precision=precision,
        flash_attn_version=installed)]


def _cuda_version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def _cuda_driver(facts: HardwareFacts, plan: TrainingPlan, where: str) -> list[Finding]:
    # NVIDIA's CUDA compatibility guide: a driver runs programs built with its own CUDA version or
    # older ones. Across major versions nothing newer runs: a CUDA 12 build of torch on a driver
    # for CUDA 11 fails at the first CUDA call ("driver version is insufficient"): an error.
    # Within one major version, "minor version compatibility" lets a 12.x build run on any driver
    # for 12.0+ (>= 525.60.13 on Linux), but features of the newer minor version are missing:
    # such calls fail with cudaErrorCallRequiresNewerDriver, and PTX newer than the driver cannot
    # be JIT-compiled (so a GPU without prebuilt kernels in the wheel fails). That is a warning:
    # most training runs, and the fix is known.
    if not facts.gpus or facts.torch_cuda is None or facts.driver_cuda is None:
        return []
    built, driver = _cuda_version(facts.torch_cuda), facts.driver_cuda
    the_driver = f"the driver {facts.driver_version}" if facts.driver_version else "the driver"
    versions = (f"torch {facts.torch_version} is built with CUDA {built[0]}.{built[1]}; {the_driver} "
                f"supports CUDA up to {driver[0]}.{driver[1]}")
    if driver[0] < built[0]:
        return [_error("cuda-driver", (
            f"{versions}. The driver must support the CUDA version torch was built with, and CUDA "
            f"{built[0]} programs do not run on a CUDA {driver[0]} driver. Upgrade the node's NVIDIA "
            f"driver to one for CUDA {built[0]}.{built[1]}+, or use an image whose torch is built "
            f"for CUDA {driver[0]}.x."
        ))]
    if driver[0] == built[0] and driver[1] < built[1]:
        return [_warning("cuda-driver", (
            f"{versions}. It runs under CUDA minor version compatibility, without the features "
            f"of CUDA {built[0]}.{built[1]} (PTX JIT and newer APIs fail). Upgrade the driver to "
            f"one for CUDA {built[0]}.{built[1]}+, or use torch built for CUDA {driver[0]}.{driver[1]} "
            "or older."
        ))]
    return []


def _runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether torch's compiled ``arch`` (sm_80, sm_90a, compute_90) runs on ``capability``."""
    kind, _, number = arch.partition("_")
    specific = number.endswith(("a", "f"))  # sm_90a: that exact GPU only
    digits = number.rstrip("af")
    if not digits.isdigit():
        return False
    built = (int(digits[:-1]), int(digits[-1]))
    if kind == "compute":  # PTX: the driver JIT-compiles it for any newer GPU
        return capability >= built
    if specific:
        return capability == built
    return capability[0] == built[0] and capability[1] >= built[1]  # SASS: same major, newer minor


def _gpu_arch(facts: HardwareFacts, plan: TrainingPlan, where: str) -> list[Finding]:
    if not facts.gpus or not facts.torch_arch_list:
        return []
    unsupported = [(i, g) for i, g in enumerate(facts.gpus) if g.compute_capability is not None
                   and not any(_runs_on(arch, g.compute_capability) for arch in facts.torch_arch_list)]
    if not unsupported:
        return []
    index, gpu = unsupported[0]  # the same fix for every GPU
    major, minor = gpu.compute_capability
    return [_error("gpu-arch", (
        f"GPU {index} ({gpu.name}) has compute capability {major}.{minor}, and torch "
        f"{facts.torch_version} has no kernels for it (built for "
        f"{', '.join(facts.torch_arch_list)}). Install a torch build whose "
        f"torch.cuda.get_arch_list() includes sm_{major}{minor} (PyTorch's wheels for an older "
        "CUDA, e.g. its cu126 index, cover older GPUs)."
    ))]


def _nccl(facts: HardwareFacts, plan: TrainingPlan, where: str) -> list[Finding]:
    gpus = facts.gpus_requested * facts.num_nodes
    if gpus > 1 and facts.gpus and facts.nccl_version is None:
        return [_error("nccl", (
            f"{gpus} GPUs train together through NCCL (DeepSpeed's collectives), and torch "
            f"{facts.torch_version} has no NCCL (torch.distributed.is_nccl_available() is False). "
            "Install a CUDA build of torch for Linux, which bundles NCCL, or run on 1 GPU."
        ))]
    return []


def _shared_memory(facts: HardwareFacts, plan: TrainingPlan, where: str) -> list[Finding]:
    gpus = facts.gpus_requested if where == "start" else max(facts.gpus_requested, len(facts.gpus or []))
    if gpus < 2 or facts.shm_bytes is None:
        return []
    needed = gpus * SHM_PER_GPU
    if facts.shm_bytes >= needed:
        return []
    have = ("With the config's resources.shared_memory, /dev/shm will be" if where == "start"
            else "/dev/shm on this node is")
    return [_error("shared-memory", (
        f"{have} {facts.shm_bytes // MIB} MiB; {gpus} GPUs on one node need at least "
        f"{needed // MIB} MiB (NCCL's shared-memory transport and DataLoader workers use it; a "
        f"container's default is 64 MiB). Set resources.shared_memory in the config to "
        f"{needed // MIB} MiB or more (Metaflow's @kubernetes mounts it as /dev/shm; the a100x4 "
        "preset uses 32768); with plain Docker, pass --shm-size or --ipc=host."
    ))]


def _disk(facts: HardwareFacts, plan: TrainingPlan, where: str) -> list[Finding]:
    if facts.disk_free_bytes is None:
        return []
    one, needed = checkpoint_disk_bytes(plan, cuda=bool(facts.gpus))
    if facts.disk_free_bytes >= needed:
        return []
    trained = "weights" if plan.peft == "none" else "fp32 adapter weights"
    return [_error("disk", (
        f"{format_gib(facts.disk_free_bytes)} free at {facts.output_dir}, and the run needs "
        f"{format_gib(needed)}: {plan.save_total_limit} + 1 checkpoints of {format_gib(one)} ({trained} + 12 "
        "bytes/param of Adam state) and the final model. Give the node a bigger disk (or a volume "
        f"at the output directory), or lower --save_total_limit (each one kept costs {format_gib(one)})."
    ))]


def _memory_fit(facts: HardwareFacts, plan: TrainingPlan, where: str) -> list[Finding]:
    gpus = [(i, g) for i, g in enumerate(facts.gpus or []) if g.total_memory_bytes]
    if not gpus or facts.gpus_requested < 1:
        return []
    per_node = facts.gpus_requested
    index, smallest = min(gpus, key=lambda ig: ig[1].total_memory_bytes)
    capacity = smallest.total_memory_bytes
    which = (f"the preset's GPU ({smallest.name}, {format_gib(capacity)})" if where == "start"
             else f"GPU {index} ({smallest.name}) has {format_gib(capacity)}")
    estimate = estimate_memory(plan, per_node, facts.num_nodes)
    findings = []
    if estimate.per_gpu > capacity:
        options = memory_options(plan, per_node, facts.num_nodes, capacity)
        findings.append(_error("gpu-memory", (
            f"Training does not fit in GPU memory: estimated {estimate.describe()} for "
            f"{_method_words(plan)} with {_zero_words(plan)} on {_gpus(per_node * facts.num_nodes)}, batch "
            f"{plan.per_device_batch_size} x {plan.max_seq_length} tokens; {which}. "
            "Options, each on top of the ones before:\n" + "\n".join(options)
        )))
    offloaded = plan.offload_optimizer or plan.offload_param
    if offloaded and facts.host_memory_bytes is not None and estimate.cpu > facts.host_memory_bytes:
        findings.append(_error("cpu-memory", (
            f"{_zero_words(plan)} needs ~{format_gib(estimate.cpu)} of host RAM on each node for what it "
            f"keeps there (DeepSpeed's estimate), and "
            f"{'the config declares' if where == 'start' else 'this container has'} "
            f"{format_gib(facts.host_memory_bytes)}. Raise resources.memory (MiB) to "
            f"{-(-estimate.cpu // MIB)} or more, or offload less if the GPUs have room "
            "(ds_configs/zero3.json keeps everything on them)."
        )))
    return findings


def _method_words(plan: TrainingPlan) -> str:
    """Like "full fine-tuning" or "QLoRA (r=16 on all-linear, 43.6M trainable parameters)"."""
    if plan.peft == "none":
        return "full fine-tuning"
    name = {"lora": "LoRA", "qlora": "QLoRA"}.get(plan.peft, plan.peft)
    return (f"{name} (r={plan.lora_r} on {plan.lora_target_modules}, "
            f"{trainable_parameters(plan) / 1e6:,.1f}M trainable parameters)")


def _zero_words(plan: TrainingPlan) -> str:
    """Like "ZeRO-3 (optimizer and parameters offloaded to CPU)", "ZeRO-2" or "no DeepSpeed"."""
    if plan.zero_stage == 0 and not plan.deepspeed_config:
        return "no DeepSpeed"
    parts = [name for name, on in (("optimizer", plan.offload_optimizer), ("parameters", plan.offload_param)) if on]
    return f"ZeRO-{plan.zero_stage}" + (f" ({' and '.join(parts)} offloaded to CPU)" if parts else "")


# --- reporting ----------------------------------------------------------------------------------


def format_findings(findings: list[Finding]) -> str:
    """One block per finding, errors first: ``error [code] message``."""
    if not findings:
        return "preflight: every check passed"
    ordered = sorted(findings, key=lambda f: f.severity != "error")
    errors = sum(f.severity == "error" for f in findings)
    head = f"preflight: {errors} error(s), {len(findings) - errors} warning(s)"
    return "\n".join([head] + [f"{f.severity} [{f.code}] {f.message}" for f in ordered])


def require_ok(findings: list[Finding]) -> None:
    """Raise PreflightError listing every finding when any is an error; else print warnings."""
    if any(f.severity == "error" for f in findings):
        raise PreflightError(format_findings(findings))
    if findings:
        print(format_findings(findings))


def preflight_record(facts: HardwareFacts, plan: TrainingPlan, findings: list[Finding]) -> dict[str, Any]:
    """A JSON-serialisable record of one preflight, for an artifact and a card."""
    estimate = None
    if facts.gpus_requested > 0:
        estimate = asdict(estimate_memory(plan, facts.gpus_requested, facts.num_nodes))
    return {
        "ok": not any(f.severity == "error" for f in findings),
        "facts": json_ready(asdict(facts)),
        "plan": asdict(plan),
        "memory_estimate": estimate,
        "checkpoint_disk_bytes": checkpoint_disk_bytes(plan, cuda=facts.gpus_requested > 0)[1],
        "findings": [asdict(f) for f in findings],
    }
