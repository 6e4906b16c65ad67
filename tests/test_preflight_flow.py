"""Preflight in real runs: the GPU node refuses a plan it cannot run, before the trainer starts."""

from __future__ import annotations

import json

from tests.conftest import card_components, flow_env, metaflow_runner
from tests.test_training_card import markdown_text, tables

FLOW_FILE = "flows/dolly_flow.py"


def test_start_records_the_declared_check_and_train_the_node_check(tiny_run):
    run, log = tiny_run
    start = run["start"].task.data.preflight_start
    assert start["ok"] and start["facts"]["gpus_requested"] == 0
    node = run["train"].task.data.preflight
    assert node["ok"] and node["facts"]["torch_version"] and node["plan"]["num_parameters"] > 0
    assert node["facts"]["disk_free_bytes"] > node["checkpoint_disk_bytes"] > 0
    assert "preflight: every check passed" in log


def test_a_gpu_preset_on_a_node_without_gpus_fails_in_seconds_with_the_reason_on_the_card(
        tiny_config, flow_home, tmp_path):
    from tests.conftest import REPO

    config = json.loads(tiny_config.read_text())
    config["name"] = "needs-a-gpu"
    config["resources"]["gpu"] = 1
    # flow_env hides CUDA devices (tests/no_cuda): torch sees none on a GPU machine too.
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(config))
    with metaflow_runner(str(REPO / FLOW_FILE), show_output=False, env=flow_env(flow_home), cwd=str(flow_home),
                         config=[("config", str(path))]).run() as running:
        assert running.status == "failed"
        output = running.stdout + running.stderr
        run = running.run
    assert "Preflight on the train node failed" in output
    assert "[gpu-count]" in output and "1 GPU" in output
    assert "[trainer] step" not in output  # refused before the trainer started
    from metaflow.cards import get_cards

    (card,) = get_cards(run["train"].task, id="training")
    components = card_components(card.get())
    text = markdown_text(components)
    assert "Failed" in text and "Preflight on this node: 1 error(s)" in text
    facts = {row[0]: row[1] for table in tables(components) for row in table["data"]}
    assert facts["GPUs requested / visible"].startswith("1 / 0")
