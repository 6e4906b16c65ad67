"""The training plan: what a run will train (model size and shape, precision, ZeRO stage,
batch, adapters), as the preflight rules and the memory estimate read it. Plain data, built by
``training.preflight.plan_from_args`` from the trainer's arguments and read back from a preflight
record by ``plan_from_record``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LinearLayers:
    """A model's linear layers but the output head, summed by leaf name (q_proj, dense_h_to_4h...).

    Exactly the layers peft's ``all-linear`` adapts and bitsandbytes stores in 4 bits: every
    ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's linear layer) but the LM head.
    """

    in_features: dict[str, int]  # leaf name -> in_features summed over every layer of that name
    out_features: dict[str, int]  # leaf name -> out_features, summed likewise
    weights: int  # parameters of all their weight matrices (biases not included)
    largest: int  # parameters of the largest weight matrix


@dataclass
class TrainingPlan:
    """What the run will do, as far as memory, disk and precision are concerned."""

    num_parameters: int
    precision: str = "auto"  # auto, bf16, fp16, fp32 (training.arguments.PRECISIONS)
    zero_stage: int = 0  # 0 also without DeepSpeed
    offload_optimizer: bool = False
    offload_param: bool = False
    deepspeed_config: str = ""
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 256
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"  # training.arguments.ATTENTION_IMPLEMENTATIONS
    save_total_limit: int = 2
    hidden_size: int | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    largest_layer_params: int | None = None  # for ZeRO-3's estimate; default vocab * hidden
    peft: str = "none"  # none (every weight trains), lora, qlora (training.arguments.PEFT_METHODS)
    lora_r: int = 16
    lora_target_modules: str = "all-linear"  # as --lora_target_modules spells it
    merge_adapter: bool = True  # under lora/qlora: the final model is saved merged too (disk)
    linear_layers: LinearLayers | None = None  # needed under lora/qlora: what LoRA adapts



def plan_from_record(plan: dict[str, Any]) -> TrainingPlan:
    """The inverse of ``asdict(plan)`` after a JSON round trip (the ``plan`` of a preflight record)."""
    plan = dict(plan)
    if plan.get("linear_layers") is not None:
        plan["linear_layers"] = LinearLayers(**plan["linear_layers"])
    return TrainingPlan(**plan)
