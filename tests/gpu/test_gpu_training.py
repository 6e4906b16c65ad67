"""GPU paths: precision choice on real hardware, DeepSpeed on CUDA. Skipped without an NVIDIA GPU."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, python_env, run_bounded

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"),
]


def test_auto_precision_matches_the_gpu():
    from training.arguments import resolve_precision

    capability = torch.cuda.get_device_capability(0)
    expected = "bf16" if capability >= (8, 0) else "fp16"
    assert resolve_precision("auto", cuda=True, compute_capability=capability) == expected


def test_deepspeed_zero2_on_cuda_with_auto_precision(tiny_model_dir, small_dataset_dir, tmp_path):
    out = tmp_path / "out"
    # As the flow finds it: beside the interpreter, else on PATH (benchmarks/gpu_check.sh's shim).
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not installed"
    result = run_bounded(
        [str(launcher), "--num_gpus", "1", "--master_port", free_port(), "--module", "training.trainer",
         "--deepspeed", "ds_configs/zero2.json", "--base_model", str(tiny_model_dir),
         "--dataset", str(small_dataset_dir), "--output_dir", str(out), "--max_steps", "4",
         "--per_device_train_batch_size", "4", "--cache_dir", str(tmp_path / "cache")],
        cwd=REPO, env=python_env(cuda=True), timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] in ("bf16", "fp16")
    assert metrics["global_step"] == 4


def test_packed_flash_attention_run_matches_the_padded_sdpa_run(tiny_model_dir, small_dataset_dir, tmp_path):
    """--attn_implementation flash_attention_2 --packing through the CLI: the same losses as sdpa + padding."""
    pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash-attn package")
    if torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip("flash-attn 2 needs compute capability 8.0+")

    def run(out: str, *extra: str) -> dict:
        result = run_bounded(
            [sys.executable, "-m", "training.trainer", "--base_model", str(tiny_model_dir), "--dataset",
             str(small_dataset_dir), "--output_dir", str(tmp_path / out), "--max_steps", "3", "--precision", "bf16",
             "--per_device_train_batch_size", "4", "--eval_instructions", "none", "--logging_steps", "1",
             "--cache_dir", str(tmp_path / "cache"), *extra],
            cwd=REPO, env=python_env(cuda=True), timeout=900,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
        assert f"{extra[1] if extra else 'sdpa'} attention" in result.stdout
        return json.loads((tmp_path / out / "metrics.json").read_text())

    padded = run("padded")
    packed = run("packed", "--attn_implementation", "flash_attention_2", "--packing")
    assert packed["eval_loss_before"] == pytest.approx(padded["eval_loss_before"], rel=2e-2)  # bf16 kernels differ
    assert packed["train_loss"] == pytest.approx(padded["train_loss"], rel=2e-2)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_on_cuda(method, tmp_path):
    """LoRA, and QLoRA's 4-bit NF4 base on the GPU (bf16 compute where the GPU has it)."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from tests.conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "model", hidden_size=64)
    out = tmp_path / "out"
    result = run_bounded(
        [sys.executable, "-m", "training.trainer", "--base_model", str(model), "--dataset", "bundled:dolly-sample",
         "--sample_fraction", "0.2", "--output_dir", str(out), "--peft", method, "--max_steps", "6",
         "--learning_rate", "5e-3", "--eval_max_new_tokens", "8", "--cache_dir", str(tmp_path / "cache")],
        cwd=REPO, env=python_env(cuda=True), timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["peft"] == method and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["precision"] in ("bf16", "fp16")  # auto precision on CUDA: it ran on the GPU
    if method == "qlora":
        assert "frozen base weights in 4-bit NF4" in result.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # the merged model
