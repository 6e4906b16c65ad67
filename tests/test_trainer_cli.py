"""The trainer as users run it: `python -m training.trainer` and the `deepspeed` launcher."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, python_env, run_bounded, write_jsonl

TRAINER = [sys.executable, "-m", "training.trainer"]


def run(command: list[str], *, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return run_bounded(command, cwd=REPO, env=env or python_env(), timeout=600, **kwargs)


def train_losses(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"\[trainer\] step \d+/\d+ loss=([0-9.e+-]+)", output)]


def test_help_lists_every_argument_with_help_text():
    result = run([*TRAINER, "--help"])
    assert result.returncode == 0, result.stderr
    for flag in (
        "--base_model", "--dataset", "--output_dir", "--epochs", "--max_steps",
        "--per_device_train_batch_size", "--per_device_eval_batch_size", "--gradient_accumulation_steps",
        "--learning_rate", "--warmup_steps", "--weight_decay", "--seed", "--max_seq_length", "--test_size",
        "--logging_steps", "--eval_steps", "--save_steps", "--save_total_limit", "--deepspeed",
        "--precision", "--gradient_checkpointing", "--sample_fraction", "--trust_remote_code", "--skip_bad_rows",
    ):
        assert flag in result.stdout, flag
    assert "runs code from" in result.stdout.lower() or "remote code" in result.stdout.lower()


def test_tiny_model_trains_saves_and_loads(plain_trainer_run):
    """2 epochs of 12 steps without DeepSpeed (`plain_trainer_run` in tests/conftest.py)."""
    out, result = plain_trainer_run
    # No DeepSpeed, so no word of building its CPU op, although none is built in that folder.
    assert "DeepSpeed compiles" not in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("eval_loss_before", "eval_loss_after", "train_loss", "train_runtime_s", "tokens_per_second",
                "global_step", "tokens", "train_rows", "eval_rows", "dropped_long_rows"):
        assert key in metrics, key
    assert metrics["global_step"] == 24
    assert (metrics["train_rows"], metrics["eval_rows"], metrics["dropped_long_rows"]) == (48, 16, 0)
    assert all(math.isfinite(metrics[k]) for k in ("eval_loss_before", "eval_loss_after", "train_loss"))
    assert metrics["tokens"] > 0 and metrics["tokens_per_second"] > 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    assert list((out / "checkpoints").glob("checkpoint-*")), "no checkpoint written"

    from transformers import AutoModelForCausalLM

    from training.generate import generate_response, load_for_generation

    AutoModelForCausalLM.from_pretrained(out)  # a plain HF model directory
    model, tokenizer = load_for_generation(str(out))
    result = generate_response(model, tokenizer, "Name a color.", max_new_tokens=8)
    assert result.new_tokens <= 8 and isinstance(result.text, str)

    cli = run([sys.executable, "-m", "training.generate", "--model", str(out), "--max-new-tokens", "8",
               "--context", "Colors: red, blue.", "Name a color."])
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout.strip()  # the answer, or the note that it stopped at --max-new-tokens


def test_loss_falls_on_a_repeated_batch(tiny_model_dir, tmp_path):
    row = {"instruction": "What is the capital of France?", "context": "", "response": "Paris is the capital.",
           "category": "open_qa"}
    data = tmp_path / "repeat"
    write_jsonl(data / "train.jsonl", [row] * 8)
    write_jsonl(data / "eval.jsonl", [row] * 2)
    out = tmp_path / "out"
    result = run([
        *TRAINER, "--base_model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(out),
        "--max_steps", "30", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
        "--logging_steps", "1", "--save_steps", "1000", "--cache_dir", str(tmp_path / "cache"),
        "--eval_instructions", "none",  # one step per epoch: 30 rounds of answers would dominate
    ])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = train_losses(result.stdout)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < 0.5 * metrics["eval_loss_before"]


def test_bad_inputs_stop_before_loading_anything(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "response": "y"}\n{not json\n')
    result = run([*TRAINER, "--dataset", str(bad), "--per_device_train_batch_size", "0", "--output_dir", str(tmp_path)])
    assert result.returncode != 0
    assert "--per_device_train_batch_size: must be positive" in result.stderr
    result = run([*TRAINER, "--dataset", str(bad), "--output_dir", str(tmp_path)])
    assert result.returncode != 0
    assert f"{bad} line 2: not valid JSON" in result.stderr


def zero2(tiny_model_dir: Path, small_dataset_dir: Path, out: Path, peft: str,
          *args: str) -> subprocess.CompletedProcess:
    """The trainer under DeepSpeed ZeRO-2 on one CPU rank, through the `deepspeed` launcher."""
    return run([
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", free_port(),
        "--module", "training.trainer", "--deepspeed", "ds_configs/zero2.json", "--base_model", str(tiny_model_dir),
        "--dataset", str(small_dataset_dir), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--eval_instructions", "none", "--cache_dir", str(out.parent / "cache"),
        "--peft", peft, "--learning_rate", "1e-3", *args,
    ])


@pytest.fixture(scope="module")
def zero2_first_runs(tiny_model_dir, small_dataset_dir, tmp_path_factory):
    """``first(peft)``: (the output directory, the result) of 4 steps under ZeRO-2 with a checkpoint
    every 2, run once per --peft for the tests below."""
    runs: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def first(peft: str) -> tuple[Path, subprocess.CompletedProcess]:
        if peft not in runs:
            out = tmp_path_factory.mktemp(f"zero2-{peft}") / "first"
            result = zero2(tiny_model_dir, small_dataset_dir, out, peft, "--max_steps", "4", "--save_steps", "2")
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
            runs[peft] = out, result
        return runs[peft]

    return first


def test_deepspeed_zero2_one_cpu_rank_through_the_launcher(zero2_first_runs):
    out, result = zero2_first_runs("none")
    assert "DeepSpeed" in result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["world_size"] == 1
    # DeepSpeed wrote its ZeRO checkpoint layout (global_step*/ with optimizer shards)
    assert list((out / "checkpoints").rglob("*optim_states.pt"))
    assert len(train_losses(result.stdout)) == 4


@pytest.mark.parametrize("config", ["zero3.json"])
def test_deepspeed_zero3_saves_a_full_model(tiny_model_dir, small_dataset_dir, tmp_path, config):
    out = tmp_path / "out"
    launcher = Path(sys.executable).parent / "deepspeed"
    result = run([
        str(launcher), "--num_gpus", "1", "--master_port", free_port(), "--module", "training.trainer",
        "--deepspeed", f"ds_configs/{config}", "--base_model", str(tiny_model_dir),
        "--dataset", str(small_dataset_dir), "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--cache_dir", str(tmp_path / "cache"),
    ])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    # Every weight was gathered from its ZeRO-3 shards: none missing (from_pretrained would fill
    # it with fresh random values and only warn), none empty, each of the model's full shape.
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, error messages
    saved = load_file(out / "model.safetensors")
    full = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).state_dict()
    assert {name: tuple(t.shape) for name, t in saved.items()} == {
        name: tuple(p.shape) for name, p in full.items() if name in saved}
    assert set(full) - set(saved) <= {"lm_head.weight"}  # tied to the embeddings, saved once
    # The trained weights, not the base model's: two steps moved every one of them.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    compared = [name for name in saved if base[name].shape == saved[name].shape]  # not the grown vocabulary
    assert len(compared) >= len(saved) - 1, sorted(saved)
    assert [name for name in compared if base[name].equal(saved[name])] == []


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_deepspeed_resumes_from_a_local_checkpoint_and_refuses_one_with_a_pickle_payload(
        tiny_model_dir, small_dataset_dir, zero2_first_runs, tmp_path, peft):
    """`--resume_from <a checkpoint folder>` under DeepSpeed ZeRO-2 continues at the step it saved,
    with every load weights_only (DeepSpeed's own asks for weights_only=False), for a full model
    and a LoRA adapter. The same folder with a crafted mp_rank_00_model_states.pt is refused, the
    file named, before the model loads; the payload never runs."""
    from tests.unit.test_safe_loading import write_payload
    from training.safe_loading import TRAINING_ARGS, unsafe_pickles

    def deepspeed(output: str, *args: str) -> subprocess.CompletedProcess:
        return zero2(tiny_model_dir, small_dataset_dir, tmp_path / output, peft, *args)

    first, _ = zero2_first_runs(peft)  # 4 steps, checkpoint-2 and checkpoint-4
    checkpoint = first / "checkpoints" / "checkpoint-2"
    assert unsafe_pickles(checkpoint) == []  # the allowlist takes every file the trainer wrote

    resumed = deepspeed("second", "--max_steps", "4", "--resume_from", str(checkpoint))
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-3000:]
    assert [int(s) for s in re.findall(r"\[trainer\] step (\d+)/4 loss=", resumed.stdout)] == [3, 4]
    metrics = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert (metrics["resumed_from_step"], metrics["global_step"]) == (2, 4)
    # A pickle: never part of the model (merged LoRA: of its adapter/ either); checkpoints keep theirs.
    assert [p for p in (tmp_path / "second").rglob(TRAINING_ARGS) if "checkpoints" not in p.parts] == []

    crafted = tmp_path / "crafted" / "checkpoint-2"
    shutil.copytree(checkpoint, crafted)
    marker = tmp_path / "payload-ran"
    bad = write_payload(crafted / "global_step2" / "mp_rank_00_model_states.pt", marker)
    refused = deepspeed("third", "--max_steps", "4", "--resume_from", str(crafted))
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert (f"Cannot resume:\n  {bad} holds a pickle that references posix.system, which a checkpoint never "
            "needs: it was not written by this trainer. Delete it or resume from another checkpoint.") in output
    assert "[trainer] model " not in output  # refused before the model loaded
    assert not marker.exists()
