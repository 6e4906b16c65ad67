"""What a resumed run reads back from its checkpoint: eval losses, train loss, missed evaluations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from training.run_history import (
    eval_losses,
    missed_epoch_end,
    restored_attributes,
    whole_train_loss,
)


def history(losses: dict[int, float], evals: dict[int, float]) -> list[dict]:
    """A Trainer log history: one entry per logged loss or evaluation, in step order."""
    entries = [{"step": s, "loss": v, "epoch": s / 12} for s, v in losses.items()]
    entries += [{"step": s, "eval_loss": v, "epoch": s / 12} for s, v in evals.items()]
    return sorted(entries, key=lambda e: (e["step"], "eval_loss" in e))


def test_eval_losses_start_at_step_0_with_the_restored_ones():
    log = history({4: 2.0, 8: 1.5}, {0: 3.1, 12: 1.2})
    assert eval_losses(log) == [(0, 3.1), (12, 1.2)]


def test_whole_train_loss_weights_each_logged_mean_by_its_steps():
    # Steps 1-4 logged at 4 (mean 2.0) and 5-6 at 6 (mean 1.0); this attempt trained 7-10 at 0.5.
    log = history({4: 2.0, 6: 1.0}, {0: 3.0})
    assert whole_train_loss(log, start_step=6, attempt_loss=0.5, global_step=10) == pytest.approx(
        (2.0 * 4 + 1.0 * 2 + 0.5 * 4) / 10)
    # A fresh run: the Trainer's own figure.
    assert whole_train_loss(log, start_step=0, attempt_loss=0.7, global_step=10) == 0.7
    # Step 7 was trained before the checkpoint at 7 but never logged: it cannot count.
    assert whole_train_loss(log, start_step=7, attempt_loss=0.5, global_step=10) == pytest.approx(
        (2.0 * 4 + 1.0 * 2 + 0.5 * 3) / 9)
    # Losses logged after the checkpoint (by the attempt that was then killed) are not restored.
    later = history({4: 2.0, 8: 9.0}, {})
    assert whole_train_loss(later, start_step=4, attempt_loss=1.0, global_step=8) == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("state", "missed"),
    [
        ({"global_step": 12, "epoch": 1.0, "log_history": history({12: 1.0}, {0: 3.0})}, True),
        # the epoch's evaluation ran before the save (eval_steps schedule)
        ({"global_step": 12, "epoch": 1.0, "log_history": history({12: 1.0}, {0: 3.0, 12: 2.0})}, False),
        # inside an epoch: nothing was due
        ({"global_step": 10, "epoch": 10 / 12, "log_history": history({10: 1.0}, {0: 3.0})}, False),
        ({"global_step": 0, "epoch": 0, "log_history": []}, False),
    ],
)
def test_missed_epoch_end(state, missed):
    assert missed_epoch_end(state) is missed


def test_restored_attributes_come_from_the_checkpoint_and_old_checkpoints_get_an_entry():
    class Totals:
        def state(self):
            return {"args": {}, "attributes": {"seconds": 0.0}}

    resumed = SimpleNamespace(global_step=40,
                              stateful_callbacks={"Totals": {"args": {}, "attributes": {"seconds": 12.5}}})
    assert restored_attributes(resumed, Totals()) == {"seconds": 12.5}
    fresh = SimpleNamespace(global_step=0, stateful_callbacks={"Totals": {"args": {}, "attributes": {"seconds": 0.0}}})
    assert restored_attributes(fresh, Totals()) == {}
    # A checkpoint written before the callback kept state: nothing to restore, and the Trainer's
    # next save (which looks the callback's name up) finds an entry.
    old = SimpleNamespace(global_step=40, stateful_callbacks={})
    assert restored_attributes(old, Totals()) == {"seconds": 0.0}
    assert "Totals" in old.stateful_callbacks
