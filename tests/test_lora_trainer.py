"""LoRA and QLoRA through the trainer's CLI, as users run it: one process, and two CPU ranks
under the deepspeed launcher with ZeRO-3."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, build_tiny_model, free_port, python_env, run_bounded

TRAINER = [sys.executable, "-m", "training.trainer"]


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory) -> Path:
    """Hidden size 64 (bitsandbytes' 4-bit blocks) and an output head of its own, like Pythia's,
    whose rows of the Dolly keys must train as well as the input embedding's."""
    return build_tiny_model(tmp_path_factory.mktemp("untied-llama"), hidden_size=64, tied=False)


def train(args: list[str], tmp_path: Path, *, launcher: list[str] | None = None) -> str:
    result = run_bounded([*(launcher or TRAINER), *args, "--cache_dir", str(tmp_path / "cache")],
                         cwd=REPO, env=python_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return result.stdout


def start_of_training(model_dir: Path) -> dict:
    """The base model as the trainer starts from it: Dolly keys added, their rows initialized."""
    import torch

    from training.base_model import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    return load_model(str(model_dir), tokenizer, dtype=torch.float32).state_dict()


def assert_only_key_rows_trained(merged_dir: Path, base_dir: Path) -> None:
    """The merged model's embedding and head: the Dolly keys' rows moved, no other row did."""
    from safetensors.torch import load_file

    merged = load_file(merged_dir / "model.safetensors")
    start = start_of_training(base_dir)
    old_vocab = json.loads((base_dir / "config.json").read_text())["vocab_size"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == start[name].shape, name
        assert merged[name][:old_vocab].equal(start[name][:old_vocab]), f"{name}: rows of old tokens changed"
        new_rows = merged[name][old_vocab:]
        assert len(new_rows) == 3, name  # ### End, ### Instruction:, ### Response:
        assert not (new_rows - start[name][old_vocab:]).abs().amax(dim=1).eq(0).any(), \
            f"{name}: a key's row did not train"
    # LoRA moved the attention and MLP weights (merged in); the norms stayed frozen.
    assert not merged["model.layers.0.self_attn.q_proj.weight"].equal(start["model.layers.0.self_attn.q_proj.weight"])
    assert merged["model.layers.0.input_layernorm.weight"].equal(start["model.layers.0.input_layernorm.weight"])


def test_lora_trains_adapters_and_the_key_rows_only_and_saves_adapter_and_merged_model(untied_model_dir, tmp_path):
    out = tmp_path / "out"
    stdout = train(["--base_model", str(untied_model_dir), "--dataset", "bundled:dolly-sample",
                    "--sample_fraction", "0.2", "--output_dir", str(out), "--peft", "lora", "--max_steps", "6",
                    "--save_steps", "3", "--learning_rate", "5e-3", "--eval_max_new_tokens", "8"], tmp_path)
    assert "lora: 0." in stdout and "M trainable" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["peft"] == "lora" and metrics["global_step"] == 6
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    # r x (in + out) per adapted layer, r=16, 2 layers: q, o (64->64), k, v (64->32: 2 of 4 heads),
    # gate, up (64->128), down (128->64); plus 3 rows x 64 of the embedding and of the untied head.
    lora = 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert metrics["trainable_parameters"] == lora + 2 * 3 * 64, metrics["trainable_parameters"]

    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(untied_model_dir)  # as given, resolvable elsewhere
    assert config["r"] == 16 and config["lora_alpha"] == 32
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    # The token rows alone, never the whole (resized) embedding or head.
    assert max(t.numel() for t in weights.values()) < 400 * 64, {k: t.shape for k, t in weights.items()}
    assert any("trainable_tokens" in name for name in weights) and any("lora_A" in name for name in weights)
    assert metrics["adapter_bytes"] < 0.5 * (untied_model_dir / "model.safetensors").stat().st_size
    # A checkpoint holds the adapter and its optimizer state, not the frozen base weights.
    checkpoint = out / "checkpoints" / "checkpoint-6"
    assert not list(checkpoint.glob("model*.safetensors")) and (checkpoint / "adapter_model.safetensors").is_file()
    assert metrics["checkpoint_bytes"] == sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())

    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)  # the merged model
    assert not any(info.values()), info
    assert_only_key_rows_trained(out, untied_model_dir)


def test_packed_qlora_on_cpu_saves_the_adapter_alone_and_generate_puts_it_on_its_base(untied_model_dir, tmp_path):
    out = tmp_path / "out"
    stdout = train(["--base_model", str(untied_model_dir), "--dataset", "bundled:dolly-sample",
                    "--sample_fraction", "0.2", "--output_dir", str(out), "--peft", "qlora", "--max_steps", "4",
                    "--learning_rate", "5e-3", "--merge_adapter", "false", "--eval_instructions", "none",
                    "--packing", "true"], tmp_path)
    assert "frozen base weights in 4-bit NF4" in stdout and "packed into one row" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["peft"] == "qlora" and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    assert not (out / "model.safetensors").exists()

    cli = run_bounded([sys.executable, "-m", "training.generate", "--model", str(out), "--max-new-tokens", "6",
                       "Name a color."], cwd=REPO, env=python_env(), timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert cli.stdout.strip()


def test_lora_under_zero3_on_two_cpu_ranks(untied_model_dir, tmp_path):
    out = tmp_path / "out"
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", free_port(),
                "--module", "training.trainer"]
    train(["--deepspeed", "ds_configs/zero3.json", "--base_model", str(untied_model_dir),
           "--dataset", "bundled:dolly-sample", "--sample_fraction", "0.2", "--output_dir", str(out),
           "--peft", "lora", "--max_steps", "3", "--per_device_train_batch_size", "4",
           "--learning_rate", "5e-3", "--eval_max_new_tokens", "4"], tmp_path, launcher=launcher)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3
    # ZeRO-3 gathered the adapter's shards for the save; the merge took the rows and adapters.
    assert_only_key_rows_trained(out, untied_model_dir)
    # DeepSpeed's checkpoint leaves the frozen base out (exclude_frozen_parameters).
    base_bytes = (untied_model_dir / "model.safetensors").stat().st_size
    model_states = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*model_states.pt"))
    assert 0 < model_states < base_bytes, (model_states, base_bytes)


def test_qlora_gradients_stay_right_after_an_evaluation_on_cpu(untied_model_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference at the first forward pass without
    gradients; the backward pass then went wrong (QLoRA's loss rose). The gradient through the
    4-bit layers is the same before and after an evaluation."""
    import torch

    from training.adapters import apply_lora, quantization_config
    from training.arguments import ModelArguments
    from training.base_model import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(untied_model_dir))
    model = load_model(str(untied_model_dir), tokenizer, dtype=torch.float32,
                       quantization=quantization_config(torch.float32))
    model = apply_lora(model, tokenizer, ModelArguments(base_model=str(untied_model_dir), peft="qlora",
                                                        lora_dropout=0.0), quantized=True)
    ids = tokenizer(["Name three primary colors: red, yellow and blue."], return_tensors="pt")["input_ids"]

    def input_gradient() -> torch.Tensor:
        model.train()
        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeddings, labels=ids).loss.backward()
        return embeddings.grad

    before = input_gradient()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert torch.allclose(input_gradient(), before, rtol=1e-4, atol=1e-7)


def test_only_bitsandbytes_missing_cpu_kernel_warning_is_dropped(caplog):
    """bitsandbytes warns at import, on CPUs with AVX-512 BF16, that it could not fetch a fused
    4-bit CPU kernel from the hub; peft imports it on every run. The trainer drops that message
    (training/adapters.py says why), and nothing else its logger says."""
    import inspect
    import logging

    import bitsandbytes.backends.cpu.ops as cpu_ops

    from training.adapters import CPU_KERNEL_WARNING, quiet_missing_cpu_kernel_warning

    assert CPU_KERNEL_WARNING in inspect.getsource(cpu_ops)  # the message this bitsandbytes writes
    quiet_missing_cpu_kernel_warning()
    with caplog.at_level(logging.WARNING):
        cpu_ops.logger.warning(CPU_KERNEL_WARNING + " from kernels-community: %s. Please make sure ...", "offline")
        cpu_ops.logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records if r.name == cpu_ops.logger.name] == ["another bitsandbytes warning"]
