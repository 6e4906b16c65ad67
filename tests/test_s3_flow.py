"""DollyFlow with Metaflow's S3 datastore on moto's S3 server: checkpoints, model, kill and retry."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from pathlib import Path

import boto3
import psutil
import pytest

from tests.conftest import REPO, flow_env, metaflow_runner, write_config

FLOW = REPO / "flows" / "dolly_flow.py"


@pytest.fixture
def s3_flow_env(s3_env, s3_bucket_name, flow_home, monkeypatch):
    """Metaflow's datastore and data root in the moto bucket; the client reads them too."""
    env = {
        **flow_env(flow_home),
        **s3_env,
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{s3_bucket_name}/metaflow",
        "METAFLOW_DATATOOLS_S3ROOT": f"s3://{s3_bucket_name}/metaflow/data",
        "METAFLOW_S3_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL_S3"],
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_full_run_publishes_checkpoints_and_model_to_s3(tiny_config, flow_home, s3_flow_env, s3_bucket_name,
                                                         tmp_path):
    config = write_config(tiny_config, tmp_path, max_steps=4, save_steps=2, save_total_limit=1)
    with metaflow_runner(str(FLOW), show_output=False, env=s3_flow_env, cwd=str(flow_home),
                         config=[("config", config)]).run() as running:
        assert running.status == "successful", running.stdout[-4000:] + running.stderr[-4000:]
        run = running.run
        log = running.stdout
    root = f"s3://{s3_bucket_name}/metaflow/data/DollyFlow/{run.id}"
    assert f"Checkpoints and model: {root}" in log
    end = run["end"].task.data
    assert end.model_location == f"{root}/model"
    manifest = run["train"].task.data.checkpoint_manifest
    assert list(manifest["checkpoints"]) == [f"{root}/checkpoints/checkpoint-4"]  # save_total_limit 1
    assert {f["path"] for f in manifest["model"]["files"]} >= {"model.safetensors", "tokenizer.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["model"]["files"])
    assert "testing" not in json.dumps(manifest)  # no credentials in artifacts

    from training.generate import generate_response, load_for_generation

    model, tokenizer = load_for_generation(end.model_location)  # downloads and verifies every file
    assert generate_response(model, tokenizer, "Name a color.", max_new_tokens=4).new_tokens <= 4

    # A new run that starts from this run's newest valid checkpoint, named by its pathspec.
    longer = write_config(tiny_config, tmp_path / "longer", max_steps=6, save_steps=2)
    with metaflow_runner(str(FLOW), show_output=False, env=s3_flow_env, cwd=str(flow_home),
                         config=[("config", longer)]).run(resume_from=f"DollyFlow/{run.id}") as running:
        assert running.status == "successful", running.stdout[-4000:]
        assert f"resuming from {root}/checkpoints/checkpoint-4" in running.stdout
        assert running.run["end"].task.data.training_metrics["global_step"] == 6


def _kill_trainer_after(bucket: str, checkpoint: str, marker: str, stop: threading.Event, killed: list) -> None:
    """Wait (bounded) for `checkpoint`'s manifest in S3, then SIGKILL the trainer processes."""
    client = boto3.client("s3")
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline:
        listing = client.list_objects_v2(Bucket=bucket, Prefix="metaflow/data/DollyFlow/")
        if any(obj["Key"].endswith(f"{checkpoint}/manifest.json") for obj in listing.get("Contents", [])):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if "training.trainer" in cmdline and marker in cmdline and "deepspeed" not in cmdline.split()[0]:
                    proc.kill()
                    killed.append(proc.info["pid"])
            if killed:
                return
        time.sleep(0.1)


@contextlib.contextmanager
def trainer_killed_after(bucket: str, checkpoint: str, marker: str):
    """While the body runs, SIGKILL the trainer once `checkpoint` is complete in S3; yields the
    list of killed pids (empty if training finished first)."""
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_trainer_after, args=(bucket, checkpoint, marker, stop, killed))
    watcher.start()
    try:
        yield killed
    finally:
        stop.set()
        watcher.join()


