"""Answer instructions with a model tuned here, in its own prompt format, stopping where it ends.

A Dolly-format model gets the Dolly prompt and stops at ``### End``; a chat-format model gets its
chat template (``--system`` adds a system prompt) and stops at its end-of-turn token. The
model's saved chat template says which (see :func:`prompt_format_of`).

    python -m training.generate --run latest "Give three tips for staying focused."
    python -m training.generate --run DollyFlow/1764412345678 "What is a haiku?" "Name 3 rivers."
    python -m training.generate --model outputs/dolly --context "Paris is ..." "Summarize this."
    python -m training.generate --model outputs/lora-adapter "What is a haiku?"   # LoRA adapter alone
    python -m training.generate --model s3://bucket/DollyFlow/17644/model "What is a haiku?"

    from training.generate import load_for_generation, generate_response, generate_responses
    model, tokenizer = load_for_generation("outputs/dolly")
    print(generate_response(model, tokenizer, "What is a haiku?").text)
    answers = generate_responses(model, tokenizer, [("What is a haiku?", ""), ("Summarize this.", "Paris is ...")])
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from training.prompt_format import encode_instruction, end_marker, prompt_format_of, stop_token_ids


@dataclass
class Generation:
    text: str  # the response, without the prompt or the end marker
    ended: bool  # the model emitted its end marker (or eos) before max_new_tokens ran out
    new_tokens: int


def load_for_generation(model_dir: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a trained model directory or ``s3://.../model`` URL, in eval mode.

    A LoRA adapter directory (``--merge_adapter false``) is put on the base model it names.

    An S3 model is downloaded into the cache and every file checked against its manifest, by the
    checkpoints' own validated download (CheckpointStoreError when it cannot be used), before
    transformers is imported: a wrong URL or missing credentials show in a second.
    """
    if model_dir.startswith("s3://"):
        import re

        from training.checkpoint_store import S3CheckpointStore
        from training.dataset import default_cache_dir

        parent, _, name = model_dir.rstrip("/").rpartition("/")
        # The cache folder is named after the URL in letters, digits, "_" and "-" only: a URL's
        # dots and slashes never become a path ("s3://../model" goes to "__", not the cache's parent).
        target = default_cache_dir() / "s3-models" / re.sub(r"[^A-Za-z0-9_-]", "_", parent[len("s3://"):])
        model_dir = str(S3CheckpointStore(parent).download(name, target))

    from training.adapters import (
        is_adapter_dir,
        load_adapter_model,
        quiet_missing_cpu_kernel_warning,
    )

    quiet_missing_cpu_kernel_warning()  # before peft (an adapter directory) imports bitsandbytes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_adapter_dir(model_dir):  # a LoRA run saved with --merge_adapter false
        model, tokenizer = load_adapter_model(model_dir, trust_remote_code=trust_remote_code)
        model.eval()
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def generate_response(
    model: Any,
    tokenizer: Any,
    instruction: str,
    context: str = "",
    *,
    system: str = "",
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.92,
) -> Generation:
    """Answer one instruction in the model's prompt format; greedy decoding unless ``do_sample``."""
    return generate_responses(model, tokenizer, [(instruction, context)], system=system, max_new_tokens=max_new_tokens,
                              do_sample=do_sample, temperature=temperature, top_p=top_p)[0]


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[tuple[str, str]],
    *,
    batch_size: int = 8,
    system: str = "",
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.92,
) -> list[Generation]:
    """Answer ``(instruction, context)`` pairs, ``batch_size`` per ``generate`` call, in order.

    One call per batch of ``batch_size`` (the last one shorter): ``ceil(len(prompts) /
    batch_size)`` calls, which ``answer_all`` relies on to keep ZeRO-3 ranks in step.

    A batch is padded on the left with the pad token and masked, so every prompt ends where its
    answer starts and generate counts each row's positions from its first real token (from the
    attention mask): greedy answers are those of one prompt at a time. On CPU in float32 they
    are the same token for token (tests/unit/test_batched_answers.py, and the bundled
    SmolLM2's on the shipped instructions, benchmarks/eval_answers.py); in half precision a
    near-tie between two tokens can break the other way, as any change of batch shape can.
    A row that has ended gets pad tokens until the batch's longest answer ends; each answer is
    cut at its first stop token, as one prompt alone would have stopped there.
    """
    import torch

    stop_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    encoded = [encode_instruction(tokenizer, instruction, context, system) for instruction, context in prompts]
    results = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        # Padded here from the ids, on the left: the tokenizer (right-padding, for training) is untouched.
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch],
                                      device=model.device)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                    eos_token_id=stop_ids, pad_token_id=pad_id, **sampling)
        for row in output[:, width:].tolist():
            ended = any(token in stop_ids for token in row)
            if ended:
                row = row[: min(row.index(t) for t in stop_ids if t in row)]
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            results.append(Generation(text=text, ended=ended, new_tokens=len(row)))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("instruction", nargs="+", help="One or more instructions to answer.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="A trained model: the trainer's --output_dir, or an s3://.../model URL.")
    source.add_argument(
        "--run", metavar="PATHSPEC",
        help="The model of a DollyFlow run: DollyFlow/<id>, a run id, or 'latest' (the latest successful run).",
    )
    parser.add_argument("--context", default="", help="Optional input text the instruction refers to.")
    parser.add_argument("--system", default="", help="A system prompt (models trained with --prompt_format chat).")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Most tokens to generate.")
    parser.add_argument("--sample", action="store_true", help="Sample (temperature 0.7, top-p 0.92) instead of greedy.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Run modelling code from the model directory.")
    args = parser.parse_args(argv)
    location = args.model
    if args.run:
        from training.metaflow_runs import RunLookupError, run_model_location

        try:
            location = run_model_location(args.run)
        except RunLookupError as err:
            parser.exit(2, f"error: --run: {err}\n")
        print(f"[model of run {args.run}: {location}]")
    from training.checkpoint_store import CheckpointStoreError

    try:
        model, tokenizer = load_for_generation(location, trust_remote_code=args.trust_remote_code)
    except CheckpointStoreError as err:
        # An S3 model that is incomplete, corrupted or unreachable: the reason and the fix, not a traceback.
        parser.exit(1, f"error: {err}\n")
    if args.system and prompt_format_of(tokenizer) == "dolly":
        parser.exit(2, "error: --system: this model was tuned in the Dolly format (a fixed intro, no system "
                       "prompt); drop --system.\n")
    marker = end_marker(tokenizer)
    # All instructions in one batch (a command line holds a handful).
    results = generate_responses(model, tokenizer, [(instruction, args.context) for instruction in args.instruction],
                                 batch_size=len(args.instruction), system=args.system,
                                 max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    for number, (instruction, result) in enumerate(zip(args.instruction, results, strict=True)):
        if len(args.instruction) > 1:
            print(f"{'' if number == 0 else chr(10)}### {instruction}")
        print(result.text)
        if not result.ended:
            print(f"[stopped at --max-new-tokens {args.max_new_tokens} before {marker}]")


if __name__ == "__main__":
    main()
