"""The live `training` card, the `end` summary card, and loading a run's model by its pathspec."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, card_components, component_types, flow_env, of_type

sys.path.insert(0, str(REPO / "flows"))  # the flow's own modules, as the flow imports them

from training_card import card_components as training_card  # noqa: E402
from training_card import duration, progress_line

from training.progress import progress_view  # noqa: E402


def card_html(task, card_id: str) -> str:
    from metaflow.cards import get_cards

    cards = get_cards(task, id=card_id)
    assert len(cards) == 1, f"expected one {card_id!r} card, found {len(cards)}"
    return cards[0].get()


def tables(components: list) -> list[dict]:
    return of_type(components, "table")


def markdown_text(components: list) -> str:
    return "\n".join(c["source"] for c in of_type(components, "markdown"))


def logged(log: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` from the trainer's printed lines: ``[trainer] step 3/4 loss=1.23 ...``."""
    return [(int(step), float(value))
            for step, value in re.findall(rf"\[trainer\] step (\d+)/\d+ .*?\b{key}=([0-9.e+-]+)", log)]


def test_duration_and_progress_line():
    assert (duration(42), duration(185), duration(3725), duration(None)) == ("42s", "3m 05s", "1h 02m", "n/a")
    assert "no training step yet" in progress_line(progress_view([]))
    view = progress_view([{"event": "begin", "time": 0.0, "max_steps": 10, "epochs": 1.0, "start_step": 0,
                           "world_size": 1}], now=3.0)
    assert "step 0/10 (0%)" in progress_line(view) and "ETA n/a" in progress_line(view)
    view["step"], view["epoch"], view["eta_s"] = 5, 0.5, 60.0
    line = progress_line(view)
    assert "step 5/10 (50%)" in line and "ETA 1m 00s" in line
    assert progress_line(view, failed="TrainerFailed").startswith("**Failed at step 5: TrainerFailed**")


def test_card_has_one_table_row_per_evaluation_point_base_first():
    point = {"label": "base", "global_step": 0, "ended_share": 0.5, "mean_new_tokens": 12.0,
             "answers": [{"instruction": "Say hi.", "response": "Hi " * 200, "ended": False, "new_tokens": 64},
                         {"instruction": "Count.", "response": "1 2 3", "ended": True, "new_tokens": 5}]}
    view = progress_view([{"event": "evaluation", "time": 0.0, **point},
                          {"event": "evaluation", "time": 1.0, **point, "label": "epoch 1", "global_step": 9}])
    (table,) = [c for c in training_card(view) if type(c).__name__ == "Table"]
    rendered = table.render()
    assert rendered["data"][0][:3] == ["base", "0", "50%"]
    assert [row[0] for row in rendered["data"]] == ["base", "epoch 1"]
    assert rendered["columns"][4:] == ["Say hi.", "Count."]
    long_answer = rendered["data"][0][4]
    assert long_answer.endswith("… [no ### End]") and len(long_answer) < 300
    assert rendered["data"][0][5] == "1 2 3"


def test_training_card_shows_curves_and_the_evaluation_table(tiny_run):
    run, _ = tiny_run
    train = run["train"].task
    components = card_components(card_html(train, "training"))
    types = component_types(components)
    assert types["image"] == 2, types  # loss/learning rate, gradient norm/throughput
    (table,) = [t for t in tables(components) if t["columns"][0] == "Model"]  # the other: preflight
    evaluation = train.data.evaluation
    assert len(table["data"]) == len(evaluation) == 2  # base, then the end of training (step 4)
    assert [row[0] for row in table["data"]] == [p["label"] for p in evaluation] and table["data"][0][0] == "base"
    assert "**Done**" in markdown_text(components) and "step 4/4" in markdown_text(components)


