"""Tokenized data sets (cached between runs), the padding collator, and padding-free packing.

Tokenization runs batched through ``datasets.map`` into an Arrow cache file named by everything
that decides its content (rows, tokenizer vocabulary, max length, prompt code, columns), so a
second run with the same inputs loads the cached file instead of tokenizing again.

Padding is what batches of unequal rows cost: ``python benchmarks/padding_efficiency.py`` measures
it for random batches, length-grouped batches (``--group_by_length``) and packing (``--packing``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from training import chat, prompt
from training.prompt import IGNORE_INDEX

# The tokenized columns. "length" (tokens per row) lets the Trainer's LengthGroupedSampler group
# rows without reading every row's input_ids first. The tuple is part of the cache key, so a
# cache written before a column was added is not reused without it.
LENGTH_COLUMN = "length"
COLUMNS = ("input_ids", "labels", LENGTH_COLUMN)

# Attention implementations that keep packed sequences apart (tests/unit/test_packing.py
# compares the per-token loss of packed and padded rows). sdpa and eager get a block-diagonal
# mask that transformers' create_causal_mask derives from the restarting position_ids;
# flash_attention_2 reads the boundaries from position_ids in its varlen kernel (GPU only).
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2")


# Rows are also dropped by their characters, before the tokenizer sees them: tokenizing one 5 MB
# row took 2.9 GB of memory only to drop it afterwards. English text averages about 4 characters
# per BPE token; a row of more than 16 x max_seq_length characters fits in max_seq_length tokens
# only if its tokens average over 16 characters (4x that), which takes long whitespace or
# punctuation runs, not text. Such a row is dropped and counted untokenized, like a long one.
MAX_CHARS_PER_TOKEN = 16


def _characters(row: dict[str, Any]) -> int:
    """The characters of a row's turns (a Dolly row: instruction, context and response)."""
    return sum(len(message["content"]) for message in chat.row_messages(row))


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(state.encode()).hexdigest()


def tokenize_rows(
    rows: list[dict[str, Any]], tokenizer: Any, *, max_seq_length: int, cache_dir: Path, split: str,
    prompt_format: str = "dolly",
) -> tuple[Any, int]:
    """(datasets.Dataset of input_ids/labels/length, rows dropped for being longer than max_seq_length).

    ``prompt_format`` dolly: the Dolly prompt (``training.prompt``); chat: every row as a
    conversation in the tokenizer's chat template (``training.chat``).

    Long rows are dropped, never truncated: a cut row would lose its ``### End`` (or an answer
    its end of turn) and teach the model to ramble. Raises BaseModelError when ``max_seq_length``
    is more than the model takes (``load_tokenizer`` reads that from the model's config).
    """
    import datasets

    from training.arguments import max_seq_length_problem
    from training.base_model import BaseModelError, max_positions

    if problem := max_seq_length_problem(max_seq_length, max_positions(tokenizer), tokenizer.name_or_path):
        raise BaseModelError(problem)
    given = len(rows)
    rows = [row for row in rows if _characters(row) <= MAX_CHARS_PER_TOKEN * max_seq_length]
    key = hashlib.sha256(
        "\x00".join(
            [
                json.dumps(rows, sort_keys=True, ensure_ascii=False),
                _tokenizer_digest(tokenizer),
                str(max_seq_length),
                prompt_format,
                tokenizer.chat_template or "",
                inspect.getsource(prompt),
                inspect.getsource(chat),
                ",".join(COLUMNS),
            ]
        ).encode()
    ).hexdigest()[:24]
    cache_dir.mkdir(parents=True, exist_ok=True)

    def keep_short(encoded: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        keep = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) <= max_seq_length]
        kept = {name: [values[i] for i in keep] for name, values in encoded.items()}
        kept[LENGTH_COLUMN] = [len(ids) for ids in kept["input_ids"]]
        return kept

    if prompt_format == "chat":
        # One JSON column: Dolly rows and conversations have different fields.
        source = datasets.Dataset.from_dict({"conversation": [json.dumps(chat.row_messages(r)) for r in rows]})

        def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            conversations = [json.loads(text) for text in batch["conversation"]]
            return keep_short(chat.encode_conversations(tokenizer, conversations))
    else:
        source = datasets.Dataset.from_list(rows)

        def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            return keep_short(prompt.encode_examples(tokenizer, batch["instruction"], batch["context"],
                                                     batch["response"]))

    tokenized = source.map(
        encode,
        batched=True,
        remove_columns=source.column_names,
        cache_file_name=str(cache_dir / f"{split}-{key}.arrow"),
        load_from_cache_file=True,
        desc=f"Tokenizing {split}",
    )
    return tokenized, given - len(tokenized)


class PaddingCollator:
    """Pads a batch to its longest row; padding is masked by position, not by token id.

    Masking by id would turn every eos into -100 when pad == eos (Pythia, SmolLM2), and the
    model would never learn to stop.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            multiple = self.pad_to_multiple_of
            longest = (longest + multiple - 1) // multiple * multiple
        input_ids, labels, attention = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            attention.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
        }


def packing_collator(model: Any) -> Any:
    """A padding-free collator for ``model``: each batch becomes one row, position_ids restart.

    Raises ValueError naming the fix when the model would let packed sequences attend to each
    other. Turns the model's KV cache off: transformers builds the packed-sequence mask only when
    no cache is passed, and with ``use_cache`` on (the config default) a training forward makes
    one, so every sequence silently attends to the ones packed before it (measured on a tiny
    Llama: per-token loss off by 0.06; with the cache off it matches the padded run to 1e-6).
    """
    import sys

    from transformers import DataCollatorWithFlattening

    attention = model.config._attn_implementation
    if attention not in PACKING_ATTENTION:
        raise ValueError(
            f"--packing: the model runs attention implementation {attention!r}; packed sequences "
            f"are verified to stay apart only with {', '.join(PACKING_ATTENTION)} "
            "(tests/unit/test_packing.py). Drop --packing: --group_by_length already removes "
            "most padding."
        )
    # Models whose modelling code builds its mask elsewhere (recurrent models, remote code that
    # does not use transformers' masking utilities) would mix the packed sequences.
    if not hasattr(sys.modules[type(model).__module__], "create_causal_mask"):
        raise ValueError(
            f"--packing: {type(model).__name__} does not build its attention mask with transformers' "
            "create_causal_mask, so nothing would keep the packed sequences apart. Drop --packing."
        )
    model.config.use_cache = False
    return DataCollatorWithFlattening()
