"""Prompt format, label masking and padding: the Dolly v2 recipe's pure logic."""

from __future__ import annotations

import pytest

from training.batching import PaddingCollator, tokenize_rows
from training.prompt import (
    END_KEY,
    IGNORE_INDEX,
    INSTRUCTION_KEY,
    RESPONSE_KEY_NL,
    encode_examples,
    encode_prompt,
    format_example,
    format_prompt,
)

INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def test_format_without_context_is_dolly_v2_exactly():
    assert format_example("Name a color.", "Blue.") == (
        f"{INTRO}\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.\n\n### End"
    )


def test_format_with_context_has_input_block():
    assert format_prompt("Summarize.", "Cats sleep a lot.") == (
        f"{INTRO}\n\n### Instruction:\nSummarize.\n\nInput:\nCats sleep a lot.\n\n### Response:\n"
    )


def test_empty_context_has_no_input_block(tiny_tokenizer):
    assert "Input:" not in format_prompt("Say hi.", "")
    with_empty = encode_prompt(tiny_tokenizer, "Say hi.", "")
    assert tiny_tokenizer.decode(with_empty).count("Input:") == 0


def _ids(tokenizer, key):
    return tokenizer.convert_tokens_to_ids(key)


def test_labels_mask_prompt_and_learn_response_end_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    out = encode_examples(tok, ["Name a color."], ["A note about paint."], ["Blue."])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert len(ids) == len(labels)
    response_pos = ids.index(_ids(tok, RESPONSE_KEY_NL))
    # everything up to and including the response key is masked ...
    assert all(label == IGNORE_INDEX for label in labels[: response_pos + 1])
    # ... and everything after it is learned, ending with ### End then eos
    assert labels[response_pos + 1 :] == ids[response_pos + 1 :]
    assert ids[-2:] == [_ids(tok, END_KEY), tok.eos_token_id]
    assert tok.decode(ids[response_pos + 1 : -2]).strip() == "Blue."
    assert ids.count(_ids(tok, INSTRUCTION_KEY)) == 1


def test_response_key_text_inside_context_stays_plain_text(tiny_tokenizer):
    tok = tiny_tokenizer
    tricky = "The log said ### Response:\nok and ### End then ### Instruction: again."
    out = encode_examples(tok, ["What did the log say?"], [tricky], ["It said ok."])
    ids, labels = out["input_ids"][0], out["labels"][0]
    # exactly one of each key: the ones the template put there, not the context's text
    assert ids.count(_ids(tok, RESPONSE_KEY_NL)) == 1
    assert ids.count(_ids(tok, END_KEY)) == 1
    assert ids.count(_ids(tok, INSTRUCTION_KEY)) == 1
    first_learned = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tok.decode(ids[first_learned:-2]).strip() == "It said ok."
    # the context's text survives intact in the prompt
    assert "### Response:" in tok.decode(ids[:first_learned], skip_special_tokens=True)


def test_unicode_round_trips(tiny_tokenizer):
    tok = tiny_tokenizer
    out = encode_examples(tok, ["Traduis «bonjour» 日本語"], [""], ["Héllo, naïve café — ok ✓"])
    ids, labels = out["input_ids"][0], out["labels"][0]
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(learned[:-2]).strip() == "Héllo, naïve café — ok ✓"
    assert "Traduis «bonjour» 日本語" in tok.decode(ids)


def test_prompt_ids_are_a_prefix_of_training_ids(tiny_tokenizer):
    """Generation encodes exactly what training conditioned on."""
    tok = tiny_tokenizer
    prompt = encode_prompt(tok, "Name a color.", "ctx")
    full = encode_examples(tok, ["Name a color."], ["ctx"], ["Blue."])["input_ids"][0]
    assert full[: len(prompt)] == prompt


def test_long_rows_are_dropped_and_counted_not_truncated(tiny_tokenizer, tmp_path):
    rows = [
        {"instruction": "Short?", "context": "", "response": "Yes.", "category": ""},
        {"instruction": "Long?", "context": "word " * 400, "response": "No.", "category": ""},
        {"instruction": "Also short?", "context": "", "response": "Yes.", "category": ""},
    ]
    data, dropped = tokenize_rows(rows, tiny_tokenizer, max_seq_length=128, cache_dir=tmp_path, split="train")
    assert dropped == 1
    assert len(data) == 2
    end_id = _ids(tiny_tokenizer, END_KEY)
    for row in data:  # every kept row still ends with ### End + eos
        assert row["input_ids"][-2:] == [end_id, tiny_tokenizer.eos_token_id]
        assert len(row["input_ids"]) <= 128


def test_tokenization_is_cached_between_runs(tiny_tokenizer, tmp_path):
    rows = [{"instruction": "Hi?", "context": "", "response": "Hello.", "category": ""}] * 3
    tokenize_rows(rows, tiny_tokenizer, max_seq_length=64, cache_dir=tmp_path, split="train")
    cached = sorted(p.name for p in tmp_path.glob("train-*.arrow"))
    assert len(cached) == 1
    again, _ = tokenize_rows(rows, tiny_tokenizer, max_seq_length=64, cache_dir=tmp_path, split="train")
    assert sorted(p.name for p in tmp_path.glob("train-*.arrow")) == cached
    assert again.cache_files[0]["filename"].endswith(cached[0])
    # a different max length is a different cache entry
    tokenize_rows(rows, tiny_tokenizer, max_seq_length=65, cache_dir=tmp_path, split="train")
    assert len(list(tmp_path.glob("train-*.arrow"))) == 2


def test_collator_masks_padding_by_position_even_when_pad_is_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the trap this guards against
    out = encode_examples(tok, ["A?", "A much longer question here?"], ["", ""], ["B.", "C."])
    features = [{"input_ids": i, "labels": label} for i, label in zip(out["input_ids"], out["labels"], strict=True)]
    batch = PaddingCollator(tok.pad_token_id, pad_to_multiple_of=8)(features)
    assert batch["input_ids"].shape[1] % 8 == 0
    short_len = len(out["input_ids"][0])
    labels = batch["labels"][0].tolist()
    # the real eos is still a learned label; only the padding after it is masked
    assert labels[short_len - 1] == tok.eos_token_id
    assert all(label == IGNORE_INDEX for label in labels[short_len:])
    assert batch["attention_mask"][0].tolist() == [1] * short_len + [0] * (len(labels) - short_len)


@pytest.mark.parametrize("key", [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL])
def test_keys_are_single_special_tokens(tiny_tokenizer, key):
    ids = tiny_tokenizer(key, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and ids[0] == _ids(tiny_tokenizer, key)
