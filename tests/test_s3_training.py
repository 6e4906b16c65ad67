"""The trainer with --s3_uri against moto's S3 server: uploads while training, retention, resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import REPO, python_env
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
