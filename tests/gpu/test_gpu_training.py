"""GPU paths: precision choice on real hardware, DeepSpeed on CUDA. Skipped without an NVIDIA GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, python_env

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"),
]


def test_auto_precision_matches_the_gpu():
    from training.arguments import resolve_precision

    capability = torch.cuda.get_device_capability(0)
    expected = "bf16" if capability >= (8, 0) else "fp16"
    assert resolve_precision("auto", cuda=True, compute_capability=capability) == expected


def test_deepspeed_zero2_on_cuda_with_auto_precision(tiny_model_dir, small_dataset_dir, tmp_path):
    out = tmp_path / "out"
    launcher = Path(sys.executable).parent / "deepspeed"
    result = subprocess.run(
        [str(launcher), "--num_gpus", "1", "--master_port", free_port(), "--module", "training.trainer",
         "--deepspeed", "ds_configs/zero2.json", "--base_model", str(tiny_model_dir),
         "--dataset", str(small_dataset_dir), "--output_dir", str(out), "--max_steps", "4",
         "--per_device_train_batch_size", "4", "--cache_dir", str(tmp_path / "cache")],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] in ("bf16", "fp16")
    assert metrics["global_step"] == 4
