"""The memory estimate under LoRA and QLoRA, and the single-GPU adapter presets' own preflight.

Models are built from configs in code, on the meta device: real shapes, no weights, no download.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
from metaflow.user_configs.config_parameters import ConfigValue
from transformers import GPTNeoXConfig, LlamaConfig, Qwen3Config

from tests.conftest import REPO
from tests.unit.test_preflight import node  # a healthy node of N GPUs
from training.arguments import parse_args
from training.memory_estimate import (
    GIB,
    MIB,
    NF4_BYTES,
    checkpoint_disk_bytes,
    estimate_memory,
    lora_trainable_parameters,
    model_size_from_config,
    trainable_parameters,
)
from training.node_facts import GpuFacts
from training.plan import TrainingPlan
from training.preflight import check, format_findings, plan_from_args, preflight_record

sys.path.insert(0, str(REPO / "flows"))  # the flow's own modules, as the flow imports them
from preflight_checks import declared  # noqa: E402
from trainer_argv import trainer_arguments

A10 = GpuFacts("NVIDIA A10", (8, 6), 23028 * MIB)  # what the driver reports for "24 GB"
A100_80 = GpuFacts("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GIB)

# Meta-Llama-3-8B's shape; its r=16 all-linear LoRA has 41,943,040 parameters (per layer:
# q, o 16 * (4096 + 4096); k, v 16 * (4096 + 1024); gate, up, down 16 * (4096 + 14336) =
# 1,310,720; times 32 layers).
LLAMA_3_8B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)
# Qwen/Qwen3-8B-Base's shape (8,190,735,360 parameters: untied embedding and head).
QWEN3_8B = Qwen3Config(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=False,
)
# EleutherAI/pythia-12b's shape (GPT-NeoX).
PYTHIA_12B = GPTNeoXConfig(
    hidden_size=5120,
    num_hidden_layers=36,
    num_attention_heads=40,
    intermediate_size=20480,
    vocab_size=50688,
)


def single_gpu_plan(config, peft: str, **changes) -> TrainingPlan:
    """bf16, no DeepSpeed, batch 4 x 1024 tokens, gradient checkpointing, r=16 all-linear."""
    base = TrainingPlan(
        precision="bf16",
        per_device_batch_size=4,
        gradient_accumulation_steps=8,
        max_seq_length=1024,
        gradient_checkpointing=True,
        peft=peft,
        **model_size_from_config(config),
    )
    return replace(base, **changes)


def codes(findings) -> list[str]:
    return [f.code for f in findings if f.severity == "error"]


# --- LoRA's trainable parameters and the layers it can target ------------------------------------


def test_llama_3_8b_lora_r16_all_linear_has_the_known_count():
    count, names = lora_trainable_parameters(LLAMA_3_8B, 16, "all-linear")
    assert count == 41_943_040 == 32 * (2 * 16 * 8192 + 2 * 16 * 5120 + 3 * 16 * 18432)
    assert lora_trainable_parameters(LLAMA_3_8B, 8, "q_proj,v_proj")[0] == 32 * 8 * (8192 + 5120)
    # A name the model lacks adds nothing; the names tell the caller which ones exist.
    assert lora_trainable_parameters(LLAMA_3_8B, 16, "q_proj,query_key_value")[0] == 32 * 16 * 8192
    assert "query_key_value" not in names


def test_target_names_of_a_tiny_llama_and_pythia_leave_the_head_out():
    tiny_llama = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    _, names = lora_trainable_parameters(tiny_llama, 4, "all-linear")
    assert set(names) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    tiny_pythia = GPTNeoXConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=128,
    )
    _, names = lora_trainable_parameters(tiny_pythia, 4, "all-linear")
    # embed_out, the head, is left out
    assert set(names) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_the_count_is_what_peft_trains(targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.arguments import lora_target_modules

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(r=8, target_modules=lora_target_modules(targets)),
    )
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_trainable_parameters(config, 8, targets)[0] == trained


def test_plan_from_args_carries_the_peft_settings():
    args = parse_args(
        [
            "--peft",
            "qlora",
            "--lora_r",
            "8",
            "--lora_target_modules",
            "q_proj,v_proj",
            "--merge_adapter",
            "false",
        ]
    )
    result = plan_from_args(*args, **model_size_from_config(LLAMA_3_8B))
    assert (result.peft, result.lora_r, result.lora_target_modules, result.merge_adapter) == (
        "qlora",
        8,
        "q_proj,v_proj",
        False,
    )
    assert trainable_parameters(result) == 32 * 8 * (8192 + 5120)
    assert result.linear_layers.weights == 32 * 4096 * (2 * 4096 + 2 * 1024 + 3 * 14336)


def test_peft_without_the_models_layers_names_the_fix():
    plan = TrainingPlan(num_parameters=10**9, peft="lora")
    with pytest.raises(ValueError, match=r"--peft lora: .*model_size_from_config"):
        estimate_memory(plan, 1)
    # The flow's plan when the model's config cannot be read (no hub): size 0, nothing to count.
    unknown = TrainingPlan(num_parameters=0, peft="qlora")
    facts = node(A10, 1)
    assert preflight_record(facts, unknown, check(facts, unknown, where="train"))["ok"]


# --- the estimate ---------------------------------------------------------------------------------


def test_qlora_stores_linear_weights_in_nf4_and_the_rest_in_16_bit():
    assert round(NF4_BYTES, 4) == 0.5159  # 4.127 bits: QLoRA's NF4 with double quantization
    qlora = single_gpu_plan(LLAMA_3_8B, "qlora")
    layers = qlora.linear_layers
    frozen = estimate_memory(qlora, 1).frozen_weights
    rest = qlora.num_parameters - layers.weights  # embedding and head (128256 x 4096 each), norms
    assert rest == 2 * 128256 * 4096 + (2 * 32 + 1) * 4096
    assert frozen == int(layers.weights * NF4_BYTES + 2 * rest + 2 * 4096 * 14336)
    lora = estimate_memory(single_gpu_plan(LLAMA_3_8B, "lora"), 1)
    assert lora.frozen_weights == 2 * qlora.num_parameters  # bf16, no gradient, no optimizer state
    assert 5 * GIB < frozen < 6 * GIB and 14.5 * GIB < lora.frozen_weights < 15.5 * GIB


def test_adapters_train_like_full_fine_tuning_per_parameter():
    full = estimate_memory(single_gpu_plan(LLAMA_3_8B, "none"), 1)
    lora = estimate_memory(single_gpu_plan(LLAMA_3_8B, "lora"), 1)
    # No DeepSpeed: 2 + 18 bytes per trained parameter (16-bit weights, gradients, fp32 copies).
    assert full.model_states == 20 * 8_030_261_248
    assert lora.model_states - lora.frozen_weights == 20 * 41_943_040
    assert lora.logits == full.logits  # the same tokens through the same head
    assert lora.activations > full.activations  # the adapters' dropped-out inputs


def test_zero3_shards_the_frozen_base_too():
    lora = single_gpu_plan(
        LLAMA_3_8B, "lora", zero_stage=3, deepspeed_config="ds_configs/zero3.json"
    )
    one, four = estimate_memory(lora, 1), estimate_memory(lora, 4)
    assert four.frozen_weights == one.frozen_weights // 4
    offloaded = replace(lora, offload_optimizer=True, offload_param=True)
    estimate = estimate_memory(offloaded, 4)
    assert estimate.frozen_weights == 0 and estimate.cpu > 2 * lora.num_parameters


def test_8b_llama_qlora_fits_a_24gb_gpu_lora_fits_80gb_but_not_24gb():
    qlora, lora = single_gpu_plan(LLAMA_3_8B, "qlora"), single_gpu_plan(LLAMA_3_8B, "lora")
    assert check(node(A10, 1), qlora, where="train") == []
    assert check(node(A100_80, 1), lora, where="train") == []
    (finding,) = check(node(A10, 1), lora, where="train")
    assert finding.code == "gpu-memory"
    assert (
        "for LoRA (r=16 on all-linear, 41.9M trainable parameters) with no DeepSpeed"
        in finding.message
    )
    assert "frozen base 15.0 GiB" in finding.message
    qlora_line = next(line for line in finding.message.splitlines() if "--peft qlora" in line)
    assert qlora_line.endswith("fits (41.9M trainable parameters)")


def test_full_12b_on_one_a10_names_lora_and_qlora_with_their_estimates():
    big = single_gpu_plan(
        PYTHIA_12B,
        "none",
        zero_stage=2,
        deepspeed_config="ds_configs/zero2.json",
        gradient_checkpointing=False,
    )
    (finding,) = check(node(A10, 1), big, where="train")
    assert finding.code == "gpu-memory" and "for full fine-tuning with ZeRO-2" in finding.message
    lines = finding.message.splitlines()
    adapters = lines[
        lines.index(next(line for line in lines if "Or keep the base model frozen" in line)) :
    ]
    assert (
        "LoRA adapters on its linear layers (r=16, --lora_target_modules all-linear)" in adapters[0]
    )
    lora, qlora = adapters[1:]
    # LoRA: 22.1 GiB of bf16 weights alone, more than the A10's 22.5 GiB with everything else.
    assert lora.startswith(
        "  - --peft lora and --per_device_train_batch_size 1 with "
        "--gradient_accumulation_steps 32 (the same global batch) and "
        "--gradient_checkpointing: "
    )
    assert lora.endswith("GiB per GPU, still too much (47.2M trainable parameters)")
    assert qlora.startswith("  - --peft qlora and --gradient_checkpointing: ")
    assert qlora.endswith("GiB per GPU, fits (47.2M trainable parameters)")
    need = float(qlora.split(": ")[1].split(" GiB")[0])
    expected = estimate_memory(replace(big, peft="qlora", gradient_checkpointing=True), 1).per_gpu
    assert need == round(expected / GIB, 1) and 14 < need < 18


def test_qlora_options_leave_zero3_for_zero2():
    big = single_gpu_plan(
        PYTHIA_12B, "none", zero_stage=3, deepspeed_config="ds_configs/zero3.json"
    )
    (finding,) = check(node(A10, 1), big, where="train")
    zero2 = "--peft qlora and --deepspeed ds_configs/zero2.json (QLoRA does not run under ZeRO-3)"
    assert zero2 in finding.message
    # Under QLoRA already, ZeRO-3 is not offered, nor adapters again.
    tight = replace(single_gpu_plan(PYTHIA_12B, "qlora"), gradient_checkpointing=False)
    (finding,) = check(node(A10, 1), tight, where="train")
    assert (
        "ZeRO-3" not in finding.message and "Or keep the base model frozen" not in finding.message
    )
    assert "--gradient_checkpointing" in finding.message


def test_adapter_checkpoints_hold_the_adapter_and_its_optimizer_state():
    lora = single_gpu_plan(QWEN3_8B, "lora", save_total_limit=3)
    trainable = trainable_parameters(lora)
    one, total = checkpoint_disk_bytes(lora, cuda=True)
    assert one == trainable * (4 + 12)  # fp32 adapter + Adam's 12 bytes/param
    merged = 2 * lora.num_parameters  # the base with the adapter merged, bf16
    assert total == 4 * one + trainable * 4 + merged
    _, adapter_only = checkpoint_disk_bytes(replace(lora, merge_adapter=False), cuda=True)
    assert adapter_only == 4 * one + trainable * 4 < 3 * GIB


# --- the single-GPU adapter presets ---------------------------------------------------------------


def preset_preflight(name: str, peft: str | None = None) -> list:
    """`start`'s preflight of a preset on Qwen3-8B: declared hardware, the trainer's own arguments
    as the flow builds them (``peft`` overrides the preset's, like the flow's --peft)."""
    config = json.loads((REPO / "flows" / "configs" / f"{name}.json").read_text())
    training = config["training"]
    argv = trainer_arguments(
        base_model=config["base_model"],
        dataset=config["dataset"],
        deepspeed_config=config["deepspeed_config"],
        epochs=training["epochs"],
        max_steps=training["max_steps"],
        learning_rate=training["learning_rate"],
        batch_size=training["batch_size"],
        peft=peft or training.get("peft", "none"),
        training=training,
    )
    plan = plan_from_args(*parse_args(argv), **model_size_from_config(QWEN3_8B))
    return check(declared(ConfigValue(config)), plan, where="start")


@pytest.mark.parametrize("preset", ["a10x1-qlora", "a100x1-lora"])
def test_the_adapter_presets_fit_their_gpu(preset):
    findings = preset_preflight(preset)
    assert findings == [], format_findings(findings)


def test_full_fine_tuning_of_the_8b_model_on_the_a10_preset_names_qlora():
    findings = {f.code: f for f in preset_preflight("a10x1", peft="none")}
    # ZeRO-2 with the optimizer offloaded: 8.2B x 16 bytes of host RAM too, more than 64 GiB.
    assert set(findings) == {"gpu-memory", "cpu-memory"}
    finding = findings["gpu-memory"]
    assert "full fine-tuning with ZeRO-2 (optimizer offloaded to CPU)" in finding.message
    qlora = next(line for line in finding.message.splitlines() if "--peft qlora" in line)
    assert ", fits (43.6M trainable parameters)" in qlora
