"""DollySweepFlow as users run it, on the tiny model: one sweep of three points in parallel, one
of which fails in its trainer; grids refused in `start`; the comparison card in a real browser;
the Argo compile."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    card_components,
    chromium_flags,
    flow_env,
    metaflow_runner,
    needs_chromium,
    python_env,
    run_bounded,
    walk_components,
    write_jsonl,
)
from tests.unit.test_card_escaping import IMG

FLOW = REPO / "flows" / "dolly_sweep_flow.py"
ARTIFACTS = REPO / "test-artifacts"


def sweep_config(tiny_config: Path, directory: Path, sweep: dict) -> Path:
    config = json.loads(tiny_config.read_text())
    config["sweep"] = sweep
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sweep.json"
    path.write_text(json.dumps(config))
    return path


# The evaluation's instructions: the second carries a script, which the comparison card shows as text.
INSTRUCTIONS = [{"instruction": "Name a color.", "context": ""},
                {"instruction": f"Say hi. {IMG}", "context": ""}]


@pytest.fixture(scope="module")
def sweep_run(tiny_config, flow_home, tmp_path_factory):
    """Three points at once: two learning rates, and a point that passes start's checks and then
    fails in its trainer (every row is longer than its max_seq_length)."""
    directory = tmp_path_factory.mktemp("sweep")
    config = sweep_config(tiny_config, directory, {
        "points": [{"learning_rate": 1e-3}, {"learning_rate": 1e-5}, {"max_seq_length": 24}]})
    instructions = write_jsonl(directory / "instructions.jsonl", INSTRUCTIONS)
    with metaflow_runner(str(FLOW), show_output=False, env=flow_env(flow_home), cwd=str(flow_home),
                         config=[("config", str(config))]).run(max_workers=3,
                                                               eval_instructions=str(instructions)) as running:
        assert running.status == "successful", running.stdout[-5000:] + running.stderr[-5000:]
        return running.run, running.stdout


def comparison_html(run) -> str:
    from metaflow.cards import get_cards

    (card,) = get_cards(run["compare"].task, id="comparison")
    return card.get()


def test_points_train_in_parallel_a_failing_one_is_a_row_and_the_best_is_kept(sweep_run, flow_home):
    run, log = sweep_run
    results = run["compare"].task.data.results
    assert [r["settings"] for r in results] == [{"learning_rate": 1e-3}, {"learning_rate": 1e-5},
                                                {"max_seq_length": 24}]
    assert [r["status"] for r in results] == ["ok", "ok", "failed"]
    # The failing point is a row with its error; the sweep goes on and succeeds.
    assert results[2]["error"] and results[2]["model_location"] is None
    results = results[:2]
    for row in results:
        assert row["eval_loss_after"] is not None and row["tokens_per_second"] > 0 and row["wall_s"] > 0
        assert row["gpu_hours"] == 0.0  # CPU
        assert Path(row["model_location"]).is_dir()
    # Each point has its own directory, model and cards.
    assert results[0]["model_location"] != results[1]["model_location"]
    assert {Path(r["model_location"]).name for r in results} == {"point-1", "point-2"}
    train_tasks = list(run["train"])
    assert len(train_tasks) == 3
    from metaflow.cards import get_cards

    for task in train_tasks:
        assert len(get_cards(task, id="training")) == 1 and len(get_cards(task, id="gpu_profile")) == 1
    best = run["compare"].task.data.best
    lowest = min(results, key=lambda r: r["eval_loss_after"])
    assert best["point"] == lowest["point"]
    assert run.data.model_location == lowest["model_location"]
    assert f"best:learning_rate={lowest['settings']['learning_rate']}" in run.tags
    assert "Best (--select eval_loss): point" in log

    # The comparison card: the table (the failure in it), one chart with the finished points'
    # curves, each instruction's answers from the finished points.
    components = card_components(comparison_html(run))
    texts = json.dumps(components)
    assert "Sweep: 3 points, 2 finished, 1 failed" in texts and "failed: " in texts
    images = [c for c in walk_components(components) if c.get("type") == "image"]
    assert len(images) == 1
    tables = [c for c in walk_components(components) if c.get("type") == "table"]
    finished = next(task for task in run["train"] if hasattr(task.data, "evaluation"))  # not the failed point
    instructions = len(finished.data.evaluation[-1]["answers"])
    assert instructions == len(INSTRUCTIONS) and len(tables) == 1 + instructions
    assert all(len(t["data"]) == 2 for t in tables[1:])  # every instruction: one answer per finished point

    # The best point's model answers through the run's pathspec.
    result = run_bounded([sys.executable, "-m", "training.generate", "--run", run.pathspec, "--max-new-tokens", "4",
                          "Name a color."], cwd=flow_home, env=flow_env(flow_home), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[model of run {run.pathspec}: {lowest['model_location']}]" in result.stdout


def test_bad_grids_and_points_stop_in_start_naming_the_point(tiny_config, flow_home, tmp_path):
    def start(*args: str) -> str:
        result = run_bounded([sys.executable, str(FLOW), "--config", "config", str(tiny_config), "run", *args],
                             cwd=flow_home, env=flow_env(flow_home), timeout=300)
        assert result.returncode != 0
        output = result.stdout + result.stderr
        assert "DollySweepFlow cannot start" in output and "/train/" not in output, output[-3000:]
        return output

    output = start("--grid", "learning_rate=1e-4,0 batch_size=4 epoch=1", "--select", "speed")
    assert "--select: 'speed' is not one of eval_loss, ended_share." in output
    # epoch is unknown in every point: named once; learning_rate 0 is wrong in its point only.
    assert output.count("unknown key 'epoch'. Did you mean 'epochs'?") == 1
    assert "point 2 (learning_rate=0 batch_size=4 epoch=1): --learning-rate: must be positive, got 0.0." in output
    assert "point 1 (learning_rate=0.0001 batch_size=4 epoch=1): --learning-rate" not in output
    output = start("--grid", "learning_rate=1e-4,2e-4,3e-4 epochs=1,2,3")
    assert "The grid has 9 points, more than config sweep.max_points (8)" in output
    # A grid that cannot be read stops start with the other problems found so far.
    output = start("--grid", "epochs", "--select", "ended_share", "--eval-instructions", "none")
    assert "--grid: 'epochs' is not key=value[,value...]" in output
    # No point would have answers to compare: refused before any point trains.
    assert "--select ended_share: compares the evaluation answers, which --eval-instructions none turns off" in output


@needs_chromium
def test_comparison_card_renders_in_a_real_browser(sweep_run, tmp_path):
    run, _ = sweep_run
    html = tmp_path / "comparison_card.html"
    html.write_text(comparison_html(run))
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "comparison_card.png"
    flags = chromium_flags(tmp_path / "chromium", (1200, 1600))
    dom = subprocess.run([*flags, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The card's JavaScript built the page offline: the chart inline, the table's points.
    assert len(re.findall(r"<img[^>]+src=\"data:image/png", dom.stdout)) == 1
    assert "learning_rate=0.001" in dom.stdout and "learning_rate=1e-05" in dom.stdout
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)]
    assert console_errors == []
    # The instruction with a script heads its answers' column as text; the script did not run.
    assert re.search(r"<title>[^<]*pwned", dom.stdout) is None, "the instruction's script ran"
    shown = re.sub(r"<script\b.*?</script>", "", dom.stdout, flags=re.S)  # the card's own code names <img
    assert len(re.findall("<img", shown)) == 1  # the chart
    assert "2. Say hi. &lt;img src=x onerror=" in shown
    shot = subprocess.run([*flags, f"--screenshot={screenshot}", html.as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert shot.returncode == 0 and screenshot.stat().st_size > 20_000  # a blank page is a few KB


def test_sweep_compiles_to_argo_with_a_foreach_and_one_gpu_pod_per_point(s3_env, s3_bucket_name, tmp_path):
    from tests.test_deploy import argo_json, preset_with_image, templates

    config = json.loads(preset_with_image("a100x4", tmp_path).read_text())
    config["sweep"] = {"learning_rate": [1e-5, 2e-5]}
    path = tmp_path / "a100x4-sweep.json"
    path.write_text(json.dumps(config))
    result = argo_json(path, s3_env, s3_bucket_name, tmp_path, flow=FLOW)
    assert result.returncode == 0, result.stderr[-3000:]
    workflow = json.loads(result.stdout[result.stdout.index("{"):])
    steps = templates(result.stdout)
    assert {"start", "train", "compare", "end"} <= set(steps)
    limits = steps["train"]["container"]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(config["resources"]["gpu"])
    assert "nvidia.com/gpu" not in steps["compare"]["container"]["resources"]["limits"]
    # The foreach: the DAG fans train out over start's points (Argo withParam).
    dag_tasks = [t for template in workflow["spec"]["templates"] for t in template.get("dag", {}).get("tasks", [])]
    assert any("withParam" in t for t in dag_tasks), dag_tasks
    defaults = {p["name"]: p.get("value") for p in workflow["spec"]["arguments"]["parameters"]}
    assert {"grid", "select"} <= set(defaults)


def test_run_help_lists_the_sweep_parameters():
    result = subprocess.run([sys.executable, str(FLOW), "run", "--help"], env=python_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("--grid", "--select", "--learning-rate", "--prompt-format"):
        assert name in result.stdout, name
