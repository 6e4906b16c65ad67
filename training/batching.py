"""Tokenized data sets (cached between runs) and the padding collator.

Tokenization runs batched through ``datasets.map`` into an Arrow cache file named by everything
that decides its content (rows, tokenizer vocabulary, max length, prompt code), so a second run
with the same inputs loads the cached file instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from training import prompt
from training.prompt import IGNORE_INDEX


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(state.encode()).hexdigest()


def tokenize_rows(
    rows: list[dict[str, str]], tokenizer: Any, *, max_seq_length: int, cache_dir: Path, split: str
) -> tuple[Any, int]:
    """(datasets.Dataset of input_ids/labels, rows dropped for being longer than max_seq_length).

    Long rows are dropped, never truncated: a cut row would lose its ``### End`` and teach the
    model to ramble.
    """
    import datasets

    key = hashlib.sha256(
        "\x00".join(
            [
                json.dumps(rows, sort_keys=True, ensure_ascii=False),
                _tokenizer_digest(tokenizer),
                str(max_seq_length),
                inspect.getsource(prompt),
            ]
        ).encode()
    ).hexdigest()[:24]
    cache_dir.mkdir(parents=True, exist_ok=True)

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        encoded = prompt.encode_examples(tokenizer, batch["instruction"], batch["context"], batch["response"])
        keep = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) <= max_seq_length]
        return {name: [values[i] for i in keep] for name, values in encoded.items()}

    source = datasets.Dataset.from_list(rows)
    tokenized = source.map(
        encode,
        batched=True,
        remove_columns=source.column_names,
        cache_file_name=str(cache_dir / f"{split}-{key}.arrow"),
        load_from_cache_file=True,
        desc=f"Tokenizing {split}",
    )
    return tokenized, len(source) - len(tokenized)


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
