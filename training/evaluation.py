"""Answering a fixed set of instructions before training and after every epoch.

The Dolly story in numbers: the same instructions answered by the base model and then by the
model after each epoch, with the share of answers that end at ``### End`` (or, for the chat
format, at the template's end of turn: the model learned to stop) and their lengths. Decoding is
greedy by default, so runs are comparable.

    rows = load_eval_instructions(DEFAULT_EVAL_INSTRUCTIONS)
    point = answer_all(model, tokenizer, rows, label="base", max_new_tokens=64, batch_size=8)
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
    from training.dataset import not_utf8

    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark is not JSON
    except UnicodeDecodeError as err:
        raise EvalInstructionsError(
            f"--eval_instructions: {path} is {not_utf8(err)}; save it as UTF-8 JSON lines."
        ) from None
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path} line {number}: not valid JSON ({err.msg})")
            continue
        except RecursionError:  # json's C decoder recurses once per nesting level
            problems.append(f"{path} line {number}: JSON nested deeper than Python's recursion limit; "
                            'a line is {"instruction": ..., "context": ...}')
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


def rows_of_rank(count: int, rank: int, world: int) -> tuple[list[int], int]:
    """The row indices rank ``rank`` of ``world`` answers, and how many of them it keeps.

    Rank r takes rows r, r+N, ...; a rank with fewer rows than the busiest one repeats a row (its
    own last, or row 0 when it has none) and drops those answers, so every rank answers the same
    number of rows and, in batches of the same size, makes the same number of ``generate`` calls.
    """
    mine = list(range(rank, count, world))
    most = -(-count // world)  # the most rows any rank has
    return mine + [mine[-1] if mine else 0] * (most - len(mine)), len(mine)


def answer_all(model: Any, tokenizer: Any, rows: list[dict[str, str]], *, label: str,
               max_new_tokens: int, batch_size: int = 8) -> dict[str, Any]:
    """One evaluation point: every instruction answered greedily, with summary numbers.

    The rows are answered ``batch_size`` at a time (``generate_responses``: left-padded batches,
    the same answers as one at a time). The bundled SmolLM2 (float32, one CPU thread) answers
    the 8 shipped instructions in one batch in 7.9 s instead of 19.3 s one by one: a batch of 8
    costs ~2.5x a single prompt per token, and runs until its longest answer ends
    (benchmarks/eval_answers.py).

    Under torch.distributed every rank must call this together: rank r answers rows r, r+N, ...
    and the answers are gathered, so N ranks share the work instead of repeating it. Under
    ZeRO-3 each forward pass gathers the sharded weights from all ranks, so every rank makes the
    same number of ``generate`` calls (a rank with fewer rows repeats one and drops the answer,
    see ``rows_of_rank``) and transformers keeps the ranks in step (``synced_gpus``) until the
    longest answer of each call ends.
    """
    import time

    import torch

    from training.generate import generate_responses
    from training.prompt_format import end_marker

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    indices, kept = rows_of_rank(len(rows), rank, world)
    results = generate_responses(model, tokenizer, [(rows[i]["instruction"], rows[i]["context"]) for i in indices],
                                 batch_size=batch_size, max_new_tokens=max_new_tokens)
    answered = [(index, {"instruction": rows[index]["instruction"], "response": result.text,
                         "ended": result.ended, "new_tokens": result.new_tokens})
                for index, result in zip(indices[:kept], results[:kept], strict=True)]
    if was_training:
        model.train()
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, answered)
        answered = [pair for part in gathered for pair in part]
    answers = [answer for _, answer in sorted(answered, key=lambda pair: pair[0])]
    return {
        "label": label,
        "answers": answers,
        "ended_share": sum(a["ended"] for a in answers) / len(answers),
        "end_marker": end_marker(tokenizer),
        "mean_new_tokens": sum(a["new_tokens"] for a in answers) / len(answers),
        "decoding": {"do_sample": False, "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        "ranks": world,
        "seconds": time.perf_counter() - started,
    }


def evaluation_callback(rows: list[dict[str, str]], tokenizer: Any, max_new_tokens: int,
                        on_point: Any = None, *, batch_size: int = 8) -> Any:
    """A TrainerCallback answering ``rows`` before training (base model) and after each epoch,
    ``batch_size`` per ``generate`` call.

    Every rank takes part (see ``answer_all``); world rank 0 keeps the points and passes each
    to ``on_point(point, restored)`` (the metrics stream) as soon as it is ready. The points are
    saved with every checkpoint: a resumed run keeps the base model's answers and every epoch's.
    """
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    from training.run_history import restored_attributes

    class GenerationEval(TrainerCallback, ExportableState):
        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []
            self.seconds = 0.0  # generation time on this rank since step 0, kept out of the throughput
            self.last_step: int | None = None  # the step of the last point, known on every rank

        def state(self) -> dict[str, Any]:  # saved with each checkpoint (trainer_state.json)
            return {"args": {}, "attributes": {"points": self.points, "seconds": self.seconds,
                                               "last_step": self.last_step}}

        def answer(self, state: Any, model: Any, label: str) -> None:
            point = answer_all(model, tokenizer, rows, label=label, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
            point["global_step"] = state.global_step
            self.seconds += point["seconds"]
            self.last_step = state.global_step
            if state.is_world_process_zero:
                self.points.append(point)
                if on_point is not None:
                    on_point(point)
                print(f"[trainer] evaluation {label}: {point['ended_share']:.0%} of answers end at "
                      f"{point['end_marker']}, "
                      f"{point['mean_new_tokens']:.0f} tokens on average", flush=True)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self.answer(state, model, "base")
                return
            # Resumed: the points up to the checkpoint come from it (rank 0 kept them).
            restored = restored_attributes(state, self)
            self.seconds = float(restored.get("seconds", 0.0))
            self.last_step = restored.get("last_step")
            if state.is_world_process_zero:
                self.points = list(restored.get("points", []))
                for point in self.points:
                    if on_point is not None:
                        on_point(point, True)
            # A checkpoint saved at an epoch's last step comes before that epoch's answers
            # (on_epoch_end runs after the step's save): answer them now, as the epoch would have.
            # Every rank restored the same last_step, so all of them take part (ZeRO-3).
            if float(state.epoch or 0).is_integer() and self.last_step != state.global_step:
                self.answer(state, model, f"epoch {round(state.epoch or 0, 2):g}")

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            # A max_steps run ends inside an epoch: "epoch 0.33".
            self.answer(state, model, f"epoch {round(state.epoch or 0, 2):g}")

    return GenerationEval()
