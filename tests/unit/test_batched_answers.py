"""Batched greedy answers are the one-by-one answers, token for token; ranks share rows evenly.

The tiny random Llama of tests/conftest.py, in float32 on the CPU, with its matrices drawn again
at std 0.3: at the default init (std 0.02) it answers every prompt with one token repeated, and
the comparison would prove nothing. At 0.3 the answers differ by prompt, and in the Dolly format
"What is a haiku?" emits a stop token as its 4th token while the other prompts go on.
"""

from __future__ import annotations

import math

import pytest

from training.evaluation import answer_all, rows_of_rank

PROMPTS = [  # (instruction, context), of different lengths: each batch is left-padded
    ("What is a haiku?", ""),
    ("Give three tips for a good night's sleep, and explain each one.", ""),
    ("Summarize.", "Paris is the capital of France, on the Seine, with two million people."),
    ("Hi", ""),
    ("Name three rivers in Europe and the seas they flow into.", ""),
]
MAX_NEW_TOKENS = 24


def varied_model(model_dir, tokenizer):
    import torch

    from training.base_model import load_model

    model = load_model(str(model_dir), tokenizer, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:  # embeddings and projections; the norms keep their ones
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    assert next(model.parameters()).dtype == torch.float32
    return model


@pytest.fixture(scope="module")
def dolly(tiny_model_dir):
    from training.base_model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    return varied_model(tiny_model_dir, tokenizer), tokenizer


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    from pathlib import Path

    from training.base_model import load_tokenizer

    template = Path(__file__).resolve().parent.parent / "fixtures" / "chat_templates" / "smollm2_chatml.jinja"
    tokenizer = load_tokenizer(str(tiny_model_dir), prompt_format="chat", chat_template=str(template))
    return varied_model(tiny_model_dir, tokenizer), tokenizer


def generated_rows(model, monkeypatch) -> list[list[list[int]]]:
    """Records each generate call's new tokens, row by row (what follows the padded prompt)."""
    calls = []
    original = model.generate

    def generate(**kwargs):
        output = original(**kwargs)
        calls.append(output[:, kwargs["input_ids"].shape[1]:].tolist())
        return output

    monkeypatch.setattr(model, "generate", generate)
    return calls


def up_to_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """The tokens through the first stop token: a row that ended earlier than its batch is
    padded after it, which one prompt alone never is."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: position + 1]
    return tokens


@pytest.mark.parametrize("batch_size", [2, 8])  # three calls, the last of one row; one call
@pytest.mark.parametrize("setup", ["dolly", "chat"])
def test_batched_answers_are_the_one_by_one_answers(setup, batch_size, request, monkeypatch):
    from training.generate import generate_response, generate_responses
    from training.prompt_format import prompt_format_of, stop_token_ids

    model, tokenizer = request.getfixturevalue(setup)
    assert prompt_format_of(tokenizer) == setup
    stop_ids = stop_token_ids(tokenizer)
    padding = (tokenizer.padding_side, tokenizer.pad_token)
    calls = generated_rows(model, monkeypatch)

    alone = [generate_response(model, tokenizer, instruction, context, max_new_tokens=MAX_NEW_TOKENS)
             for instruction, context in PROMPTS]
    alone_tokens = [up_to_stop(rows[0], stop_ids) for rows in calls]
    calls.clear()
    batched = generate_responses(model, tokenizer, PROMPTS, batch_size=batch_size, max_new_tokens=MAX_NEW_TOKENS)
    batched_tokens = [up_to_stop(row, stop_ids) for rows in calls for row in rows]

    assert len(calls) == math.ceil(len(PROMPTS) / batch_size)
    assert batched_tokens == alone_tokens
    assert batched == alone  # text, ended and new_tokens
    assert all(a.new_tokens == MAX_NEW_TOKENS for a in alone if not a.ended)
    assert (tokenizer.padding_side, tokenizer.pad_token) == padding  # left-padded without touching it
    if setup == "dolly":
        # One answer ends early (eos) while the others run to the limit: the ended row is padded
        # in its batch and cut at its stop token as it is alone. (In the chat format none of
        # these prompts ends within 24 tokens; the comparison above still holds there.)
        assert (alone[0].ended, alone[0].new_tokens, alone[1].ended) == (True, 3, False), alone


def test_answer_all_in_batches_matches_one_at_a_time(dolly):
    model, tokenizer = dolly
    rows = [{"instruction": instruction, "context": context} for instruction, context in PROMPTS]
    points = [answer_all(model, tokenizer, rows, label="base", max_new_tokens=MAX_NEW_TOKENS, batch_size=size)
              for size in (1, 3)]
    assert points[0]["answers"] == points[1]["answers"]
    assert [a["instruction"] for a in points[1]["answers"]] == [r["instruction"] for r in rows]
    assert points[1]["decoding"]["batch_size"] == 3 and not model.training


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 9])
@pytest.mark.parametrize("count", [1, 5, 8, 9, 17])
def test_every_rank_answers_as_many_rows_and_keeps_only_its_own(count, world):
    shares = [rows_of_rank(count, rank, world) for rank in range(world)]
    # The same number of rows on every rank: in batches of any one size, the same generate calls.
    assert len({len(indices) for indices, _ in shares}) == 1
    assert len(shares[0][0]) == math.ceil(count / world)
    kept = [index for indices, keep in shares for index in indices[:keep]]
    assert sorted(kept) == list(range(count))  # each row answered once, by rank row % world
    for rank, (indices, keep) in enumerate(shares):
        assert indices[:keep] == list(range(rank, count, world))
        assert all(0 <= index < count for index in indices[keep:])  # padding repeats a real row


def test_benchmark_imports():
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("benchmark_eval_answers", REPO / "benchmarks" / "eval_answers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
