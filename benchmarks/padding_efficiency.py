"""Padding efficiency of the ways to batch instruction rows: real tokens / processed tokens.

    python benchmarks/padding_efficiency.py                  # bundled sample + synthetic dolly-15k
    python benchmarks/padding_efficiency.py --seed 7 --rows 15011

Processed tokens are what the model computes on: per micro-batch, rows x padded length, summed
over one epoch (one device's micro-batches are consecutive slices of the sampler's order; with
several devices accelerate deals them out in turn, which does not change the sum). Strategies:

  dolly    databricks/dolly v2: the Trainer's RandomSampler, pad to the longest row of the batch,
           rounded up to a multiple of 8 (DataCollatorForCompletionOnlyLM(pad_to_multiple_of=8)).
  random   our trainer with --group_by_length false (what it did before): the same RandomSampler
           and PaddingCollator; rounded up to a multiple of 8 only on GPU presets.
  grouped  --group_by_length (the default): transformers' own LengthGroupedSampler with the
           Trainer's arguments (batch = per-device batch x gradient accumulation; mega-batches of
           up to 50 such batches, each sorted by length), seeded like the others.
  packed   --packing: every micro-batch concatenated into one row (DataCollatorWithFlattening):
           1.0 by construction. Only correct where attention keeps the sequences apart
           (training.batching.PACKING_ATTENTION); with sdpa/eager that is a block-diagonal mask
           over the whole row, so attention work grows with the square of the batch's tokens.

Data: the shipped sample (``bundled:dolly-sample``, train split) tokenized by our own code with
the bundled SmolLM2 tokenizer, and a synthetic set with dolly-15k's length profile (below),
each at the batch settings of the flow's presets (flows/configs/*.json) and at a plain batch of 8.

The synthetic profile. databricks-dolly-15k (15,011 rows) cannot be downloaded here, so its
lengths are drawn from a two-part lognormal mixture chosen to match its known shape: 30% of the
rows are context-heavy (closed_qa 1,773 + information_extraction 1,506 + summarization 1,188 =
4,467 rows, whose "Input:" block holds a Wikipedia passage), the rest are questions, lists and
classifications without context. Every row pays the prompt template (40 tokens: the shortest
shipped row). No-context rows: 40 + lognormal(median 70, sigma 0.8) tokens; context rows:
40 + lognormal(median 300, sigma 0.8). That gives a median of ~140 tokens, a mean of ~230, and
~2% of rows past 1,000 tokens (the right-skewed tail that makes random batches pad to ~1,000).
Rows longer than --max_seq_length are dropped, as the trainer drops them. Only the lengths
matter for padding, so the set is lengths, not text.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `training` importable
    sys.path.insert(0, str(REPO))

DOLLY_ROWS = 15011
CONTEXT_SHARE = 4467 / DOLLY_ROWS  # closed_qa + information_extraction + summarization
TEMPLATE_TOKENS = 40
STRATEGIES = ("dolly", "random", "grouped", "packed")


def dolly_like_lengths(rows: int = DOLLY_ROWS, seed: int = 42) -> list[int]:
    """Token counts with dolly-15k's long-tailed profile (see the module docstring)."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(rows):
        median = 300 if rng.random() < CONTEXT_SHARE else 70
        lengths.append(TEMPLATE_TOKENS + round(rng.lognormvariate(math.log(median), 0.8)))
    return lengths


