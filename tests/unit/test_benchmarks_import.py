"""The benchmark scripts import, and their cheap paths run (no timings are asserted)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, python_env, run_bounded

BENCHMARKS = REPO / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["trainer_vs_bare_loop", "startup_and_flow_overhead", "gpu_mfu",
                                  "gpu_profile_overhead", "checkpoint_upload", "lora_vs_full", "live_card_cost",
                                  "card_pictures"])
def test_benchmark_imports(name):
    assert callable(load(name).main)


def test_gpu_mfu_peak_table_and_matmul_parameters():
    gpu_mfu = load("gpu_mfu")
    assert gpu_mfu.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_mfu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_mfu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_mfu.peak_tflops("NVIDIA A10G") == 70.0
    assert gpu_mfu.peak_tflops("Tesla V100-SXM2-16GB") == 125.0
    assert gpu_mfu.peak_tflops("Some GPU") is None
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    tied = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **shape))
    untied = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shape))
    assert gpu_mfu.matmul_parameters(tied) == sum(p.numel() for p in tied.parameters())
    assert gpu_mfu.matmul_parameters(untied) == sum(p.numel() for p in untied.parameters()) - 100 * 16


def test_gpu_mfu_without_a_gpu_says_so():
    # python_env hides CUDA devices: the no-GPU path runs on a GPU machine too.
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_mfu.py")], env=python_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "no CUDA GPU" in result.stderr and "Nothing was measured" in result.stderr


def test_trainer_vs_bare_loop_quick_prints_its_table(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "trainer_vs_bare_loop.py"), "--quick", "--tiny-steps", "10",
         "--cache-dir", str(tmp_path)],
        env=python_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HF Trainer" in result.stdout and "bare loop" in result.stdout
    assert "same batches in every path: True" in result.stdout


def test_gpu_check_script_runs_every_part_and_writes_a_summary(tmp_path):
    """benchmarks/gpu_check.sh with CUDA hidden (python_env), on any machine: each part runs and
    reports; the CUDA tests skip (exit 0) and gpu_mfu refuses (exit 1), which the summary shows."""
    from importlib.metadata import PackageNotFoundError, version

    out = tmp_path / "gpu-check"
    # ~15 s unloaded, 60-90 s under a load of 10 on 2 cores
    result = run_bounded(["bash", str(BENCHMARKS / "gpu_check.sh")], cwd=REPO, timeout=600,
                         env=python_env(OUT=str(out), PYTHON=sys.executable, OVERHEAD_STEPS="40",
                                        WHEELS=str(tmp_path / "no-wheels")))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = {line.split()[0]: int(line.split()[2]) for line in (out / "summary.txt").read_text().splitlines()}
    assert list(summary) == ["versions", "gpu-tests", "gpu-profile-overhead", "gpu-mfu", "lora-vs-full"]
    assert summary["gpu-tests"] == 0 and "skipped" in (out / "gpu-tests.txt").read_text()
    assert summary["gpu-profile-overhead"] == 0
    assert summary["gpu-mfu"] == 1 and "no CUDA GPU here" in (out / "gpu-mfu.txt").read_text()
    assert summary["lora-vs-full"] == 1 and "no CUDA GPU here" in (out / "lora-vs-full.txt").read_text()
    versions = (out / "versions.txt").read_text()
    # What this machine has: the preflight's facts and pip's list name the installed versions.
    try:
        flash_attn = f'"{version("flash-attn")}"'
    except PackageNotFoundError:
        flash_attn = "null"
    assert f'"flash_attn_version": {flash_attn}' in versions, versions
    assert re.search(rf"^deepspeed\s+{re.escape(version('deepspeed'))}\s*$", versions, re.M), versions
