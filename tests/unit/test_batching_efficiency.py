"""Length-grouped batching pads far less than random batching; the trainer runs with it and --packing.

    python -m pytest -q tests/unit/test_batching_efficiency.py

The orders are the Trainer's own (RandomSampler, transformers' LengthGroupedSampler), taken from
benchmarks/padding_efficiency.py so the test checks the numbers the benchmark prints.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from benchmarks.padding_efficiency import (
    dolly_like_lengths,
    grouped_order,
    micro_batches,
    padding_efficiency,
    random_order,
)
from tests.conftest import REPO, python_env
from training.arguments import parse_args

SEED = 42


@pytest.fixture(scope="module")
def long_tail() -> list[int]:
    """The synthetic dolly-15k profile, rows past the presets' max length 1024 dropped."""
    return [n for n in dolly_like_lengths(seed=SEED) if n <= 1024]


def test_synthetic_set_has_dolly_15ks_long_tail():
    lengths = dolly_like_lengths(seed=SEED)
    assert len(lengths) == 15011
    assert 100 <= statistics.median(lengths) <= 200
    past_1000 = sum(n > 1000 for n in lengths) / len(lengths)
    assert 0.01 <= past_1000 <= 0.05  # a real tail: the rows that make random batches pad long


def test_efficiency_counts_rows_times_padded_length():
    batches = [[10, 30], [5]]
    assert padding_efficiency(batches) == pytest.approx(45 / (2 * 30 + 5))
    assert padding_efficiency(batches, pad_to_multiple_of=8) == pytest.approx(45 / (2 * 32 + 8))
    assert padding_efficiency(batches, packed=True) == 1.0


def test_length_grouped_batches_are_mostly_real_tokens(long_tail):
    grouped = grouped_order(long_tail, batch_size=8, accumulation=1, seed=SEED)
    assert sorted(grouped) == list(range(len(long_tail)))  # every row once per epoch, none dropped
    grouped_efficiency = padding_efficiency(micro_batches(grouped, long_tail, 8))
    random_efficiency = padding_efficiency(micro_batches(random_order(long_tail, SEED), long_tail, 8))
    assert grouped_efficiency >= 0.9
    assert random_efficiency < 0.5 < grouped_efficiency  # measured: 0.40 vs 0.94


def test_group_by_length_is_on_by_default_and_packing_off():
    _, _, train_args = parse_args([])
    assert train_args.group_by_length is True and train_args.packing is False
    _, _, train_args = parse_args(["--no_group_by_length", "--packing"])
    assert train_args.group_by_length is False and train_args.packing is True


def test_tokenized_rows_carry_their_length_and_the_column_set_keys_the_cache(tiny_tokenizer, tmp_path, monkeypatch):
    from training import batching

    rows = [{"instruction": "Hi?", "context": "", "response": "Hello there.", "category": ""},
            {"instruction": "Name a color.", "context": "Colors: red, blue.", "response": "Red.", "category": ""}]
    data, _ = batching.tokenize_rows(rows, tiny_tokenizer, max_seq_length=256, cache_dir=tmp_path, split="train")
    assert data[batching.LENGTH_COLUMN] == [len(ids) for ids in data["input_ids"]]
    # A cache written with other columns (before "length" existed) is a different file, never reused.
    monkeypatch.setattr(batching, "COLUMNS", ("input_ids", "labels"))
    batching.tokenize_rows(rows, tiny_tokenizer, max_seq_length=256, cache_dir=tmp_path, split="train")
    assert len(list(tmp_path.glob("train-*.arrow"))) == 2


def run_trainer(tiny_model_dir, small_dataset_dir, out, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "training.trainer", "--base_model", str(tiny_model_dir),
         "--dataset", str(small_dataset_dir), "--output_dir", str(out), "--max_steps", "2",
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3",
         "--logging_steps", "1", "--max_seq_length", "1024", "--eval_instructions", "none",
         "--cache_dir", str(out.parent / "cache"), *flags],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def padded_run(tiny_model_dir, small_dataset_dir, tmp_path_factory):
    return run_trainer(tiny_model_dir, small_dataset_dir, tmp_path_factory.mktemp("grouped") / "out",
                       "--group_by_length", "true")


def test_trainer_cli_runs_with_group_by_length(padded_run):
    result, metrics = padded_run
    assert "[trainer] batches: length-grouped order, padded to the longest row" in result.stdout
    assert metrics["global_step"] == 2 and metrics["tokens"] > 0
    assert all(math.isfinite(metrics[k]) for k in ("eval_loss_before", "eval_loss_after", "train_loss"))


def test_trainer_cli_packing_trains_exactly_like_padding(padded_run, tiny_model_dir, small_dataset_dir, tmp_path):
    # Same rows, same order, same model: only the batch layout differs, so every loss must match.
    result, metrics = run_trainer(tiny_model_dir, small_dataset_dir, tmp_path / "out", "--packing")
    assert "[trainer] batches: length-grouped order, packed into one row; sdpa attention" in result.stdout
    _, padded = padded_run
    assert metrics["tokens"] == padded["tokens"]  # real tokens seen: packing adds and loses none
    for key in ("eval_loss_before", "train_loss", "eval_loss_after"):
        # Measured: they agree to ~1e-6; letting the packed rows see each other moves eval loss ~4e-4.
        assert metrics[key] == pytest.approx(padded[key], abs=2e-5), key