def micro_batches(order: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """The lengths of each micro-batch: consecutive slices of the sampler's order."""
    return [[lengths[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def random_order(lengths: list[int], seed: int) -> list[int]:
    """The Trainer's default sampler (RandomSampler) over the rows."""
    import torch

    return list(torch.utils.data.RandomSampler(lengths, generator=torch.Generator().manual_seed(seed)))


def grouped_order(lengths: list[int], batch_size: int, accumulation: int, seed: int) -> list[int]:
    """The order of ``train_sampling_strategy="group_by_length"``: the Trainer builds this sampler."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    sampler = LengthGroupedSampler(
        batch_size * accumulation, lengths=lengths, generator=torch.Generator().manual_seed(seed)
    )
    return list(sampler)


def padding_efficiency(batches: list[list[int]], *, pad_to_multiple_of: int | None = None,
                       packed: bool = False) -> float:
    """Real tokens / processed tokens over ``batches`` (lists of row lengths)."""
    real = sum(sum(batch) for batch in batches)
    if packed:  # one row of all the batch's tokens, no padding
        return real / sum(sum(batch) for batch in batches)
    multiple = pad_to_multiple_of or 1
    processed = sum(len(batch) * (-(-max(batch) // multiple) * multiple) for batch in batches)
    return real / processed


def compare(lengths: list[int], *, batch_size: int, accumulation: int, gpu: bool, seed: int) -> dict[str, float]:
    """Efficiency of every strategy on one data set at one batch setting."""
    shuffled = micro_batches(random_order(lengths, seed), lengths, batch_size)
    grouped = micro_batches(grouped_order(lengths, batch_size, accumulation, seed), lengths, batch_size)
    ours_multiple = 8 if gpu else None  # training.trainer: pad_to_multiple_of=8 on CUDA only
    return {
        "dolly": padding_efficiency(shuffled, pad_to_multiple_of=8),
        "random": padding_efficiency(shuffled, pad_to_multiple_of=ours_multiple),
        "grouped": padding_efficiency(grouped, pad_to_multiple_of=ours_multiple),
        "packed": padding_efficiency(shuffled, packed=True),
    }


def preset_settings() -> list[dict]:
    """Batch settings of the flow's presets (presets that share one are listed together), and batch 8."""
    settings: dict[tuple, list[str]] = {(8, 1, 1024, True): ["batch 8 (GPU)"]}
    for path in sorted((REPO / "flows" / "configs").glob("*.json")):
        config = json.loads(path.read_text())
        training = config["training"]
        key = (training["batch_size"], training.get("gradient_accumulation_steps", 1),
               training["max_seq_length"], config["resources"].get("gpu", 0) > 0)
        settings.setdefault(key, []).append(path.stem)
    return [{"name": ",".join(names), "batch": batch, "accum": accum, "max_len": max_len, "gpu": gpu}
            for (batch, accum, max_len, gpu), names in settings.items()]


def bundled_lengths(max_seq_length: int) -> tuple[list[int], int]:
    """(token counts of the shipped sample's train rows, rows dropped as too long), our tokenizer path."""
    import datasets

    from training.base_model import BUNDLED_MODEL, load_tokenizer, resolve_base_model
    from training.batching import LENGTH_COLUMN, tokenize_rows
    from training.dataset import BUNDLED_DATASET, default_cache_dir, load_instruction_data

    datasets.disable_progress_bars()
    cache = default_cache_dir()
    tokenizer = load_tokenizer(resolve_base_model(BUNDLED_MODEL, cache))
    rows = load_instruction_data(BUNDLED_DATASET, cache_dir=cache).train
    tokenized, dropped = tokenize_rows(rows, tokenizer, max_seq_length=max_seq_length,
                                       cache_dir=cache / "tokenized", split="train")
    return list(tokenized[LENGTH_COLUMN]), dropped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=42, help="Seed of the samplers and the synthetic set.")
    parser.add_argument("--rows", type=int, default=DOLLY_ROWS, help="Rows of the synthetic set.")
    args = parser.parse_args(argv)

    synthetic = dolly_like_lengths(args.rows, args.seed)
    header = (f"{'data':<9} {'preset':<27} {'batch':>10} {'rows':>6} {'drop':>5} {'mean':>5} {'max':>5}  "
              + " ".join(f"{s:>7}" for s in STRATEGIES))
    print(header)
    print("-" * len(header))
    bundled_cache: dict[int, tuple[list[int], int]] = {}
    for setting in preset_settings():
        max_len = setting["max_len"]
        if max_len not in bundled_cache:
            bundled_cache[max_len] = bundled_lengths(max_len)
        kept = [n for n in synthetic if n <= max_len]
        sets = {"bundled": bundled_cache[max_len], "synthetic": (kept, len(synthetic) - len(kept))}
        for data_name, (lengths, dropped) in sets.items():
            result = compare(lengths, batch_size=setting["batch"], accumulation=setting["accum"],
                             gpu=setting["gpu"], seed=args.seed)
            batch = f"{setting['batch']}x{setting['accum']}@{max_len}"
            print(f"{data_name:<9} {setting['name']:<27} {batch:>10} {len(lengths):>6} {dropped:>5} "
                  f"{sum(lengths) / len(lengths):>5.0f} {max(lengths):>5}  "
                  + " ".join(f"{result[s]:>7.3f}" for s in STRATEGIES))
    print("\nbundled: bundled:dolly-sample train split, SmolLM2 tokenizer; synthetic: dolly-15k's length "
          f"profile, {args.rows} rows (module docstring).\nbatch: per-device batch x gradient accumulation "
          "@ max_seq_length (longer rows dropped: 'drop'). Efficiency = real tokens / (rows x padded "
          "length) over one epoch; 1.0 = no padding.")

if __name__ == "__main__":
    main()
