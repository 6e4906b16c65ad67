"""A sweep's pure logic: the grid (config section or --grid), the best point, the result rows."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "flows"))  # the flow's own modules, as the flow imports them
from comparison_card import ordered, pick_best, result_row  # noqa: E402
from sweep_grid import GridError, parse_grid, point_name, sweep_points  # noqa: E402


def test_grid_text_reads_numbers_switches_and_names():
    assert parse_grid("learning_rate=1e-4,5e-5 epochs=1,2 packing=true peft=lora,none") == {
        "learning_rate": [1e-4, 5e-5], "epochs": [1, 2], "packing": [True], "peft": ["lora", "none"]}


def test_the_grid_is_the_product_in_the_order_written_and_the_command_line_wins():
    section = {"learning_rate": [1e-4, 5e-5], "epochs": [1, 2]}
    points, max_points = sweep_points(section, "")
    assert points == [{"learning_rate": 1e-4, "epochs": 1}, {"learning_rate": 1e-4, "epochs": 2},
                      {"learning_rate": 5e-5, "epochs": 1}, {"learning_rate": 5e-5, "epochs": 2}]
    assert max_points == 8
    assert sweep_points(section, "peft=lora,qlora")[0] == [{"peft": "lora"}, {"peft": "qlora"}]
    explicit = {"points": [{"learning_rate": 1e-4}, {"peft": "lora", "learning_rate": 1e-3}], "max_points": 2}
    assert sweep_points(explicit, "") == (explicit["points"], 2)


@pytest.mark.parametrize(("section", "grid", "message"), [
    ({}, "", "No sweep points: pass --grid"),
    ({"learning_rate": [1, 2, 3], "epochs": [1, 2, 3], "max_points": 8}, "",
     "The grid has 9 points, more than config sweep.max_points (8): drop values, or raise max_points"),
    ({"learning_rate": 1e-4}, "", "config sweep.learning_rate: must be a non-empty list of values, got 0.0001."),
    ({"points": [{"epochs": 1}], "epochs": [2]}, "", "config sweep: 'points' lists the points itself; drop epochs"),
    ({"points": []}, "", "config sweep.points: must be a non-empty list of objects"),
    ({"max_points": 0, "epochs": [1]}, "", "config sweep.max_points: must be a positive integer, got 0."),
    ({}, "epochs=1,1", "The grid repeats point(s) epochs=1: each point must differ."),
    ({}, "epochs=1 epochs=2", "--grid: epochs is given twice"),
    ({}, "epochs=", "--grid: epochs has no values"),
    ({}, "=1", "--grid: '=1' is not key=value"),
])
def test_bad_grids_are_refused_with_the_fix(section, grid, message):
    with pytest.raises(GridError) as err:
        sweep_points(section, grid)
    assert message in str(err.value)


def test_point_names_are_short_and_readable():
    assert (point_name({"learning_rate": 0.0001, "epochs": 2, "peft": "lora"})
            == "learning_rate=0.0001 epochs=2 peft=lora")
    assert point_name({}) == "defaults"


def row(index: int, loss: float | None, ended: float | None, error: str | None = None) -> dict:
    point = {"index": index, "name": f"p{index}", "settings": {"learning_rate": index}}
    metrics = None if error else {"eval_loss_before": 3.0, "eval_loss_after": loss, "ended_share_base": 0.2,
                                  "ended_share_final": ended, "tokens_per_second": 100.0, "eval_loss_history": []}
    return result_row(point, metrics=metrics, error=error, wall_s=7200.0, gpus=4, model_location=f"m{index}")


def test_best_point_by_each_metric_with_ties_broken_by_the_other_then_the_grid_order():
    rows = [row(0, 2.0, 0.5), row(1, 1.5, 0.5), row(2, 1.5, 0.75), row(3, None, None, error="OOM")]
    assert pick_best(rows, "eval_loss")["point"] == 2  # 1.5 twice: the larger ended share wins
    assert pick_best(rows, "ended_share")["point"] == 2
    assert pick_best([row(0, 1.0, 0.5), row(1, 1.0, 0.5)], "eval_loss")["point"] == 0  # a full tie: grid order
    assert pick_best([row(0, None, None, error="x")], "eval_loss") is None
    assert [r["point"] for r in ordered(rows, "eval_loss")] == [1, 2, 0, 3]  # failed last


def test_a_failed_row_keeps_its_settings_and_error_and_no_model():
    failed = row(3, None, None, error="The trainer failed")
    assert (failed["status"], failed["error"], failed["model_location"]) == ("failed", "The trainer failed", None)
    assert failed["settings"] == {"learning_rate": 3}
    assert row(0, 1.0, 0.5)["gpu_hours"] == 8.0  # 2 hours on 4 GPUs
