"""DollyMultiNodeFlow: train as a @parallel gang, run here as two local CPU "nodes" (gloo)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, card_components, flow_env, metaflow_runner, python_env
from tests.test_deploy import IMAGE, argo_json

FLOW = REPO / "flows" / "dolly_multinode_flow.py"


@pytest.fixture(scope="module")
def two_node_run(tiny_config, flow_home):
    config = json.loads(tiny_config.read_text())
    config.update(name="tiny-2nodes", num_nodes=2)
    path = flow_home / "tiny-2nodes.json"
    path.write_text(json.dumps(config))
    with metaflow_runner(str(FLOW), show_output=False, env=flow_env(flow_home), cwd=str(flow_home),
                         config=[("config", str(path))]).run() as running:
        assert running.status == "successful", running.stdout[-4000:] + running.stderr[-4000:]
        return running.run, running.stdout


def test_two_nodes_train_one_model_published_by_node_0(two_node_run, flow_home):
    run, log = two_node_run
    metrics = run["end"].task.data.training_metrics
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4
    assert "--nnodes 2 --node_rank 0" in log and "--nnodes 2 --node_rank 1" in log
    location = Path(run["end"].task.data.model_location)
    assert location.is_dir() and location.name == run.id  # node 0's directory, not "<id>-node1"
    assert not (location.parent / f"{run.id}-node1" / "model.safetensors").exists()  # node 1 saves no model
    tasks = list(run["train"])
    assert len(tasks) == 2
    assert sorted(run["gather"].task.data.node_profiles) == [0, 1]
    preflights = run["gather"].task.data.node_preflights
    assert sorted(preflights) == [0, 1] and all(p["ok"] for p in preflights.values())
    assert [p["label"] for p in run["end"].task.data.evaluation] == ["base", "epoch 0.67"]  # 4 of 6 steps

    from metaflow.cards import get_cards

    for task in tasks:
        assert len(get_cards(task, id="gpu_profile")) == 1  # every node profiles its own GPUs
    texts = {task.data.node_index: json.dumps(card_components(get_cards(task, id="training")[0].get()))
             for task in tasks}
    assert "node 0's `training` card" in texts[1] and "Evaluation" in texts[0]


def test_a100x4x2_compiles_to_a_jobset_of_control_and_workers(s3_env, s3_bucket_name, tmp_path):
    config = json.loads((REPO / "flows" / "configs" / "a100x4x2.json").read_text())
    config["kubernetes"]["image"] = IMAGE
    path = tmp_path / "a100x4x2.json"
    path.write_text(json.dumps(config))
    result = argo_json(path, s3_env, s3_bucket_name, tmp_path, flow=FLOW)
    assert result.returncode == 0, result.stderr[-3000:]
    workflow = json.loads(result.stdout[result.stdout.index("{"):])
    train = next(t for t in workflow["spec"]["templates"] if t["name"] == "train")
    manifest = train["resource"]["manifest"]
    assert "kind: JobSet" in manifest
    # One control pod (node 0) and num_parallel - 1 workers: num_parallel is the config's
    # num_nodes, which start passes on at run time.
    assert dict(re.findall(r"- name: (\w+)\n\s+replicas: (.*)", manifest)) == {
        "control": "1", "worker": "{{=asInt(inputs.parameters.workerCount)}}"}
    split = next(t for t in workflow["spec"]["templates"] if t["name"].endswith("-foreach-parallel"))
    worker_count = next(p["value"] for p in split["dag"]["tasks"][0]["arguments"]["parameters"]
                        if p["name"] == "workerCount")
    assert "sub(sprig.int(inputs.parameters['num-parallel']),1)" in worker_count
    # num-parallel is what the start step computes at run time (the config's num_nodes, as the
    # local two-node run shows), not a number fixed at compile time.
    entry = next(t for t in workflow["spec"]["templates"] if t["name"] == workflow["spec"]["entrypoint"])
    fan_out = next(t for t in entry["dag"]["tasks"] if t["template"] == split["name"])
    assert {p["name"]: p["value"] for p in fan_out["arguments"]["parameters"]}["num-parallel"] == (
        "{{tasks.start.outputs.parameters.num-parallel}}")
    # Both replicated jobs: 4 GPUs, the preset's /dev/shm, the image
    assert manifest.count("nvidia.com/gpu: '4'") == 2
    assert manifest.count("sizeLimit: 32768Mi") == 2 and manifest.count(f"image: {IMAGE}") == 2
    assert train["retryStrategy"]["limit"] == 2


def test_multinode_flow_lists_its_steps(tmp_path):
    result = subprocess.run([sys.executable, str(FLOW), "show"], cwd=tmp_path, env=python_env(USERNAME="tester"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("start", "train", "gather", "end"):
        assert f"Step {name}" in result.stdout
