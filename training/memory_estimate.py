"""What a training plan needs: GPU memory per GPU, host RAM for offloaded states, checkpoint disk.

Full fine-tuning trains every weight; LoRA (``--peft lora``) freezes the base model and trains
low-rank adapters on its linear layers; QLoRA (``--peft qlora``) does the same on a base whose
linear weights are stored in 4-bit NF4. The estimates are a sum of named parts, each with its
source in a comment, so a wrong one is easy to find:

    from training.memory_estimate import estimate_memory, memory_options

    estimate = estimate_memory(plan, gpus_per_node=1)   # plan: training.plan.TrainingPlan
    print(estimate.describe())                          # "19.2 GiB per GPU (model states ...)"
    if estimate.per_gpu > capacity:
        print("\\n".join(memory_options(plan, 1, 1, capacity)))

LoRA needs the model's linear layers (:func:`linear_layers`, from a model built on the meta
device: no weights, no download); :func:`lora_trainable_parameters` answers from a config alone.
Messages use the trainer's flags, which the flow renames to its own terms (``in_flow_terms``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from training.arguments import lora_target_modules
from training.plan import LinearLayers

if TYPE_CHECKING:
    import torch

    from training.plan import TrainingPlan

GIB = 1024**3
MIB = 1024**2

# --- per-parameter and per-token costs, each with its source ------------------------------------

# Adam's optimizer state as checkpointed: fp32 master weights (4) + two fp32 moments (8) bytes per
# parameter. DeepSpeed's *_optim_states.pt shards hold exactly these; a plain Trainer's
# optimizer.pt holds the 8 bytes of moments next to fp32 weights, the same 12.
OPTIMIZER_CHECKPOINT_BYTES = 12
# peft keeps adapter weights in fp32 even on a 16-bit base (LoraConfig's autocast_adapter_dtype),
# and saves them so: 4 bytes per trainable parameter in adapter_model.safetensors.
ADAPTER_WEIGHT_BYTES = 4

# Activations of one transformer layer, in bytes per token per hidden unit, with 16-bit
# activations: 34 * s*b*h (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
# Transformer Models", eq. 1, without its 5*a*s/h attention-score term: transformers' default
# SDPA attention uses fused kernels that never store the s x s scores). A GPT-like layer's figure:
# a Llama-like one keeps more (measured on CPU below: 49, its RMSNorms save fp32 copies).
ACTIVATION_BYTES_PER_LAYER = 34
# With gradient checkpointing each layer keeps only its 16-bit input (2 * s*b*h) and the backward
# pass recomputes one layer at a time (one more 34 * s*b*h).
CHECKPOINTED_BYTES_PER_LAYER = 2
# Each LoRA adapter keeps, per token and per input feature of the layer it adapts, its
# dropped-out input in fp32 (4 bytes: peft's adapters are fp32, and it casts their input to
# match) and the dropout mask (1 byte). Measured with peft 0.21 on a Llama-like layer (SDPA,
# bf16 weights, bf16 autocast as the Trainer runs it, lora_dropout 0.05, all-linear): 94 bytes per
# token per hidden unit against 49 for full fine-tuning; the adapters' inputs add up to 9h (q, k,
# v, o, gate, up read h each, down reads the 3.5h MLP width), and 5 x 9h = 45. With
# lora_dropout 0 it is +7h instead; with gradient checkpointing only the recomputed layer's count.
ADAPTER_INPUT_BYTES = 5
# The LM head's logits and the loss, per token per vocabulary entry: 16-bit logits (2), their
# fp32 copy for the loss (4) and cross-entropy's saved fp32 log-softmax (4).
LOGIT_BYTES = 10

# QLoRA's storage of a linear weight (Dettmers et al. 2023, "QLoRA", section 3): 4-bit NF4 codes
# in blocks of 64 (bitsandbytes' 4-bit blocksize), one absmax constant per block; with double
# quantization those constants are 8-bit, in blocks of 256 with one fp32 constant each:
# 4 + 8/64 + 32/(64*256) = 4.127 bits = 0.516 bytes per parameter (0.5 + 0.016).
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
# Linear layers are dequantized to 16 bits one weight matrix at a time, in the forward pass and
# again in the backward pass (bitsandbytes' MatMul4Bit): one 16-bit copy of the largest matrix.
DEQUANTIZED_BYTES = 2

# Over the sum of the estimates: PyTorch's caching allocator holds ~10% more than live tensors
# (fragmentation), and each process needs a fixed amount besides: CUDA context and kernels
# (~0.5-1 GiB), NCCL buffers (~0.5 GiB) and DeepSpeed's communication buckets (our ZeRO-2 configs'
# allgather bucket is 2e8 elements: 0.4 GB in 16-bit, several times that with overlap_comm).
FRAGMENTATION = 1.10
FIXED_OVERHEAD = 3 * GIB


def format_gib(n: float) -> str:
    """Bytes as GiB with one decimal, the unit of every message here: "22.5 GiB"."""
    return f"{n / GIB:.1f} GiB"


# --- the model's linear layers (what LoRA adapts and QLoRA quantizes) ---------------------------


def meta_model(config: Any, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of a transformers config, built on the meta device: shapes only, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_layers(model: torch.nn.Module) -> LinearLayers:
    """The linear layers of ``model`` (built on the meta device by :func:`meta_model`)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    ins: dict[str, int] = {}
    outs: dict[str, int] = {}
    weights = largest = 0
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear):
            n_in, n_out = module.in_features, module.out_features
        elif isinstance(module, Conv1D):  # GPT-2: weight is (in, out)
            n_in, n_out = module.weight.shape
        else:
            continue
        leaf = name.rsplit(".", 1)[-1]
        ins[leaf] = ins.get(leaf, 0) + n_in
        outs[leaf] = outs.get(leaf, 0) + n_out
        weights += n_in * n_out
        largest = max(largest, n_in * n_out)
    return LinearLayers(ins, outs, weights, largest)