def test_killed_trainer_is_retried_from_the_last_valid_checkpoint(tiny_config, flow_home, s3_flow_env,
                                                                 s3_bucket_name, tmp_path):
    config = write_config(tiny_config, tmp_path, max_steps=160, save_steps=20, save_total_limit=2,
                          logging_steps=20, retries=1)
    segments_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    with trainer_killed_after(s3_bucket_name, "checkpoint-40", str(flow_home)) as killed, metaflow_runner(
        str(FLOW), show_output=False, env=s3_flow_env, cwd=str(flow_home), config=[("config", config)]
    ).run() as running:
        log = running.stdout
        status = running.status
        run = running.run
    assert killed, "the trainer finished before it could be killed"
    assert status == "successful", log[-4000:]
    resumed = re.search(r"resuming from s3://\S+/checkpoints/checkpoint-(\d+)", log)
    assert resumed and int(resumed.group(1)) >= 40, log[-4000:]
    train = run["train"].task
    assert train.current_attempt == 1
    assert run["end"].task.data.training_metrics["global_step"] == 160  # as if never interrupted
    # The killed rank could not remove its 66 MB /dev/shm segment; the train task did.
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= segments_before


def test_sigterm_to_the_train_task_checkpoints_to_s3(tiny_config, flow_home, s3_flow_env, s3_bucket_name, tmp_path):
    """A preempted pod: SIGTERM reaches the train task, which has the trainer save and upload."""
    import os
    import signal
    import subprocess
    import sys

    config = write_config(tiny_config, tmp_path, max_steps=100000, save_steps=100000, eval_steps=100000,
                          logging_steps=1)
    with subprocess.Popen([sys.executable, str(FLOW), "--config", "config", config, "run"], cwd=flow_home,
                          env=s3_flow_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as flow:
        started = time.monotonic()
        task_pid = run_id = None
        for line in flow.stdout:
            found = re.search(r"\[(\d+)/train/\d+ \(pid (\d+)\)\] \[trainer\] step 5/", line)
            if found:
                run_id, task_pid = found.group(1), int(found.group(2))
                break
            assert time.monotonic() - started < 300, "training never reached step 5"
        assert task_pid, "no train task seen"
        os.kill(task_pid, signal.SIGTERM)
        sent = time.monotonic()
        rest = flow.stdout.read()
        flow.wait(timeout=120)
    assert flow.returncode != 0
    assert "Stopped by SIGTERM" in rest and "Preempted (SIGTERM) at step" in rest, rest[-3000:]
    prefix = f"metaflow/data/DollyFlow/{run_id}/checkpoints/"
    listing = boto3.client("s3").list_objects_v2(Bucket=s3_bucket_name, Prefix=prefix)
    manifests = [o for o in listing.get("Contents", []) if o["Key"].endswith("manifest.json")]
    assert len(manifests) == 1
    assert manifests[0]["LastModified"].timestamp() - (time.time() - (time.monotonic() - sent)) < 25


def test_resume_continues_a_failed_run_from_its_last_valid_checkpoint(tiny_config, flow_home, s3_flow_env,
                                                                     s3_bucket_name, tmp_path):
    """`python flows/dolly_flow.py resume`: the new attempt continues, it does not start over."""
    config = write_config(tiny_config, tmp_path, max_steps=160, save_steps=20, save_total_limit=2,
                          logging_steps=20, retries=0)
    with trainer_killed_after(s3_bucket_name, "checkpoint-40", str(flow_home)) as killed, metaflow_runner(
        str(FLOW), show_output=False, env=s3_flow_env, cwd=str(flow_home), config=[("config", config)]
    ).run() as failed:
        assert failed.status == "failed"
        origin = failed.run.id
    assert killed, "the trainer finished before it could be killed"
    # resume takes the configuration of the run it resumes (Metaflow refuses --config there).
    with metaflow_runner(str(FLOW), show_output=False, env=s3_flow_env,
                         cwd=str(flow_home)).resume(origin_run_id=origin) as resumed:
        assert resumed.status == "successful", resumed.stdout[-4000:]
        log = resumed.stdout
        run = resumed.run
    found = re.search(r"resuming from s3://\S+/DollyFlow/" + origin + r"/checkpoints/checkpoint-(\d+)", log)
    assert found and int(found.group(1)) >= 40, log[-3000:]
    assert run["end"].task.data.training_metrics["global_step"] == 160
