"""Answering the evaluation instructions before training and after every epoch."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, python_env, run_bounded
from training.evaluation import (
    DEFAULT_EVAL_INSTRUCTIONS,
    EvalInstructionsError,
    load_eval_instructions,
)


def test_shipped_instructions_load():
    rows = load_eval_instructions(DEFAULT_EVAL_INSTRUCTIONS)
    assert len(rows) >= 8 and any(r["context"] for r in rows)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"instruction": "ok"}\n{"instruction": \n', "line 2: not valid JSON"),
        ('{"instruction": ""}\n', "line 1: needs a non-empty 'instruction'"),
        ('{"instruction": "x", "context": 3}\n', "line 1: 'context' must be a string"),
        ("\n\n", "has no instructions"),
    ],
)
def test_bad_instruction_files_name_file_and_line(tmp_path, content, expected):
    path = tmp_path / "eval.jsonl"
    path.write_text(content)
    with pytest.raises(EvalInstructionsError, match=expected):
        load_eval_instructions(path)
    with pytest.raises(EvalInstructionsError, match="does not exist"):
        load_eval_instructions(tmp_path / "missing.jsonl")


def test_trainer_answers_before_training_after_each_epoch(plain_trainer_run):
    """2 epochs of 12 steps (`plain_trainer_run` in tests/conftest.py), answers of 8 tokens at most."""
    out, result = plain_trainer_run
    metrics = json.loads((out / "metrics.json").read_text())
    labels = [point["label"] for point in metrics["evaluation"]]
    assert labels == ["base", "epoch 1", "epoch 2"]
    rows = load_eval_instructions(DEFAULT_EVAL_INSTRUCTIONS)
    for point in metrics["evaluation"]:
        assert [a["instruction"] for a in point["answers"]] == [r["instruction"] for r in rows]
        assert all(a["new_tokens"] <= 8 for a in point["answers"])
        # --eval_max_new_tokens 8 is the limit: an answer that did not end was cut at exactly 8.
        assert all(a["new_tokens"] == 8 for a in point["answers"] if not a["ended"]), point["answers"]
    # Greedy decoding: the saved model, loaded anew, gives the last point's answers again.
    from training.generate import generate_response, load_for_generation

    model, tokenizer = load_for_generation(str(out))
    again = [generate_response(model, tokenizer, r["instruction"], r["context"], max_new_tokens=8) for r in rows]
    assert [(a.text, a.new_tokens, a.ended) for a in again] == [
        (a["response"], a["new_tokens"], a["ended"]) for a in metrics["evaluation"][-1]["answers"]]
    assert metrics["ended_share_base"] == metrics["evaluation"][0]["ended_share"]
    assert metrics["perplexity_after"] == pytest.approx(2.718281828 ** metrics["eval_loss_after"], rel=1e-6)
    assert "[trainer] evaluation base:" in result.stdout


def test_zero3_two_ranks_share_the_answers_and_match_one_process(tiny_model_dir, small_dataset_dir, plain_trainer_run,
                                                                 tmp_path):
    """Two CPU ranks under ZeRO-3 (sharded weights) answer like one plain process would."""
    common = ["--base_model", str(tiny_model_dir), "--dataset", str(small_dataset_dir), "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--max_seq_length", "1024", "--eval_max_new_tokens", "8",
              "--cache_dir", str(tmp_path / "cache")]

    def train(*launch: str, out: str) -> tuple[dict, str]:
        # No retry: two gloo ranks used to abort at interpreter exit in ~1 run of 5; the trainer
        # now ends them with os._exit (training/trainer.py, _exit_without_teardown).
        result = run_bounded([*launch, *common, "--output_dir", str(tmp_path / out)], cwd=REPO, env=python_env(),
                             timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return json.loads((tmp_path / out / "metrics.json").read_text()), result.stdout

    launcher = str(Path(sys.executable).parent / "deepspeed")
    sharded, log = train(launcher, "--num_gpus", "2", "--master_port", free_port(), "--module", "training.trainer",
                         "--deepspeed", "ds_configs/zero3.json", out="zero3")
    # One plain process: the same model, data, batch size and answer length (and 2 epochs).
    plain = json.loads((plain_trainer_run[0] / "metrics.json").read_text())
    assert sharded["world_size"] == 2
    # The same base model (new-token embeddings initialised on the gathered ZeRO-3 weights).
    assert math.isfinite(sharded["eval_loss_before"])
    assert sharded["eval_loss_before"] == pytest.approx(plain["eval_loss_before"], rel=1e-4)
    base_sharded, base_plain = sharded["evaluation"][0], plain["evaluation"][0]
    assert base_sharded["ranks"] == 2 and base_plain["ranks"] == 1
    assert base_sharded["answers"] == base_plain["answers"]  # greedy: the same text, in the same order
    # Rank 0 reports each point once; the other rank answered its share without printing.
    assert log.count("[trainer] evaluation base:") == 1
    # base, then the point where max_steps ended the run (inside the first epoch)
    assert [p["label"] for p in sharded["evaluation"]] == ["base", "epoch 0.33"]  # 2 of 6 steps per epoch
    assert [p["global_step"] for p in sharded["evaluation"]] == [0, 2]
