"""Preflight rules on simulated machines, the memory and disk estimates, and the real CPU node."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from types import SimpleNamespace

import pynvml
import pytest
import torch

from tests.conftest import REPO
from training.arguments import parse_args
from training.memory_estimate import (
    GIB,
    MIB,
    checkpoint_disk_bytes,
    estimate_memory,
    model_size_from_config,
)
from training.node_facts import GpuFacts, HardwareFacts, declared_facts, gather_facts
from training.plan import TrainingPlan
from training.preflight import (
    Finding,
    PreflightError,
    check,
    format_findings,
    plan_from_args,
    preflight_record,
    read_zero_settings,
    require_ok,
)

A100_80 = GpuFacts("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GIB)
A100_40 = GpuFacts("NVIDIA A100-SXM4-40GB", (8, 0), 40536 * MIB)  # what the driver reports
V100 = GpuFacts("Tesla V100-SXM2-32GB", (7, 0), 32 * GIB)
A10 = GpuFacts("NVIDIA A10", (8, 6), 23028 * MIB)

# EleutherAI/pythia-2.8b and -12b (GPT-NeoX): parameters, hidden size, layers, vocabulary.
PYTHIA_2_8B = dict(num_parameters=2_775_208_960, hidden_size=2560, num_layers=32, vocab_size=50304)
PYTHIA_12B = dict(num_parameters=11_846_072_320, hidden_size=5120, num_layers=36, vocab_size=50688)


def node(gpu: GpuFacts, count: int, **changes) -> HardwareFacts:
    """A healthy node of `count` GPUs: recent driver, torch cu124, NCCL, big /dev/shm and disk."""
    facts = HardwareFacts(
        gpus_requested=count,
        gpus=[gpu] * count,
        nvml_gpu_count=count,
        driver_version="550.54.15",
        driver_cuda=(12, 4),
        torch_version="2.5.1+cu124",
        torch_cuda="12.4",
        torch_arch_list=["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"],
        nccl_version=(2, 21, 5),
        shm_bytes=64 * GIB,
        disk_free_bytes=2048 * GIB,
        host_memory_bytes=1024 * GIB,
        output_dir="/data/out",
    )
    return replace(facts, **changes)


def plan(**changes) -> TrainingPlan:
    """Pythia-2.8B like the a100x4 preset: bf16, batch 6 x 1024 tokens, 3 checkpoints kept."""
    base = TrainingPlan(precision="bf16", zero_stage=3, per_device_batch_size=6,
                        gradient_accumulation_steps=2, max_seq_length=1024, save_total_limit=3,
                        **PYTHIA_2_8B)
    return replace(base, **changes)


def small_plan(**changes) -> TrainingPlan:
    """A 125M model (GPT-2 small's shape) that fits any GPU here."""
    return plan(num_parameters=125_000_000, hidden_size=768, num_layers=12, vocab_size=50257, **changes)


def codes(findings: list[Finding], severity: str = "error") -> list[str]:
    return [f.code for f in findings if f.severity == severity]


def test_a_healthy_node_passes_every_rule():
    findings = check(node(A100_80, 4), plan(), where="train")
    assert findings == [], format_findings(findings)


# --- 1. GPU count ---------------------------------------------------------------------------------


def test_fewer_gpus_visible_than_requested_is_an_error():
    facts = node(A100_80, 2, gpus_requested=4, nvml_gpu_count=8, cuda_visible_devices="0,1")
    (finding,) = check(facts, plan(), where="train")
    assert (finding.severity, finding.code) == ("error", "gpu-count")
    assert "4 GPUs requested" in finding.message and "2 visible" in finding.message
    assert "CUDA_VISIBLE_DEVICES='0,1'" in finding.message  # why
    assert "resources.gpu to 2" in finding.message  # the fix


def test_a_cpu_build_of_torch_on_a_gpu_node_says_so():
    facts = node(A100_80, 0, gpus_requested=4, nvml_gpu_count=4, torch_version="2.13.0+cpu",
                 torch_cuda=None, nccl_version=None)
    findings = check(facts, plan(), where="train")
    assert codes(findings) == ["gpu-count"]  # one error with the cause, not one per symptom
    assert "2.13.0+cpu is a CPU build" in findings[0].message


def test_more_gpus_visible_than_requested_is_a_warning():
    facts = node(A100_80, 8, gpus_requested=4)
    findings = check(facts, plan(), where="train")
    assert codes(findings) == [] and codes(findings, "warning") == ["gpu-count"]
    assert "8 x 6 x 2" in findings[0].message  # the global batch it will really use


# --- 2. precision ---------------------------------------------------------------------------------


def test_bf16_on_v100s_is_an_error_with_the_fp16_fix():
    (finding,) = check(node(V100, 8), plan(), where="train")
    assert finding.code == "precision"
    assert "Tesla V100-SXM2-32GB (compute capability 7.0)" in finding.message
    assert "--precision fp16" in finding.message and "flows/configs/v100x8.json" in finding.message


def test_auto_and_fp16_run_on_v100s_and_bf16_on_a100s():
    assert check(node(V100, 8), plan(precision="auto"), where="train") == []
    assert check(node(V100, 8), plan(precision="fp16"), where="train") == []
    assert check(node(A10, 1), small_plan(precision="bf16"), where="train") == []


def test_one_old_gpu_in_the_node_decides():
    facts = node(A100_80, 2, gpus=[A100_80, V100])
    assert codes(check(facts, small_plan(), where="train")) == ["precision"]


def test_flash_attention_needs_the_package_ampere_and_half_precision():
    flash = small_plan(attn_implementation="flash_attention_2")
    assert check(node(A100_80, 4, flash_attn_version="2.8.3"), flash, where="train") == []
    (missing,) = check(node(A100_80, 4), flash, where="train")
    assert missing.code == "attention" and "needs the flash-attn package" in missing.message
    assert "FLASH_ATTN=1" in missing.message and "--attn_implementation sdpa" in missing.message
    (volta,) = check(node(V100, 8, flash_attn_version="2.8.3"), replace(flash, precision="fp16"), where="train")
    assert volta.code == "attention" and "compute capability 8.0+" in volta.message and "7.0" in volta.message
    (fp32,) = check(node(A100_80, 4, flash_attn_version="2.8.3"), replace(flash, precision="fp32"), where="train")
    assert "bf16 or fp16, not fp32" in fp32.message
    # Other kernels need nothing; start cannot see the image's packages, only the declared GPU.
    assert check(node(V100, 8), small_plan(precision="fp16", attn_implementation="sdpa"), where="train") == []
    start = declared_facts(gpus=4, gpu_name="A100 80GB", gpu_memory_gib=80, compute_capability=(8, 0),
                           shared_memory_mb=32768)
    assert check(start, flash, where="start") == []
    start_v100 = declared_facts(gpus=8, gpu_name="V100", gpu_memory_gib=32, compute_capability=(7, 0),
                                shared_memory_mb=65536)
    assert codes(check(start_v100, replace(flash, precision="fp16"), where="start")) == ["attention"]


def test_fp16_on_cpu_is_an_error_in_start_and_in_train():
    cpu_plan = small_plan(precision="fp16", zero_stage=2)
    for where, facts in (("start", declared_facts(gpus=0)), ("train", node(A100_80, 0))):
        (finding,) = check(facts, cpu_plan, where=where)
        assert finding.code == "precision" and "--precision fp32" in finding.message
    assert check(declared_facts(gpus=0), small_plan(precision="auto"), where="start") == []


# --- 3. CUDA driver, GPU architecture -------------------------------------------------------------


def test_a10_with_a_driver_too_old_for_torchs_cuda_is_an_error():
    facts = node(A10, 1, driver_version="470.82.01", driver_cuda=(11, 4), torch_version="2.7.0+cu128",
                 torch_cuda="12.8")
    (finding,) = check(facts, small_plan(), where="train")
    assert (finding.severity, finding.code) == ("error", "cuda-driver")
    assert "built with CUDA 12.8" in finding.message and "up to 11.4" in finding.message
    assert "Upgrade the node's NVIDIA driver" in finding.message
    assert "an image whose torch is built for CUDA 11.x" in finding.message


def test_an_older_minor_driver_is_a_warning_newer_is_fine():
    older = node(A10, 1, driver_cuda=(12, 2), torch_cuda="12.8")
    (finding,) = check(older, small_plan(), where="train")
    assert (finding.severity, finding.code) == ("warning", "cuda-driver")
    assert "minor version compatibility" in finding.message
    assert check(node(A10, 1, driver_cuda=(13, 0), torch_cuda="12.8"), small_plan(),
                 where="train") == []


def test_a_torch_build_without_kernels_for_the_gpu_is_an_error():
    facts = node(V100, 8, torch_arch_list=["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    findings = check(facts, plan(precision="fp16"), where="train")
    assert codes(findings) == ["gpu-arch"] and "sm_70" in findings[0].message
    # SASS runs on newer minors of its major (sm_80 on an A10, 8.6); PTX on anything newer.
    a10 = node(A10, 1, torch_arch_list=["sm_80", "compute_90"])
    assert check(a10, small_plan(), where="train") == []
    h100_only = node(A100_80, 1, torch_arch_list=["sm_90a"])
    assert codes(check(h100_only, small_plan(), where="train")) == ["gpu-arch"]


# --- 4. NCCL, 5. /dev/shm -------------------------------------------------------------------------


def test_multi_gpu_without_nccl_is_an_error():
    (finding,) = check(node(A100_80, 4, nccl_version=None), plan(), where="train")
    assert finding.code == "nccl" and "is_nccl_available()" in finding.message
    assert check(node(A10, 1, nccl_version=None), small_plan(), where="train") == []


def test_docker_default_shm_with_4_gpus_is_an_error_with_the_config_fix():
    (finding,) = check(node(A100_80, 4, shm_bytes=64 * MIB), plan(), where="train")
    assert finding.code == "shared-memory"
    assert "/dev/shm on this node is 64 MiB" in finding.message and "at least 4096 MiB" in finding.message
    assert "resources.shared_memory" in finding.message
    assert check(node(A100_80, 4, shm_bytes=4 * GIB), plan(), where="train") == []
    assert check(node(A10, 1, shm_bytes=64 * MIB), small_plan(), where="train") == []


def test_start_checks_the_shared_memory_the_config_declares():
    undeclared = declared_facts(gpus=4, gpu_name="A100 80GB", gpu_memory_gib=80, compute_capability=(8, 0))
    (finding,) = check(undeclared, plan(), where="start")
    assert finding.code == "shared-memory" and "resources.shared_memory, /dev/shm will be 64 MiB" in finding.message
    declared = replace(undeclared, shm_bytes=32768 * MIB)
    assert check(declared, plan(), where="start") == []


# --- 6. disk --------------------------------------------------------------------------------------


def test_checkpoint_disk_estimate():
    # Pythia-2.8B in bf16: 2 + 12 bytes/param = 38.9 GB a checkpoint; 3 kept + 1 being written,
    # plus the 5.6 GB final model.
    one, total = checkpoint_disk_bytes(plan(), cuda=True)
    assert one == 2_775_208_960 * 14
    assert total == 4 * one + 2_775_208_960 * 2
    assert checkpoint_disk_bytes(plan(precision="fp32"), cuda=True)[0] == 2_775_208_960 * 16


def test_a_tiny_disk_is_an_error_with_the_numbers():
    (finding,) = check(node(A100_80, 4, disk_free_bytes=50 * GIB), plan(), where="train")
    assert finding.code == "disk"
    assert "50.0 GiB free at /data/out" in finding.message
    assert "needs 149.9 GiB" in finding.message and "36.2 GiB" in finding.message
    assert "--save_total_limit" in finding.message


# --- 7. memory fit --------------------------------------------------------------------------------


def test_pythia_2_8b_zero2_bf16_fits_on_4_a100_80gb():
    zero2 = plan(zero_stage=2)
    estimate = estimate_memory(zero2, gpus_per_node=4)
    # DeepSpeed's ZeRO-2 estimator: 2 bytes/param on every GPU + 18 bytes/param / 4 GPUs.
    assert estimate.model_states == 2 * 2_775_208_960 + 18 * 2_775_208_960 // 4
    assert 40 * GIB < estimate.per_gpu < 45 * GIB
    assert check(node(A100_80, 4), zero2, where="train") == []


def test_pythia_2_8b_zero2_does_not_fit_a100_40gb_but_zero3_does():
    # Dolly trained on 8x A100 40GB with ZeRO-3; with ZeRO-2 the estimate is 42 GiB.
    (finding,) = check(node(A100_40, 4), plan(zero_stage=2), where="train")
    assert finding.code == "gpu-memory"
    assert "1. ZeRO-3, weights sharded too: --deepspeed ds_configs/zero3.json" in finding.message
    assert finding.message.splitlines()[1].endswith("fits")
    assert check(node(A100_40, 4), plan(zero_stage=3), where="train") == []


def test_dollys_own_setup_fits():
    # Dolly v2: pythia-12b, 8x A100 40GB, ZeRO-3, bf16, batch 6, gradient checkpointing.
    dolly = plan(zero_stage=3, gradient_checkpointing=True, largest_layer_params=50688 * 5120, **PYTHIA_12B)
    assert check(node(A100_40, 8), dolly, where="train") == []


def test_12b_with_zero2_on_one_a10_does_not_fit_and_suggests_zero3_offload():
    big = plan(zero_stage=2, per_device_batch_size=4, gradient_accumulation_steps=8,
               largest_layer_params=50688 * 5120, **PYTHIA_12B)
    findings = check(node(A10, 1), big, where="train")
    assert codes(findings) == ["gpu-memory"]
    message = findings[0].message
    assert "with ZeRO-2 on 1 GPU" in message and "GPU 0 (NVIDIA A10) has 22.5 GiB" in message
    options = message.splitlines()[1:]
    assert [line.split(":")[0].strip() for line in options] == [
        "1. ZeRO-3, weights sharded too",
        "2. ZeRO-3 with optimizer and parameters offloaded to CPU",
        "3. --per_device_train_batch_size 2 with --gradient_accumulation_steps 16 (the same global batch)",
        "4. --gradient_checkpointing (activations recomputed",
    ]
    assert "ds_configs/zero3_offload.json" in options[1] and "host RAM" in options[1]
    assert options[0].endswith("still too much") and options[2].endswith("fits")


def test_offloading_needs_host_memory():
    offload = plan(zero_stage=3, offload_optimizer=True, offload_param=True, largest_layer_params=50688 * 5120,
                   per_device_batch_size=1, gradient_checkpointing=True, **PYTHIA_12B)
    findings = check(node(A10, 1, host_memory_bytes=64 * GIB), offload, where="train")
    assert codes(findings) == ["cpu-memory"]
    assert "resources.memory" in findings[0].message


def test_start_checks_memory_against_the_declared_gpu():
    a10 = declared_facts(gpus=1, gpu_name="A10", gpu_memory_gib=24, compute_capability=(8, 6))
    big = plan(zero_stage=2, per_device_batch_size=4, largest_layer_params=50688 * 5120, **PYTHIA_12B)
    (finding,) = check(a10, big, where="start")
    assert finding.code == "gpu-memory" and "the preset's GPU (A10, 24.0 GiB)" in finding.message
    # No GPU facts declared: nothing to judge the memory or the precision by.
    assert check(declared_facts(gpus=1), big, where="start") == []


@pytest.mark.parametrize(("preset", "model"), [
    ("a100x4", PYTHIA_2_8B),
    ("a100x4x2", PYTHIA_2_8B),
    ("v100x8", PYTHIA_2_8B),
    ("a10x1", dict(num_parameters=1_414_647_808, hidden_size=2048, num_layers=24, vocab_size=50304)),
])
def test_the_gpu_presets_pass_their_own_start_check(preset, model):
    config = json.loads((REPO / "flows" / "configs" / f"{preset}.json").read_text())
    resources, training, gpu = config["resources"], config["training"], config["gpu_spec"]
    stage, offload_optimizer, offload_param = read_zero_settings(config["deepspeed_config"])
    preset_plan = TrainingPlan(
        precision=training["precision"], zero_stage=stage, offload_optimizer=offload_optimizer,
        offload_param=offload_param, per_device_batch_size=training["batch_size"],
        max_seq_length=training["max_seq_length"], gradient_checkpointing=training["gradient_checkpointing"],
        save_total_limit=training["save_total_limit"], **model,
    )
    facts = declared_facts(gpus=resources["gpu"], gpu_name=gpu["name"], gpu_memory_gib=gpu["memory_gib"],
                           compute_capability=tuple(gpu["compute_capability"]),
                           shared_memory_mb=resources["shared_memory"], memory_mb=resources["memory"],
                           num_nodes=config.get("num_nodes", 1))
    findings = check(facts, preset_plan, where="start")
    assert findings == [], format_findings(findings)


# --- plans from the trainer's arguments -----------------------------------------------------------


@pytest.mark.parametrize(("config", "expected"), [
    ("", (0, False, False)),
    ("ds_configs/zero2.json", (2, False, False)),
    ("ds_configs/a10x1.json", (2, True, False)),
    ("ds_configs/v100x8.json", (3, True, False)),
    ("ds_configs/zero3_offload.json", (3, True, True)),
])
def test_zero_settings_from_the_shipped_deepspeed_configs(config, expected):
    assert read_zero_settings(config) == expected


def test_a_missing_deepspeed_config_raises_the_trainers_message():
    with pytest.raises(ValueError, match="--deepspeed: nowhere.json does not exist"):
        read_zero_settings("nowhere.json")


def test_plan_from_the_trainers_arguments():
    args = parse_args(["--deepspeed", "ds_configs/a10x1.json", "--per_device_train_batch_size", "4",
                       "--gradient_accumulation_steps", "8", "--max_seq_length", "1024",
                       "--gradient_checkpointing", "--precision", "bf16", "--save_total_limit", "3"])
    result = plan_from_args(*args, num_parameters=1_414_647_808, hidden_size=2048, num_layers=24)
    assert (result.zero_stage, result.offload_optimizer, result.offload_param) == (2, True, False)
    assert (result.per_device_batch_size, result.gradient_accumulation_steps) == (4, 8)
    assert (result.max_seq_length, result.gradient_checkpointing, result.save_total_limit) == (1024, True, 3)
    assert result.precision == "bf16" and result.deepspeed_config == "ds_configs/a10x1.json"


def test_model_size_from_a_config_without_weights():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=256, vocab_size=128)
    size = model_size_from_config(config)
    real = AutoModelForCausalLM.from_config(config)
    assert size["num_parameters"] == sum(p.numel() for p in real.parameters())
    assert (size["hidden_size"], size["num_layers"], size["vocab_size"]) == (64, 2, 128)
    assert size["largest_layer_params"] == 64 * 256 + 256  # the MLP's up projection with bias


# --- the real node, reporting ---------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only record")
def test_gather_facts_on_this_cpu_machine(tmp_path):
    facts = gather_facts(gpus_requested=0, output_dir=tmp_path / "not" / "yet")
    assert facts.gpus == [] and facts.torch_cuda is None and facts.nccl_version is None
    assert facts.torch_version == torch.__version__
    assert facts.disk_free_bytes > 0 and facts.host_memory_bytes > 0
    assert facts.output_dir == str(tmp_path / "not" / "yet")
    if facts.driver_cuda is None:  # no NVIDIA driver here: the reason is recorded
        assert facts.notes
    small = plan(precision="auto", zero_stage=2, num_parameters=10**6, hidden_size=64, num_layers=2)
    assert check(facts, small, where="train") == []
    assert codes(check(replace(facts, gpus_requested=2), small, where="train")) == ["gpu-count"]


def test_gather_facts_reads_the_driver_through_nvml(monkeypatch, tmp_path):
    fake = SimpleNamespace(
        NVMLError=pynvml.NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 4,
        nvmlSystemGetDriverVersion=lambda: "550.54.15",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,  # NVML's encoding of CUDA 12.4
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = gather_facts(gpus_requested=4, output_dir=tmp_path)
    assert (facts.nvml_gpu_count, facts.driver_version, facts.driver_cuda) == (4, "550.54.15", (12, 4))


def test_record_is_json_serialisable_and_round_trips():
    facts = node(V100, 8)
    findings = check(facts, plan(), where="train")
    record = preflight_record(facts, plan(), findings)
    assert json.loads(json.dumps(record)) == record
    assert record["ok"] is False and record["findings"][0]["code"] == "precision"
    assert record["facts"]["gpus"][0]["compute_capability"] == [7, 0]
    assert record["memory_estimate"]["per_gpu"] > 0
    cpu = preflight_record(declared_facts(gpus=0), plan(precision="auto"), [])
    assert cpu["ok"] is True and cpu["memory_estimate"] is None
    json.dumps(cpu)


def test_require_ok_raises_with_every_error_and_prints_warnings(capsys):
    error = Finding("error", "disk", "too small: free some space")
    warning = Finding("warning", "cuda-driver", "old driver: upgrade it")
    with pytest.raises(PreflightError) as raised:
        require_ok([warning, error])
    text = str(raised.value)
    assert text.splitlines()[0] == "preflight: 1 error(s), 1 warning(s)"
    assert text.index("error [disk] too small") < text.index("warning [cuda-driver]")
    assert isinstance(raised.value, ValueError)
    require_ok([warning])
    assert "warning [cuda-driver] old driver: upgrade it" in capsys.readouterr().out
    require_ok([])


def test_where_must_be_start_or_train():
    with pytest.raises(ValueError, match="where"):
        check(node(A10, 1), plan(), where="end")