def lora_targets(layers: LinearLayers, target_modules: str) -> list[str]:
    """The leaf names ``target_modules`` (``all-linear`` or "q_proj,v_proj") adapts in a model
    with ``layers``; names the model lacks are left out (the caller reports them)."""
    wanted = lora_target_modules(target_modules)
    names = sorted(layers.in_features)
    return names if wanted == "all-linear" else [n for n in names if n in wanted]


def lora_parameters(layers: LinearLayers, r: int, target_modules: str) -> int:
    """LoRA's trainable parameters: r * (in + out) for every adapted layer (A is r x in, B out x r)."""
    return sum(
        r * (layers.in_features[n] + layers.out_features[n])
        for n in lora_targets(layers, target_modules)
    )


def lora_trainable_parameters(
    config: Any, r: int, target_modules: str, *, trust_remote_code: bool = False
) -> tuple[int, list[str]]:
    """(LoRA's trainable parameters at rank ``r`` on ``target_modules``, the leaf names of every
    linear layer of the model but its output head), from a transformers config alone.

    The names are what ``--lora_target_modules`` may list: {"q_proj", "k_proj", ..., "down_proj"}
    for Llama, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} for GPT-NeoX. The
    count leaves out names the model lacks and the 3 trained embedding rows of the Dolly keys
    (3 x hidden: negligible).
    """
    layers = linear_layers(meta_model(config, trust_remote_code=trust_remote_code))
    return lora_parameters(layers, r, target_modules), sorted(layers.in_features)


def trainable_parameters(plan: TrainingPlan) -> int:
    """Parameters the optimizer updates: all of them, or the LoRA adapters' under lora/qlora."""
    if plan.peft == "none":
        return plan.num_parameters
    return lora_parameters(_layers(plan), plan.lora_r, plan.lora_target_modules)


def _layers(plan: TrainingPlan) -> LinearLayers:
    if plan.linear_layers is None:
        if plan.num_parameters == 0:  # the model's size is unknown (its config unreadable here)
            return LinearLayers({}, {}, 0, 0)
        raise ValueError(
            f"--peft {plan.peft}: the plan does not know the model's linear layers. Build it with "
            "plan_from_args(..., **model_size_from_config(config)), which reads them."
        )
    return plan.linear_layers


# --- GPU memory ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU needs for a plan, and host RAM for what ZeRO offloads to the CPU."""

    model_states: int  # weights, gradients, optimizer states on one GPU (DeepSpeed's estimators)
    activations: int | None  # None: hidden size or layer count unknown
    logits: int | None  # None: vocabulary size unknown
    per_gpu: int  # the sum, plus fragmentation and the fixed overhead
    cpu: int  # host RAM of the node for offloaded states (DeepSpeed's estimate)
    frozen_weights: int = 0  # of model_states: the frozen base model under lora/qlora

    def describe(self) -> str:
        states = f"model states {format_gib(self.model_states)}"
        if self.frozen_weights:
            states += f" (frozen base {format_gib(self.frozen_weights)})"
        parts = [states]
        parts.append(
            "activations unknown"
            if self.activations is None
            else f"activations {format_gib(self.activations)}"
        )
        if self.logits is not None:
            parts.append(f"logits {format_gib(self.logits)}")
        parts.append(f"+{FRAGMENTATION - 1:.0%} and {format_gib(FIXED_OVERHEAD)} overhead")
        return f"{format_gib(self.per_gpu)} per GPU ({', '.join(parts)})"


