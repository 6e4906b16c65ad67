"""Answering a fixed set of instructions before training and after every epoch.

The Dolly story in numbers: the same instructions answered by the base model and then by the
model after each epoch, with the share of answers that end at ``### End`` (the model learned to
stop) and their lengths. Decoding is greedy by default, so runs are comparable.

    rows = load_eval_instructions(DEFAULT_EVAL_INSTRUCTIONS)
    point = answer_all(model, tokenizer, rows, label="base", max_new_tokens=64)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_EVAL_INSTRUCTIONS = Path(__file__).parent / "data" / "eval_instructions.jsonl"


class EvalInstructionsError(ValueError):
    """The evaluation instructions file cannot be used; the message names the file and line."""


def load_eval_instructions(path: str | Path) -> list[dict[str, str]]:
    """Rows of ``{"instruction", "context"}`` from a .jsonl file; every bad line is reported."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalInstructionsError(
            f"--eval_instructions: {path} does not exist. Pass a .jsonl file with one "
            '{"instruction": ..., "context": ...} per line, or an empty value to skip.'
        )
    rows, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path} line {number}: not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            problems.append(f"{path} line {number}: needs a non-empty 'instruction' string")
            continue
        context = row.get("context") or ""
        if not isinstance(context, str):
            problems.append(f"{path} line {number}: 'context' must be a string")
            continue
        rows.append({"instruction": row["instruction"].strip(), "context": context.strip()})
    if problems:
        raise EvalInstructionsError("--eval_instructions: bad line(s):\n  " + "\n  ".join(problems))
    if not rows:
        raise EvalInstructionsError(f"--eval_instructions: {path} has no instructions.")
    return rows


def answer_all(model: Any, tokenizer: Any, rows: list[dict[str, str]], *, label: str,
               max_new_tokens: int) -> dict[str, Any]:
    """One evaluation point: every instruction answered greedily, with summary numbers."""
    import time

    import torch

    from training.generate import generate_response

    started = time.perf_counter()
    was_training = model.training
    model.eval()
    answers = []
    with torch.no_grad():
        for row in rows:
            result = generate_response(model, tokenizer, row["instruction"], row["context"],
                                       max_new_tokens=max_new_tokens)
            answers.append({"instruction": row["instruction"], "response": result.text, "ended": result.ended,
                            "new_tokens": result.new_tokens})
    if was_training:
        model.train()
    return {
        "label": label,
        "answers": answers,
        "ended_share": sum(a["ended"] for a in answers) / len(answers),
        "mean_new_tokens": sum(a["new_tokens"] for a in answers) / len(answers),
        "decoding": {"do_sample": False, "max_new_tokens": max_new_tokens},
        "seconds": time.perf_counter() - started,
    }


def evaluation_callback(rows: list[dict[str, str]], tokenizer: Any, max_new_tokens: int) -> Any:
    """A TrainerCallback answering ``rows`` before training (base model) and after each epoch."""
    from transformers import TrainerCallback

    class GenerationEval(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []

        def answer(self, state: Any, model: Any, label: str) -> None:
            # Rank 0 answers; other ranks would only repeat it (ZeRO-2 keeps full weights on each).
            if state.is_world_process_zero:
                point = answer_all(model, tokenizer, rows, label=label, max_new_tokens=max_new_tokens)
                point["global_step"] = state.global_step
                self.points.append(point)
                print(f"[trainer] evaluation {label}: {point['ended_share']:.0%} of answers end at ### End, "
                      f"{point['mean_new_tokens']:.0f} tokens on average", flush=True)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:  # not on a resumed run
                self.answer(state, model, "base")

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            # A max_steps run ends inside an epoch: "epoch 0.33".
            self.answer(state, model, f"epoch {round(state.epoch or 0, 2):g}")

    return GenerationEval()
