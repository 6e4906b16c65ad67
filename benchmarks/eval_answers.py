"""Answering the evaluation instructions one by one vs in batches: seconds, and the same answers?

    python benchmarks/eval_answers.py                       # bundled SmolLM2, the 8 shipped instructions
    python benchmarks/eval_answers.py --batch-size 4 --repeats 3
    python benchmarks/eval_answers.py --base-model outputs/dolly --dtype bf16
    python benchmarks/eval_answers.py --threads 1 --repeats 3    # CPU seconds that other load moves less

What the trainer does before training and after every epoch (training.evaluation.answer_all):
the model as the trainer loads it (the Dolly keys added to the tokenizer and their embeddings
initialized, float32 on the CPU) answers training/data/eval_instructions.jsonl greedily with
at most 64 new tokens (--eval_max_new_tokens' default). "one by one" is one ``generate`` call per
instruction (``generate_response``, what answer_all did before); "batched" is
``generate_responses`` with --batch-size prompts per call, left-padded. The two alternate in each
repeat, after one warm-up call; the figures are the best round of --repeats (the
fastest wall time, with its CPU time), and every round's wall time is listed. The bundled model is
converted from its GGUF once (~30 s) and cached.

A batch runs until its longest answer ends (rows that ended wait, padded), so batching gains
most when all answers are long (a base model) and least when one long answer shares a batch with
short ones. The answers are compared token for token (text, ended, new tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `training` importable
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="bundled:smollm2-135m-instruct",
                        help="A --base_model value: the bundled model, a model directory or a hub id.")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call when batched.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Longest answer (the trainer's default).")
    parser.add_argument("--repeats", type=int, default=1, help="Timed rounds; the best of each is printed.")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="The model's weights.")
    parser.add_argument("--cache-dir", default=None, help="Where the bundled model is converted to.")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default, one per core). With 1, the CPU seconds are "
                             "the work itself, without threads spinning while another process holds a core.")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from training.base_model import load_model, load_tokenizer, resolve_base_model
    from training.evaluation import DEFAULT_EVAL_INSTRUCTIONS, load_eval_instructions
    from training.generate import generate_response, generate_responses

    started = time.perf_counter()
    path = resolve_base_model(args.base_model, args.cache_dir)
    tokenizer = load_tokenizer(path)
    model = load_model(path, tokenizer, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32).eval()
    rows = load_eval_instructions(DEFAULT_EVAL_INSTRUCTIONS)
    prompts = [(row["instruction"], row["context"]) for row in rows]
    print(f"{args.base_model} ({path}), {args.dtype}, {torch.get_num_threads()} threads: loaded in "
          f"{time.perf_counter() - started:.1f} s; {len(rows)} instructions, at most {args.max_new_tokens} new tokens")
    generate_response(model, tokenizer, "Warm up.", max_new_tokens=4)

    def one_by_one():
        return [generate_response(model, tokenizer, instruction, context, max_new_tokens=args.max_new_tokens)
                for instruction, context in prompts]

    def batched():
        return generate_responses(model, tokenizer, prompts, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens)

    # Wall seconds, and this process's CPU seconds (all its threads): on a shared or throttled
    # machine the wall time moves with other processes' load, the CPU time much less.
    seconds = {"one by one": [], "batched": []}
    answers = {}
    for _ in range(args.repeats):
        for name, answer in (("one by one", one_by_one), ("batched", batched)):
            began, began_cpu = time.perf_counter(), time.process_time()
            answers[name] = answer()
            seconds[name].append((time.perf_counter() - began, time.process_time() - began_cpu))
    best = {name: min(times) for name, times in seconds.items()}

    calls = {"one by one": len(prompts), "batched": -(-len(prompts) // args.batch_size)}
    print(f"\n{'':12} {'seconds':>8} {'CPU s':>8} {'calls':>6} {'ended':>6} {'new tokens':>11}   every round (wall s)")
    for name, (wall, cpu) in best.items():
        ended = sum(a.ended for a in answers[name])
        tokens = sum(a.new_tokens for a in answers[name])
        rounds = " ".join(f"{w:.1f}" for w, _ in seconds[name])
        print(f"{name:12} {wall:8.2f} {cpu:8.2f} {calls[name]:6d} {ended:4d}/{len(prompts)} {tokens:11d}   {rounds}")
    alone, together = best["one by one"], best["batched"]
    print(f"\nbatched / one by one: {together[0] / alone[0]:.2f} wall ({alone[0] / together[0]:.1f}x faster), "
          f"{together[1] / alone[1]:.2f} CPU; batch size {args.batch_size}")
    same = answers["batched"] == answers["one by one"]
    print(f"answers identical (text, ended, new tokens): {same}")
    for number, (alone, together) in enumerate(zip(answers["one by one"], answers["batched"], strict=True), start=1):
        if alone != together:
            print(f"  instruction {number} differs:\n    one by one: {alone}\n    batched:    {together}")


if __name__ == "__main__":
    main()