def estimate_memory(plan: TrainingPlan, gpus_per_node: int, num_nodes: int = 1) -> MemoryEstimate:
    """Per-GPU memory of ``plan`` on ``gpus_per_node`` x ``num_nodes`` GPUs (see the constants)."""
    trainable = trainable_parameters(plan)
    states, cpu = _trained_states(plan, trainable, gpus_per_node, num_nodes)
    frozen = frozen_cpu = 0
    if plan.peft != "none":
        frozen, frozen_cpu = _frozen_base(plan, gpus_per_node * num_nodes)
        cpu += frozen_cpu // num_nodes
    fp32 = plan.precision == "fp32"
    activations = logits = None
    tokens = plan.per_device_batch_size * plan.max_seq_length
    if plan.hidden_size and plan.num_layers:
        layer = ACTIVATION_BYTES_PER_LAYER * tokens * plan.hidden_size
        kept_layers = plan.num_layers
        if plan.gradient_checkpointing:
            activations = (
                plan.num_layers * CHECKPOINTED_BYTES_PER_LAYER * tokens * plan.hidden_size + layer
            )
            kept_layers = 1  # the adapters of the one layer being recomputed
        else:
            activations = plan.num_layers * layer
        if plan.peft != "none":
            layers = _layers(plan)
            inputs = sum(
                layers.in_features[n] for n in lora_targets(layers, plan.lora_target_modules)
            )
            activations += ADAPTER_INPUT_BYTES * tokens * inputs * kept_layers // plan.num_layers
        activations *= 2 if fp32 else 1
    if plan.vocab_size:
        logits = LOGIT_BYTES * tokens * plan.vocab_size
    live = states + frozen + (activations or 0) + (logits or 0)
    per_gpu = int(live * FRAGMENTATION) + FIXED_OVERHEAD
    return MemoryEstimate(int(states + frozen), activations, logits, per_gpu, int(cpu), int(frozen))


