"""The chat prompt format through the trainer's CLI, as users run it, on the tiny model.

The tiny model has no chat template, so these runs set ``--chat_template chatml``; the data mixes
every row kind (messages with a system prompt and two exchanges, ShareGPT, Dolly) and one
conversation too long to keep.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE_DIR, python_env, read_jsonl, run_bounded, write_jsonl

TRAINER = [sys.executable, "-m", "training.trainer"]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    """24 train rows (8 of each kind) + one 2000-word conversation, 8 eval rows."""
    rows = read_jsonl(SAMPLE_DIR / "train.jsonl")[:24]
    train = []
    for number, row in enumerate(rows):
        if number % 3 == 0:
            train.append({"messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": row["instruction"]},
                {"role": "assistant", "content": row["response"][:300]},
                {"role": "user", "content": "Thank you. One more time, shorter?"},
                {"role": "assistant", "content": row["response"][:60]},
            ]})
        elif number % 3 == 1:
            train.append({"conversations": [{"from": "human", "value": row["instruction"]},
                                            {"from": "gpt", "value": row["response"][:300]}]})
        else:
            train.append(row)
    train.append({"messages": [{"role": "user", "content": "Tell a long story."},
                               {"role": "assistant", "content": " ".join(["once upon a time"] * 500)}]})
    out = tmp_path_factory.mktemp("chat-data")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", read_jsonl(SAMPLE_DIR / "eval.jsonl")[:8])
    return out


def train(args: list[str], tmp_path: Path) -> str:
    result = run_bounded([*TRAINER, *args, "--cache_dir", str(tmp_path / "cache")], cwd=REPO, env=python_env(),
                         timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return result.stdout


def test_chat_format_trains_on_every_row_kind_and_saves_a_model_that_knows_its_template(
        tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "out"
    stdout = train(["--base_model", str(tiny_model_dir), "--dataset", str(chat_data), "--prompt_format", "chat",
                    "--chat_template", "chatml", "--max_seq_length", "1024", "--output_dir", str(out),
                    "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                    "--eval_max_new_tokens", "8"], tmp_path)
    assert "prompt format chat: answers end at <|im_end|>" in stdout
    assert "dropped conversations longer than 1024 tokens: 1 train, 0 eval" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["prompt_format"], metrics["end_marker"]) == ("chat", "<|im_end|>")
    assert metrics["train_rows"] == 24 and metrics["dropped_long_rows"] == 1
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["evaluation"][0]["end_marker"] == "<|im_end|>"

    from training.chat import CHATML_TEMPLATE

    assert (out / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    # A plain pipeline renders the model's template for chat messages and answers as the assistant.
    chat = pipeline("text-generation", model=str(out))
    reply = chat([{"role": "user", "content": "Name a color."}], max_new_tokens=4)[0]["generated_text"]
    assert reply[-1]["role"] == "assistant"

    result = run_bounded([sys.executable, "-m", "training.generate", "--model", str(out), "--system", "Be brief.",
                          "--max-new-tokens", "4", "Name a color."], cwd=REPO, env=python_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[stopped at --max-new-tokens 4 before <|im_end|>]" in result.stdout or result.stdout.strip()


def test_chat_format_with_lora_and_packing_trains_the_template_token_rows(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "out"
    train(["--base_model", str(tiny_model_dir), "--dataset", str(chat_data), "--prompt_format", "chat",
           "--chat_template", "chatml", "--max_seq_length", "1024", "--output_dir", str(out), "--peft", "lora",
           "--packing", "true", "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
           "--eval_instructions", "none"], tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    rows = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert adapter["trainable_token_indices"] == {"model.embed_tokens": sorted(rows)}  # tied head: follows
    # The merged model stops at the end of turn too.
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_chat_format_without_a_template_stops_before_training_with_the_fix(tiny_model_dir, chat_data, tmp_path):
    result = run_bounded([*TRAINER, "--base_model", str(tiny_model_dir), "--dataset", str(chat_data),
                          "--prompt_format", "chat", "--output_dir", str(tmp_path / "out"),
                          "--cache_dir", str(tmp_path / "cache")], cwd=REPO, env=python_env(), timeout=300)
    assert result.returncode != 0
    assert "has no chat template. Set one with --chat_template chatml" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
