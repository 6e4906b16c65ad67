"""The train step's preflight without torch or transformers in the step process (on a CPU node):
the facts read without importing torch, the plan taken over from `start`'s record."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, replace
from types import SimpleNamespace

from tests.conftest import REPO
from training.node_facts import gather_facts, torch_build
from training.plan import LinearLayers, TrainingPlan, plan_from_record


def test_torch_build_read_from_its_files_is_what_import_torch_says():
    import torch

    assert torch_build() == (torch.__version__, torch.version.cuda)


def test_facts_without_cuda_equal_the_imported_ones_on_a_node_without_gpus():
    with_torch, without = asdict(gather_facts(0, REPO, 1)), asdict(gather_facts(0, REPO, 1, cuda=False))
    for changing in ("disk_free_bytes", "host_memory_bytes"):  # read a moment apart
        with_torch.pop(changing), without.pop(changing)
    assert without == with_torch and without["gpus"] == []


def test_a_plan_survives_the_round_trip_through_a_preflight_record():
    plan = TrainingPlan(num_parameters=135_000_000, precision="bf16", zero_stage=3, peft="lora", lora_r=8,
                        linear_layers=LinearLayers({"q_proj": 576 * 30}, {"q_proj": 576 * 30}, 9_953_280, 331_776))
    assert plan_from_record(asdict(plan)) == plan
    assert plan_from_record(asdict(replace(plan, linear_layers=None))) == replace(plan, linear_layers=None)


def test_the_node_preflight_takes_starts_plan_and_imports_neither_torch_nor_transformers(tmp_path):
    """In a fresh process, as the train step runs it on a node without GPUs."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO / 'flows')!r})
from dataclasses import asdict
from types import SimpleNamespace
from preflight_checks import node_preflight
from training.plan import TrainingPlan
settings = SimpleNamespace(resources=SimpleNamespace(gpu=0))
start = {{"plan": asdict(TrainingPlan(num_parameters=1_000_000, max_seq_length=64))}}
findings, record = node_preflight(settings, ["--base_model", "nowhere"], {str(tmp_path)!r}, 1, start_record=start)
assert record["plan"]["num_parameters"] == 1_000_000 and record["plan"]["max_seq_length"] == 64, record
assert record["facts"]["gpus"] == [] and record["facts"]["torch_version"], record
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_without_starts_size_the_node_builds_the_plan_itself(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(REPO / "flows"))
    from preflight_checks import node_preflight

    settings = SimpleNamespace(resources=SimpleNamespace(gpu=0))
    unknown = {"plan": asdict(TrainingPlan(num_parameters=0))}
    findings, record = node_preflight(settings, ["--base_model", str(tiny_model_dir),
                                                 "--dataset", "bundled:dolly-sample",
                                                 "--output_dir", str(tmp_path)], str(tmp_path), 1, start_record=unknown)
    assert record["plan"]["num_parameters"] > 0 and not any(f.severity == "error" for f in findings)
