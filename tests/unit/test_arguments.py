"""Argument checks, precision choice, and every shipped DeepSpeed config through TrainingArguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from training.arguments import (
    check_deepspeed_config,
    find_problems,
    parse_args,
    resolve_precision,
)

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_defaults_have_no_problems():
    assert find_problems(*parse_args([])) == []


def test_every_problem_is_reported_at_once():
    problems = find_problems(*parse_args([
        "--per_device_train_batch_size", "0",
        "--learning_rate", "-1",
        "--deepspeed", "nowhere.json",
        "--base_model", "./no/such/dir",
        "--sample_fraction", "1.5",
        "--max_steps", "0",
    ]))
    joined = "\n".join(problems)
    assert len(problems) == 6, joined
    for flag in ("--per_device_train_batch_size", "--learning_rate", "--deepspeed", "--base_model",
                 "--sample_fraction", "--max_steps"):
        assert flag in joined


def test_dash_spelling_is_accepted():
    model_args, _, train_args = parse_args(["--base-model", "x/y", "--learning-rate", "0.001"])
    assert model_args.base_model == "x/y" and train_args.learning_rate == 0.001


def test_base_model_directory_without_config_is_refused(tmp_path):
    problems = find_problems(*parse_args(["--base_model", str(tmp_path)]))
    assert any("no config.json" in p for p in problems)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"zero_optimization": {"stage": 4}}', "zero_optimization.stage 4"),
        ('{"zero_optimization": {"stage": "two"}}', "zero_optimization.stage 'two'"),
        ('{"zero_optimization": ', "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_bad_deepspeed_configs(tmp_path, content, expected):
    path = tmp_path / "ds.json"
    path.write_text(content)
    (problem,) = check_deepspeed_config(str(path))
    assert expected in problem and "--deepspeed" in problem


@pytest.mark.parametrize(
    ("requested", "cuda", "capability", "expected"),
    [
        ("auto", False, None, "fp32"),
        ("auto", True, (8, 0), "bf16"),
        ("auto", True, (9, 0), "bf16"),
        ("auto", True, (7, 0), "fp16"),
        ("bf16", False, None, "bf16"),
        ("fp32", True, (7, 0), "fp32"),
        ("fp16", True, (7, 0), "fp16"),
    ],
)
def test_precision_resolution(requested, cuda, capability, expected):
    assert resolve_precision(requested, cuda=cuda, compute_capability=capability) == expected


def test_impossible_precisions_name_the_fix():
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cuda=False, compute_capability=None)
    with pytest.raises(ValueError, match="compute capability 8.0"):
        resolve_precision("bf16", cuda=True, compute_capability=(7, 0))
    with pytest.raises(ValueError, match="not one of"):
        resolve_precision("int8", cuda=False, compute_capability=None)


def test_ds_configs_exist_for_every_strategy_and_preset():
    names = {p.stem for p in DS_CONFIGS}
    assert {"zero2", "zero3", "zero3_offload", "a100x4", "v100x8", "a10x1"} <= names


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_loads_through_training_arguments(path: Path):
    """The Trainer owns batch, accumulation, clipping, lr and precision: all "auto", all filled."""
    from transformers import TrainingArguments

    assert check_deepspeed_config(str(path)) == []
    config = json.loads(path.read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    args = TrainingArguments(
        output_dir="unused", deepspeed=str(path), use_cpu=True,
        per_device_train_batch_size=3, gradient_accumulation_steps=2, learning_rate=1e-4,
    )
    filled = args.hf_deepspeed_config.config
    assert filled["train_micro_batch_size_per_gpu"] == 3
    assert filled["gradient_accumulation_steps"] == 2
    if "optimizer" in filled:
        assert filled["optimizer"]["params"]["lr"] == 1e-4


def test_flow_presets_name_existing_ds_configs_and_precisions():
    for preset in sorted((REPO / "flows" / "configs").glob("*.json")):
        config = json.loads(preset.read_text())
        # "" runs without DeepSpeed (the single-GPU LoRA/QLoRA presets)
        assert not config["deepspeed_config"] or (REPO / config["deepspeed_config"]).is_file(), preset.name
        assert config["training"]["precision"] in ("auto", "bf16", "fp16", "fp32"), preset.name
        for key in ("cpu", "gpu", "memory", "shared_memory"):
            assert key in config["resources"], (preset.name, key)
        if config["resources"]["gpu"] > 1:  # NCCL needs a real /dev/shm
            assert config["resources"]["shared_memory"], preset.name


def test_trainer_cli_maps_onto_transformers_training_arguments(tmp_path, monkeypatch):
    """The one place our CLI becomes TrainingArguments (the trainer and the benchmarks use it)."""
    from training.trainer import hf_training_arguments

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    model_args, _, train_args = parse_args(["--output_dir", str(tmp_path), "--max_steps", "7",
                                            "--gradient_accumulation_steps", "3",
                                            "--deepspeed", "ds_configs/zero2.json"])
    args = hf_training_arguments(model_args, train_args, precision="fp32", cuda=False)
    assert args.output_dir == str(tmp_path / "checkpoints")
    assert (args.max_steps, args.gradient_accumulation_steps) == (7, 3)
    assert Path(args.deepspeed).resolve() == REPO / "ds_configs" / "zero2.json"
    assert (args.eval_strategy, args.save_strategy, args.eval_on_start) == ("epoch", "epoch", True)
    assert args.train_sampling_strategy == "group_by_length" and args.length_column_name == "length"
    assert args.include_num_input_tokens_seen == "non_padding" and args.use_cpu and not args.bf16

    model_args, _, train_args = parse_args(["--output_dir", str(tmp_path), "--eval_steps", "10", "--save_steps",
                                            "20", "--packing", "--group_by_length", "false"])
    args = hf_training_arguments(model_args, train_args, precision="fp32", cuda=False, logging_steps=1)
    assert (args.eval_strategy, args.eval_steps, args.save_strategy, args.save_steps) == ("steps", 10, "steps", 20)
    assert args.include_num_input_tokens_seen == "all"  # packed rows have no padding to leave out
    assert args.train_sampling_strategy == "random"
    assert args.logging_steps == 1  # overrides win


def test_attention_choice_is_checked_before_anything_loads():
    from training.arguments import check_attention

    problems = find_problems(*parse_args(["--attn_implementation", "flash"]))
    assert problems == ["--attn_implementation: 'flash' is not one of auto, sdpa, eager, flash_attention_2."]
    assert check_attention("sdpa", cuda=False, compute_capability=None, precision="fp32", flash_attn_version=None) == []
    (cpu,) = check_attention("flash_attention_2", cuda=False, compute_capability=None, precision="fp32",
                             flash_attn_version=None)
    assert "needs a CUDA GPU and this node has none" in cpu and "--attn_implementation sdpa" in cpu


def test_trainer_refuses_flash_attention_without_a_gpu_before_loading(tmp_path):
    """Through the CLI: the error comes before the data or the model are read."""
    import subprocess
    import sys

    from tests.conftest import python_env

    result = subprocess.run(
        [sys.executable, "-m", "training.trainer", "--attn_implementation", "flash_attention_2",
         "--output_dir", str(tmp_path / "out"), "--dataset", str(tmp_path / "no-such-data.jsonl")],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "flash_attention_2 needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("env", "process_index", "world_size", "expected"),
    [
        ({}, 0, 1, (0, 1)),  # python -m training.trainer
        ({"LOCAL_SIZE": "4"}, 3, 4, (0, 1)),  # deepspeed --num_gpus 4: one node
        ({"LOCAL_WORLD_SIZE": "4"}, 5, 8, (1, 2)),  # torchrun --nnodes 2 --nproc_per_node 4
        ({"LOCAL_WORLD_SIZE": "1"}, 1, 2, (1, 2)),  # the two-node CPU test
    ],
)
def test_node_layout_from_the_launchers_environment(monkeypatch, env, process_index, world_size, expected):
    from training.trainer import node_layout

    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert node_layout(process_index, world_size) == expected
