"""The trainer with --s3_uri against moto's S3 server: uploads while training, retention, resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import REPO, free_port, python_env
from training.checkpoint_store import S3CheckpointStore


def train(args: list[str], s3_env: dict[str, str], tmp_path, name: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "training.trainer", *args, "--output_dir", str(tmp_path / name),
         "--per_device_train_batch_size", "4", "--logging_steps", "1", "--max_seq_length", "1024",
         "--cache_dir", str(tmp_path / "cache")],
        cwd=REPO, env=python_env(**s3_env), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_checkpoints_and_model_go_to_s3_with_retention(tiny_model_dir, small_dataset_dir, s3_env, s3_bucket_name,
                                                      tmp_path):
    uri = f"s3://{s3_bucket_name}/run1"
    result = train(["--base_model", str(tiny_model_dir), "--dataset", str(small_dataset_dir), "--s3_uri", uri,
                    "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "2"], s3_env, tmp_path, "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["checkpoints_uploaded"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert metrics["model_location"] == f"{uri}/model"
    assert S3CheckpointStore(f"{uri}/checkpoints").names() == ["checkpoint-4", "checkpoint-6"]
    assert "deleted" in result.stdout and "checkpoint-2 (save_total_limit 2)" in result.stdout

    logs = S3CheckpointStore(uri).download("logs", tmp_path / "downloaded")
    assert list(logs.rglob("events.out.tfevents.*"))
    model = S3CheckpointStore(uri).download("model", tmp_path / "downloaded")  # verifies every sha256
    names = {p.name for p in model.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "config.json", "metrics.json"} <= names
    assert not names & {"checkpoints", "logs"}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model)


def test_resume_latest_continues_the_global_step(tiny_model_dir, small_dataset_dir, s3_env, s3_bucket_name, tmp_path):
    uri = f"s3://{s3_bucket_name}/run2"
    common = ["--base_model", str(tiny_model_dir), "--dataset", str(small_dataset_dir), "--s3_uri", uri,
              "--save_steps", "2", "--learning_rate", "1e-3"]
    train([*common, "--max_steps", "4"], s3_env, tmp_path, "first")
    # A new machine: a fresh output directory, only S3 in common with the first attempt.
    result = train([*common, "--max_steps", "6", "--resume_from", "latest"], s3_env, tmp_path, "second")
    assert f"resuming from {uri}/checkpoints/checkpoint-4" in result.stdout
    steps = [int(s) for s in re.findall(r"\[trainer\] step (\d+)/6 loss=", result.stdout)]
    assert steps == [5, 6]  # steps 1-4 were not trained again
    metrics = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert metrics["global_step"] == 6


def test_resume_latest_with_nothing_uploaded_starts_fresh(tiny_model_dir, small_dataset_dir, s3_env, s3_bucket_name,
                                                         tmp_path):
    result = train(["--base_model", str(tiny_model_dir), "--dataset", str(small_dataset_dir),
                    "--s3_uri", f"s3://{s3_bucket_name}/empty", "--max_steps", "2", "--resume_from", "latest"],
                   s3_env, tmp_path, "out")
    assert "no valid checkpoint in" in result.stdout and "starting fresh" in result.stdout


def test_unreachable_s3_stops_before_training(tiny_model_dir, small_dataset_dir, tmp_path):
    env = python_env(AWS_ENDPOINT_URL_S3="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s",
                     AWS_DEFAULT_REGION="us-east-1")
    result = subprocess.run(
        [sys.executable, "-m", "training.trainer", "--base_model", str(tiny_model_dir), "--dataset",
         str(small_dataset_dir), "--s3_uri", "s3://bucket/x", "--output_dir", str(tmp_path / "out"),
         "--cache_dir", str(tmp_path / "cache")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "Cannot train: S3 list failed for s3://bucket/x/checkpoints" in result.stderr
    assert "step 1/" not in result.stdout


def test_sigterm_checkpoints_and_uploads_within_the_grace_period(tiny_model_dir, small_dataset_dir, s3_env,
                                                                 s3_bucket_name, tmp_path):
    import signal
    import time

    uri = f"s3://{s3_bucket_name}/preempted"
    with subprocess.Popen(
        [sys.executable, "-m", "training.trainer", "--base_model", str(tiny_model_dir), "--dataset",
         str(small_dataset_dir), "--s3_uri", uri, "--max_steps", "100000", "--save_steps", "100000",
         "--eval_steps", "100000", "--per_device_train_batch_size", "4", "--logging_steps", "1",
         "--max_seq_length", "1024", "--preemption_grace_s", "20", "--output_dir", str(tmp_path / "out"),
         "--cache_dir", str(tmp_path / "cache")],
        cwd=REPO, env=python_env(**s3_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as trainer:
        started = time.monotonic()
        for line in trainer.stdout:  # bounded by the trainer's own output and the check below
            if "[trainer] step 5/" in line:
                break
            assert time.monotonic() - started < 300, "the trainer never reached step 5"
        trainer.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rest = trainer.stdout.read()
        trainer.wait(timeout=60)
        elapsed = time.monotonic() - sent
    assert trainer.returncode != 0
    assert elapsed < 20, f"took {elapsed:.1f} s after SIGTERM"
    saved = re.search(r"Preempted \(SIGTERM\) at step (\d+): checkpoint-\d+ uploaded to", rest)
    assert saved, rest[-3000:]
    step = int(saved.group(1))
    assert S3CheckpointStore(f"{uri}/checkpoints").names() == [f"checkpoint-{step}"]


def train_two_nodes(args: list[str], s3_env: dict[str, str], tmp_path, name: str) -> list[str]:
    """Two "nodes" of one CPU rank each (torchrun --nnodes 2, gloo), each with its own output
    directory as on two machines; returns each node's output."""
    port = free_port()
    logs, procs = [], []
    for node in (0, 1):
        log = open(tmp_path / f"{name}-node{node}.log", "w")  # noqa: SIM115 -- closed below
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
             "-m", "training.trainer", *args, "--output_dir", str(tmp_path / f"{name}-node{node}"),
             "--per_device_train_batch_size", "4", "--logging_steps", "1", "--max_seq_length", "1024",
             "--deepspeed", "ds_configs/zero2.json", "--eval_instructions", "none",
             "--cache_dir", str(tmp_path / "cache")],
            cwd=REPO, env=python_env(**s3_env), stdout=log, stderr=subprocess.STDOUT, text=True,
        ))
    try:
        codes = [proc.wait(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"{name}-node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], "\n".join(out[-3000:] for out in outputs)
    return outputs


def test_two_nodes_upload_their_parts_and_resume_from_them(tiny_model_dir, small_dataset_dir, s3_env,
                                                          s3_bucket_name, tmp_path):
    """Each node's rank writes its ZeRO-2 optimizer shard to its own disk: every node uploads its
    part of each checkpoint, and a new pair of nodes resumes from those parts."""
    import boto3

    uri = f"s3://{s3_bucket_name}/two-nodes"
    common = ["--base_model", str(tiny_model_dir), "--dataset", str(small_dataset_dir), "--s3_uri", uri,
              "--save_steps", "2", "--learning_rate", "1e-3"]
    train_two_nodes([*common, "--max_steps", "4"], s3_env, tmp_path, "first")
    assert S3CheckpointStore(f"{uri}/checkpoints").names() == ["checkpoint-2", "checkpoint-4"]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket_name, Prefix="two-nodes/checkpoints/checkpoint-4/")["Contents"]]
    shards = [k.removeprefix("two-nodes/checkpoints/checkpoint-4/") for k in keys if "optim_states" in k]
    # Node 0's folder holds rank 0's shard only: without node 1's part there is no resuming.
    assert sorted(shards) == ["global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                              "node-1/global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert "two-nodes/checkpoints/checkpoint-4/model.safetensors" in keys
    assert not [k for k in keys if "/node-1/" in k and k.endswith(".safetensors")]  # node 0's copy serves

    # Two new machines: fresh output directories, only S3 in common with the first attempt.
    node0, node1 = train_two_nodes([*common, "--max_steps", "6", "--resume_from", "latest"], s3_env, tmp_path,
                                   "second")
    for output in (node0, node1):
        assert f"resuming from {uri}/checkpoints/checkpoint-4" in output
    steps = [int(s) for s in re.findall(r"\[trainer\] step (\d+)/6 loss=", node0)]
    assert steps == [5, 6]  # steps 1-4 were not trained again
    metrics = json.loads((tmp_path / "second-node0" / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["world_size"] == 2
    assert (tmp_path / "second-node1" / "resume" / "checkpoint-4" / "global_step4"
            / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