def test_artifacts_match_the_trainers_log(tiny_run):
    run, log = tiny_run
    train = run["train"].task.data
    history, metrics = train.training_history, train.training_metrics
    # The trainer prints 4 significant digits.
    assert [s for s, _ in history["loss"]] == [s for s, _ in logged(log, "loss")] == [1, 2, 3, 4]
    for (_, ours), (_, printed) in zip(history["loss"], logged(log, "loss"), strict=True):
        assert ours == pytest.approx(printed, rel=1e-3)
    for (_, ours), (_, printed) in zip(history["grad_norm"], logged(log, "grad_norm"), strict=True):
        assert ours == pytest.approx(printed, rel=1e-3)
    printed_eval = logged(log, "eval_loss")
    assert [s for s, _ in printed_eval] == [s for s, _ in history["eval_loss"]] == [0, 4]
    assert metrics["eval_loss_before"] == pytest.approx(printed_eval[0][1], rel=1e-3)
    assert metrics["eval_loss_after"] == pytest.approx(printed_eval[-1][1], rel=1e-3)
    assert metrics["eval_loss_history"] == [list(p) for p in history["eval_loss"]]
    assert history["tokens_per_second"] and all(v > 0 for _, v in history["tokens_per_second"])
    # The metric is the card's measure: tokens over the seconds inside optimizer steps.
    events = [json.loads(line) for line in
              (Path(train.model_location) / "logs" / "progress.jsonl").read_text().splitlines()]
    step_seconds = sum(e["step_s"] for e in events if e["event"] == "step")
    assert metrics["tokens_per_second"] == pytest.approx(metrics["tokens"] / step_seconds, rel=1e-6)
    assert 0 < metrics["tokens_per_second_overall"] < metrics["tokens_per_second"]
    for point in train.evaluation:
        share = re.search(rf"\[trainer\] evaluation {point['label']}: (\d+)% of answers", log).group(1)
        assert round(point["ended_share"] * 100) == int(share)


def test_end_card_summarizes_the_run(tiny_run):
    run, _ = tiny_run
    end = run["end"].task
    components = card_components(card_html(end, "summary"))
    text = markdown_text(components)
    assert run.pathspec in text and end.data.model_location in text
    assert f"python -m training.generate --run {run.pathspec}" in text
    cells = {row[0]: row[1] for table in tables(components) for row in table["data"]}
    metrics = end.data.training_metrics
    assert cells["Eval loss"] == f"{metrics['eval_loss_before']:.4f} → {metrics['eval_loss_after']:.4f}"
    assert cells["Base model"] == run["start"].task.data.config["base_model"]
    assert "4 steps" in cells["Schedule"] and "4 x 1 accumulation x 1 rank(s) = 4 sequences/step" in cells["Schedule"]


def test_generate_answers_with_the_model_of_a_run(tiny_run, flow_home):
    run, _ = tiny_run

    def generate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "training.generate", *args], cwd=flow_home,
                              env=flow_env(flow_home), capture_output=True, text=True, timeout=300)

    for chosen in (run.pathspec, run.id):
        result = generate("--run", chosen, "--max-new-tokens", "4", "Name a color.", "Name a fruit.")
        assert result.returncode == 0, result.stderr[-3000:]
        assert run["end"].task.data.model_location in result.stdout
        assert "### Name a color." in result.stdout and "### Name a fruit." in result.stdout
    missing = generate("--run", "DollyFlow/999999", "Hi.")
    assert missing.returncode == 2 and "Run DollyFlow/999999 not found" in missing.stderr


def test_generate_latest_run_and_a_clear_error_without_runs(tmp_path, small_dataset_dir):
    from training.metaflow_runs import RunLookupError, run_model_location

    empty = tmp_path / "no-runs"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "training.generate", "--run", "latest", "Hi."], cwd=empty,
                            env=flow_env(empty), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "No successful DollyFlow run found" in result.stderr
    assert "python flows/dolly_flow.py run" in result.stderr
    with pytest.raises(RunLookupError):
        run_model_location("not-a-run/1/2/3")


def test_generation_stops_at_end_key(tiny_tokenizer):
    import torch

    from training.generate import generate_response
    from training.prompt import END_KEY

    end_id = tiny_tokenizer.convert_tokens_to_ids(END_KEY)
    words = tiny_tokenizer("Blue is a color", add_special_tokens=False)["input_ids"]

    class ScriptedModel:
        """Emits the answer, then ### End, then text a model without a stop would run on with."""

        device = torch.device("cpu")

        def generate(self, input_ids, eos_token_id, max_new_tokens, **kwargs):
            assert end_id in eos_token_id
            tail = torch.tensor([[*words, end_id, *words]])[:, :max_new_tokens]
            return torch.cat([input_ids, tail], dim=1)

    result = generate_response(ScriptedModel(), tiny_tokenizer, "Name a color.", max_new_tokens=32)
    assert result.ended and result.new_tokens == len(words)
    assert result.text == tiny_tokenizer.decode(words, skip_special_tokens=True).strip()
    cut = generate_response(ScriptedModel(), tiny_tokenizer, "Name a color.", max_new_tokens=2)
    assert not cut.ended and cut.new_tokens == 2
