"""A run resumed from a checkpoint reports what the same run uninterrupted would have reported.

A preempted run (a retry, ``resume``, ``--resume-from``) starts a new process at the checkpoint's
step. What happened before that step must come from the checkpoint: the Trainer restores its
``log_history`` (every logged loss and eval loss since step 0), and our callbacks keep their own
running figures (evaluation answers, seconds inside steps) in the checkpoint's
``trainer_state.json`` as transformers' "stateful callbacks". This module reads them back.

    eval_losses(trainer.state.log_history)           # [(0, 3.11), (12, 2.40), ...] from step 0
    whole_train_loss(history, start_step=40, attempt_loss=1.9, global_step=160)
    missed_epoch_end(json.load(open("checkpoint-60/trainer_state.json")))  # True: evaluate now
"""

from __future__ import annotations

from typing import Any


def eval_losses(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, eval loss) of every evaluation in the Trainer's log history, restored ones first."""
    return [(int(entry["step"]), float(entry["eval_loss"])) for entry in log_history if "eval_loss" in entry]


def whole_train_loss(log_history: list[dict[str, Any]], *, start_step: int, attempt_loss: float,
                     global_step: int) -> float:
    """The mean training loss over every step, as an uninterrupted run reports it.

    The Trainer's own ``training_loss`` covers only the steps of this process (``start_step`` to
    ``global_step``). Each logged ``loss`` up to ``start_step`` is the mean over the steps since
    the previous log, so weighting it by those steps gives the restored steps' sum. Steps between
    the last log and the checkpoint were never logged and cannot be recovered: they are left out
    of the mean (none are when the checkpoint step is a multiple of ``--logging_steps``).
    """
    if start_step == 0:
        return attempt_loss
    restored_sum, previous = 0.0, 0
    for entry in log_history:
        step = int(entry.get("step", 0))
        if "loss" in entry and 0 < step <= start_step:
            restored_sum += float(entry["loss"]) * (step - previous)
            previous = step
    attempt_steps = global_step - start_step
    covered = previous + attempt_steps
    return (restored_sum + attempt_loss * attempt_steps) / covered if covered else attempt_loss


def missed_epoch_end(trainer_state: dict[str, Any]) -> bool:
    """True when a checkpoint was saved at the last step of an epoch before that epoch's evaluation
    ran (evaluation at the end of each epoch, ``--eval_steps 0``), so a run resumed from it must
    run that evaluation first.

    Within one step the Trainer saves a step-scheduled checkpoint (``--save_steps``) before it calls
    ``on_epoch_end`` and the epoch-scheduled evaluation; the resumed run starts in the next epoch
    and would never evaluate the one that ended. ``epoch`` is a whole number exactly at an epoch's
    last step (the Trainer computes it as epochs done + steps / steps per epoch).
    """
    step = int(trainer_state.get("global_step", 0))
    epoch = float(trainer_state.get("epoch") or 0.0)
    if step == 0 or epoch != int(epoch):
        return False
    return not any("eval_loss" in e and int(e.get("step", -1)) == step for e in trainer_state.get("log_history", []))


def restored_attributes(state: Any, callback: Any) -> dict[str, Any]:
    """The attributes ``callback`` (a TrainerCallback with a ``state()`` method) saved in the
    checkpoint this run resumed from; empty on a fresh start.

    Also makes sure the callback has its entry in ``state.stateful_callbacks``: a checkpoint
    written before the callback kept state has none, and the Trainer's next save looks it up.
    """
    name = type(callback).__name__
    saved = state.stateful_callbacks.setdefault(name, callback.state())
    if state.global_step == 0:
        return {}
    if isinstance(saved, list):  # several callbacks of one class: ours are one each
        saved = saved[0]
    return dict(saved.get("attributes", {}))