def _trained_states(
    plan: TrainingPlan, params: int, gpus_per_node: int, num_nodes: int
) -> tuple[float, float]:
    """(GPU bytes, host bytes) of the weights that train: 16-bit weights, gradients, fp32 master
    weights and Adam moments, sharded by ZeRO as DeepSpeed's estimators count them. Under
    lora/qlora ``params`` are the adapters; their states are counted the same way (peft's fp32
    adapters without DeepSpeed take 4 + 4 + 8 = 16 bytes/param, under the 20 counted here)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = gpus_per_node * num_nodes
    if plan.zero_stage == 3:
        # The largest layer is gathered whole, frozen or not: the base model's, under lora too.
        largest = plan.largest_layer_params or (plan.vocab_size or 0) * (plan.hidden_size or 0)
        cpu, states, _ = estimate_zero3_model_states_mem_needs(
            params,
            largest,
            gpus_per_node,
            num_nodes,
            cpu_offload=plan.offload_optimizer,
            cpu_offload_params=plan.offload_param,
            zero_init=True,  # the trainer builds TrainingArguments first: zero.Init loads shards
        )
        resident_weights = 0 if plan.offload_param else params / gpus
    else:
        # DeepSpeed's ZeRO-2 accounting: 2 bytes of 16-bit weights on every GPU + 18 bytes/param
        # sharded (16-bit and fp32 gradients 2 + 4, fp32 weights 4, Adam moments 8).
        cpu, states = estimate_zero2_model_states_mem_needs(
            params, gpus_per_node, num_nodes, cpu_offload=plan.offload_optimizer
        )
        if plan.zero_stage == 1:  # ZeRO-1 keeps the whole 16-bit gradient on every GPU
            states += 2 * params - 2 * params // gpus
        elif plan.zero_stage == 0:  # nothing sharded
            states = 2 * params + 18 * params
        resident_weights = params
    # The estimators assume 16-bit weights on the GPU; fp32 training keeps 4 bytes there.
    if plan.precision == "fp32":
        states += int(2 * resident_weights)
    return states, cpu


def _frozen_base(plan: TrainingPlan, gpus: int) -> tuple[int, int]:
    """(GPU bytes on each GPU, host bytes in all) of the frozen base model under lora/qlora: no
    gradients, no optimizer state, no fp32 master copy, only the weights."""
    weight_bytes = _frozen_weight_bytes(plan)
    if plan.peft == "qlora":
        # The linear layers in NF4, the rest (embeddings, LM head, norms, biases) in 16 bits, one
        # matrix dequantized at a time. Every GPU holds it all: the trainer refuses QLoRA under
        # ZeRO-3, the only stage that would shard it.
        layers = _layers(plan)
        rest = plan.num_parameters - layers.weights
        gpu = layers.weights * NF4_BYTES + rest * weight_bytes + DEQUANTIZED_BYTES * layers.largest
        return int(gpu), 0
    base = plan.num_parameters * weight_bytes
    if plan.zero_stage == 3:  # ZeRO-3 shards frozen weights like the others (or offloads them)
        return (0, base) if plan.offload_param else (base // gpus, 0)
    return base, 0


def _frozen_weight_bytes(plan: TrainingPlan) -> int:
    """Bytes per frozen 16-bit-or-wider weight on the GPU. The trainer loads the base in bf16
    under bf16, in fp32 under fp16 (mixed precision keeps fp32 weights) and fp32; DeepSpeed's
    engine then casts the module to its 16-bit type. "auto" is taken as bf16 (what it picks on
    GPUs of compute capability 8.0+)."""
    no_deepspeed = plan.zero_stage == 0 and not plan.deepspeed_config
    return 4 if plan.precision == "fp32" or (plan.precision == "fp16" and no_deepspeed) else 2


# --- what to change when it does not fit ---------------------------------------------------------


def memory_options(plan: TrainingPlan, per_node: int, nodes: int, capacity: int) -> list[str]:
    """Remedies when ``plan`` needs more than ``capacity`` bytes per GPU: the usual ones in order
    of cost, each estimated on top of the ones before, then (unless the plan is QLoRA already)
    training adapters on a frozen base instead, each estimated on its own."""
    steps: list[tuple[str, TrainingPlan]] = []
    current = plan
    zero3 = plan.peft != "qlora"  # the trainer refuses QLoRA under ZeRO-3
    if zero3 and current.zero_stage < 3 and not current.offload_optimizer:
        current = replace(current, zero_stage=3, deepspeed_config="ds_configs/zero3.json")
        steps.append(("ZeRO-3, weights sharded too: --deepspeed ds_configs/zero3.json", current))
    if zero3 and not (
        current.zero_stage == 3 and current.offload_optimizer and current.offload_param
    ):
        current = replace(
            current,
            zero_stage=3,
            offload_optimizer=True,
            offload_param=True,
            deepspeed_config="ds_configs/zero3_offload.json",
        )
        cpu = estimate_memory(current, per_node, nodes).cpu
        steps.append(
            (
                "ZeRO-3 with optimizer and parameters offloaded to CPU: --deepspeed "
                f"ds_configs/zero3_offload.json (needs ~{format_gib(cpu)} of host RAM per node, "
                "resources.memory)",
                current,
            )
        )
    if current.per_device_batch_size > 1:
        current = _smaller_batch(current, per_node, nodes, capacity)
        steps.append((_batch_words(current), current))
    if not current.gradient_checkpointing:
        current = replace(current, gradient_checkpointing=True)
        steps.append(("--gradient_checkpointing (activations recomputed: ~30% slower)", current))
    lines = []
    for number, (text, option) in enumerate(steps, 1):
        need = estimate_memory(option, per_node, nodes).per_gpu
        lines.append(f"  {number}. {text}: {format_gib(need)} per GPU, {_verdict(need, capacity)}")
    return lines + _adapter_options(plan, per_node, nodes, capacity)


def _adapter_options(plan: TrainingPlan, per_node: int, nodes: int, capacity: int) -> list[str]:
    """LoRA and QLoRA in place of the plan's method, each with the cheapest batch and gradient
    checkpointing that fit (or the least memory they reach)."""
    modes = {"none": ("lora", "qlora"), "lora": ("qlora",)}.get(plan.peft, ())
    if not modes or plan.linear_layers is None:
        return []
    lines = [
        "  Or keep the base model frozen and train LoRA adapters on its linear layers "
        f"(r={plan.lora_r}, --lora_target_modules {plan.lora_target_modules}):"
    ]
    for mode in modes:
        start = replace(plan, peft=mode)
        words = [f"--peft {mode}"]
        if mode == "qlora" and plan.zero_stage == 3:
            start = replace(
                start,
                zero_stage=2,
                offload_optimizer=False,
                offload_param=False,
                deepspeed_config="ds_configs/zero2.json",
            )
            words.append("--deepspeed ds_configs/zero2.json (QLoRA does not run under ZeRO-3)")
        option = _cheapest_fit(start, per_node, nodes, capacity)
        if option.per_device_batch_size != start.per_device_batch_size:
            words.append(_batch_words(option))
        if option.gradient_checkpointing and not start.gradient_checkpointing:
            words.append("--gradient_checkpointing")
        need = estimate_memory(option, per_node, nodes).per_gpu
        trained = trainable_parameters(option) / 1e6
        lines.append(
            f"  - {' and '.join(words)}: {format_gib(need)} per GPU, {_verdict(need, capacity)} "
            f"({trained:,.1f}M trainable parameters)"
        )
    return lines


def _cheapest_fit(plan: TrainingPlan, per_node: int, nodes: int, capacity: int) -> TrainingPlan:
    """``plan`` if it fits; else with the largest smaller batch that fits; else with gradient
    checkpointing and the largest batch that fits then (batch 1 when none does)."""

    def fits(option: TrainingPlan) -> bool:
        return estimate_memory(option, per_node, nodes).per_gpu <= capacity

    if fits(plan):
        return plan
    smaller = _smaller_batch(plan, per_node, nodes, capacity)
    if fits(smaller) or plan.gradient_checkpointing:
        return smaller
    checkpointed = replace(plan, gradient_checkpointing=True)
    return (
        checkpointed
        if fits(checkpointed)
        else _smaller_batch(checkpointed, per_node, nodes, capacity)
    )


def _smaller_batch(plan: TrainingPlan, per_node: int, nodes: int, capacity: int) -> TrainingPlan:
    """The largest smaller batch that fits and divides this one (so the global batch stays the
    same, through more accumulation); batch 1 when none fits."""
    batch = plan.per_device_batch_size
    smaller = [b for b in range(batch - 1, 0, -1) if batch % b == 0]
    fitting = [
        b
        for b in smaller
        if estimate_memory(replace(plan, per_device_batch_size=b), per_node, nodes).per_gpu
        <= capacity
    ]
    new_batch = fitting[0] if fitting else 1
    accumulation = plan.gradient_accumulation_steps * batch // new_batch
    return replace(plan, per_device_batch_size=new_batch, gradient_accumulation_steps=accumulation)


def _batch_words(plan: TrainingPlan) -> str:
    return (
        f"--per_device_train_batch_size {plan.per_device_batch_size} with "
        f"--gradient_accumulation_steps {plan.gradient_accumulation_steps} (the same global batch)"
    )


def _verdict(need: int, capacity: int) -> str:
    return "fits" if need <= capacity else "still too much"


# --- disk ----------------------------------------------------------------------------------------


def _weight_bytes(plan: TrainingPlan, cuda: bool) -> int:
    """Bytes per parameter of the saved weights: 16-bit unless training runs in fp32."""
    fp32 = plan.precision == "fp32" or (plan.precision == "auto" and not cuda)
    return 4 if fp32 else 2


def checkpoint_disk_bytes(plan: TrainingPlan, *, cuda: bool) -> tuple[int, int]:
    """(one checkpoint, all the run keeps at its output directory at once), in bytes.

    One checkpoint is the trained weights plus 12 bytes/param of optimizer state: every weight in
    the saving dtype, or under lora/qlora the fp32 adapters alone. ``save_total_limit``
    checkpoints stay, plus the one being written before the oldest is deleted (or still
    hard-linked in the S3 upload staging); then the final model: the weights, or the adapter,
    plus the merged 16-bit model when ``merge_adapter`` is on.
    """
    trainable = trainable_parameters(plan)
    full = plan.num_parameters * _weight_bytes(plan, cuda)
    if plan.peft == "none":
        one_checkpoint, final = full + trainable * OPTIMIZER_CHECKPOINT_BYTES, full
    else:
        adapter = trainable * ADAPTER_WEIGHT_BYTES
        one_checkpoint = adapter + trainable * OPTIMIZER_CHECKPOINT_BYTES
        final = adapter + (full if plan.merge_adapter else 0)
    return one_checkpoint, (plan.save_total_limit + 1) * one_checkpoint + final


def model_size_from_config(config: Any, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Parameter counts and shape of a transformers model config, without loading weights.

    The model is built on the meta device (no memory, no download beyond the config):
    ``plan_from_args(..., **model_size_from_config(AutoConfig.from_pretrained(name)))``.
    """
    model = meta_model(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    return {
        "num_parameters": sum(p.numel() for p in model.parameters()),  # tied weights once
        # As DeepSpeed's estimate_zero3_model_states_mem_needs_all_live counts "largest layer".
        "largest_layer_params": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_layers": getattr(text, "num_hidden_layers", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "linear_layers": linear_layers(model),  # for LoRA's and QLoRA's estimates
    }
