"""Every flow with every optional output switched off ends green, and its summaries say "n/a".

The switches: `--eval-instructions none` (no answers, so no share of answers that end), LoRA
without merge (the adapter is the model), no S3 (checkpoints and model on local disk), 2 steps of
a 12-step epoch, and for DollyFlow no DeepSpeed. Each flow runs once, as cheaply
as it can: the tiny model, 2 steps, one sweep point.

DollyFlow's run (`all_off_run` in tests/conftest.py) also reads its data from a directory named
like the attack of issue 22 (`data<img src=x onerror=...>`): its `end` card, opened in headless
Chromium, shows the name as text and runs nothing. It runs on a simulated 4-GPU node too, for
tests/test_gpu_profile_flow.py, which changes none of the outputs checked here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import (
    OFF,
    REPO,
    all_off_config,
    card_components,
    chromium_flags,
    flow_env,
    metaflow_runner,
    needs_chromium,
    of_type,
)


def run_flow(flow: str, config: Path, flow_home: Path, **parameters: object):
    with metaflow_runner(str(REPO / "flows" / flow), show_output=False, env=flow_env(flow_home), cwd=str(flow_home),
                         config=[("config", str(config))]).run(**OFF, **parameters) as running:
        assert running.status == "successful", running.stdout[-4000:] + running.stderr[-4000:]
        return running.run, running.stdout


def card_html(task, card_id: str) -> str:
    from metaflow.cards import get_cards

    (card,) = get_cards(task, id=card_id)
    return card.get()


def cells(html: str) -> dict[str, str]:
    """First column -> second column of every table of a card."""
    return {row[0]: row[1] for table in of_type(card_components(html), "table") for row in table["data"]}


def assert_nothing_optional_was_made(run, log: str, *, summary_card: bool = True) -> None:
    """No answers, an adapter-only model on local disk, and a summary that says n/a for them
    (the sweep's `end` has no card: its `comparison` card shows the points)."""
    end = run["end"].task.data
    metrics = end.training_metrics
    assert end.evaluation == [] and metrics["ended_share_base"] is None and metrics["ended_share_final"] is None
    assert metrics["lora"]["merged"] is False
    location = Path(end.model_location)
    assert (location / "adapter_model.safetensors").is_file() and not (location / "model.safetensors").exists()
    assert f"Model: {end.model_location}" in log and "Answers ending at" not in log
    if summary_card:
        summary = cells(card_html(run["end"].task, "summary"))
        assert summary["Answers ending at ### End"] == "n/a" and summary["Mean answer tokens"] == "n/a"
        assert "adapter only" in summary["Method"]


def test_dolly_flow_ends_green(all_off_run):
    run, log = all_off_run
    assert_nothing_optional_was_made(run, log)
    end = run["end"].task
    assert end.data.checkpoint_manifest == {} and cells(card_html(end, "summary"))["DeepSpeed"] == "off"


@needs_chromium
def test_end_card_shows_a_hostile_data_set_name_as_text_in_a_browser(all_off_run, tmp_path):
    run, _ = all_off_run
    page = tmp_path / "summary_card.html"
    page.write_text(card_html(run["end"].task, "summary"))
    dom = subprocess.run([*chromium_flags(tmp_path / "chromium", (1200, 1200)), "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Fine-tuned" in dom.stdout  # the card's JavaScript built the page
    assert re.search(r"<title>[^<]*pwned", dom.stdout) is None, "the payload ran"
    shown = re.sub(r"<script\b.*?</script>", "", dom.stdout, flags=re.S)  # the card's own code names <img
    assert "<img" not in shown
    assert shown.count("data&lt;img src=x onerror=") == 2  # as text: the heading's code span, the Data cell


def test_sweep_ends_green_with_n_a_for_answers(tiny_config, flow_home, tmp_path):
    # Issue 22 point 10: end failed on `row['ended_share_final']:.0%` after every point trained.
    run, log = run_flow("dolly_sweep_flow.py", all_off_config(tiny_config, tmp_path), flow_home,
                        grid="learning_rate=1e-3")
    assert_nothing_optional_was_made(run, log, summary_card=False)
    (row,) = run["compare"].task.data.results
    assert row["status"] == "ok" and row["ended_share_final"] is None
    assert re.search(r"\* point 1 \(learning_rate=0\.001\): eval loss [0-9.]+ → [0-9.]+, answers ending n/a", log)
    (table,) = of_type(card_components(card_html(run["compare"].task, "comparison")), "table")  # no answers
    assert table["data"][0][4] == "n/a (### End)"


def test_multinode_flow_ends_green(tiny_config, flow_home, tmp_path):
    run, log = run_flow("dolly_multinode_flow.py", all_off_config(tiny_config, tmp_path, num_nodes=2), flow_home)
    assert run["end"].task.data.training_metrics["world_size"] == 2
    assert_nothing_optional_was_made(run, log)
