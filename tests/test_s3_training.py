"""The trainer with --s3_uri against moto's S3 server: uploads while training, retention, resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    free_port,
    kill_process_tree,
    python_env,
    started,
    wait_for_exit,
    wait_for_output,
)
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


def s3_arguments(tiny_model_dir, small_dataset_dir, uri: str) -> list[str]:
    """The first attempt's flags, and a new machine's that resumes it: a checkpoint every 4 steps, 2 kept."""
    return ["--base_model", str(tiny_model_dir), "--dataset", str(small_dataset_dir), "--s3_uri", uri,
            "--save_steps", "4", "--save_total_limit", "2", "--learning_rate", "1e-3", "--eval_max_new_tokens", "8"]


@pytest.fixture(scope="module")
def first_attempt(tiny_model_dir, small_dataset_dir, s3_server, tmp_path_factory):
    """One epoch (12 steps of 4 rows) with --s3_uri: (its URI, the folder holding its output folder
    "first", its result). Its checkpoint-12 is saved before that epoch's evaluation and answers,
    which an attempt that resumes it then runs. The retention test reads it; the resume test
    resumes from it."""
    import boto3

    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.items():
            patch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="first-attempt")
    uri = "s3://first-attempt/run"
    folder = tmp_path_factory.mktemp("first-attempt")
    result = train([*s3_arguments(tiny_model_dir, small_dataset_dir, uri), "--max_steps", "12"], s3_server, folder,
                   "first")
    return uri, folder, result


def test_checkpoints_and_model_go_to_s3_with_retention(first_attempt, s3_env, tmp_path):
    uri, folder, result = first_attempt
    metrics = json.loads((folder / "first" / "metrics.json").read_text())
    assert metrics["checkpoints_uploaded"] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert metrics["model_location"] == f"{uri}/model"
    assert S3CheckpointStore(f"{uri}/checkpoints").names() == ["checkpoint-8", "checkpoint-12"]
    assert "deleted" in result.stdout and "checkpoint-4 (save_total_limit 2)" in result.stdout

    logs = S3CheckpointStore(uri).download("logs", tmp_path / "downloaded")
    assert list(logs.rglob("events.out.tfevents.*"))
    model = S3CheckpointStore(uri).download("model", tmp_path / "downloaded")  # verifies every sha256
    names = {p.name for p in model.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "config.json", "metrics.json"} <= names
    assert not names & {"checkpoints", "logs", "training_args.bin", "s3_uploads.json"}
    assert not (folder / "first" / "training_args.bin").exists()  # a pickle: no part of the model
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model)


def test_resume_latest_continues_the_global_step_and_reports_the_whole_run(tiny_model_dir, small_dataset_dir, s3_env,
                                                                          first_attempt, tmp_path):
    """A new machine (a fresh output directory, only S3 in common with the first attempt) resumes
    from the newest checkpoint, checkpoint-12, and trains two more steps."""
    uri, folder, _ = first_attempt
    result = train([*s3_arguments(tiny_model_dir, small_dataset_dir, uri), "--max_steps", "14",
                    "--resume_from", "latest"], s3_env, tmp_path, "second")
    assert f"resuming from {uri}/checkpoints/checkpoint-12" in result.stdout
    steps = [int(s) for s in re.findall(r"\[trainer\] step (\d+)/14 loss=", result.stdout)]
    assert steps == [13, 14]  # steps 1-12 were not trained again
    first = json.loads((folder / "first" / "metrics.json").read_text())
    metrics = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert metrics["global_step"] == 14 and metrics["resumed_from_step"] == 12
    # What an uninterrupted run reports: the base model's figures (from the checkpoint, not an
    # evaluation of the checkpoint), every evaluation since step 0, one per epoch end.
    assert metrics["eval_loss_before"] == first["eval_loss_before"]
    assert [step for step, _ in metrics["eval_loss_history"]] == [0, 12, 14]
    assert metrics["eval_loss_history"][1] == first["eval_loss_history"][1]  # the same model at step 12
    assert [p["label"] for p in metrics["evaluation"]] == ["base", "epoch 1", "epoch 1.17"]
    for resumed, original in zip(metrics["evaluation"][:2], first["evaluation"], strict=True):  # base, epoch 1
        assert (resumed["global_step"], resumed["answers"]) == (original["global_step"], original["answers"])
    assert metrics["ended_share_base"] == first["ended_share_base"]
    # Throughput and runtime since step 0, not over the 2 steps of the second attempt.
    def stream(name: Path) -> list[dict]:
        return [json.loads(line) for line in (name / "logs" / "progress.jsonl").read_text().splitlines()]

    step_s = [e["step_s"] for name in (folder / "first", tmp_path / "second") for e in stream(name)
              if e["event"] == "step"]
    assert len(step_s) == 14
    assert metrics["tokens_per_second"] == pytest.approx(metrics["tokens"] / sum(step_s), rel=1e-6)
    saved = json.loads((tmp_path / "second" / "resume" / "checkpoint-12" / "trainer_state.json").read_text())
    before = saved["stateful_callbacks"]["StreamProgress"]["attributes"]["restored_train_seconds"]
    assert metrics["train_runtime_s"] > before > sum(step_s[:12])
    restored = [e for e in stream(tmp_path / "second") if e.get("restored")]
    assert [e["label"] for e in restored if e["event"] == "evaluation"] == ["base"]
    assert [e["step"] for e in restored if e["event"] == "log"] == list(range(1, 13))


def test_unreachable_s3_stops_before_the_data_loads(tiny_model_dir, small_dataset_dir, tmp_path):
    """Each S3 flag is checked (its prefix listed) before any data is read, and both are reported."""
    env = python_env(AWS_ENDPOINT_URL_S3="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s",
                     AWS_DEFAULT_REGION="us-east-1")
    result = subprocess.run(
        [sys.executable, "-m", "training.trainer", "--base_model", str(tiny_model_dir), "--dataset",
         str(small_dataset_dir), "--s3_uri", "s3://bucket/x", "--resume_from", "s3://bucket/y/checkpoint-3",
         "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "Cannot train:\n  --s3_uri: S3 list failed for s3://bucket/x/checkpoints: " in result.stderr
    assert "\n  --resume_from: S3 list failed for s3://bucket/y/checkpoint-3: " in result.stderr
    assert "Check the URL, the endpoint (AWS_ENDPOINT_URL_S3) and your AWS credentials." in result.stderr
    assert "[trainer] data " not in result.stdout


def test_s3_without_credentials_stops_before_the_data_loads(tiny_model_dir, small_dataset_dir, tmp_path):
    env = python_env(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                     AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-m", "training.trainer", "--base_model", str(tiny_model_dir), "--dataset",
         str(small_dataset_dir), "--s3_uri", "s3://bucket/x", "--output_dir", str(tmp_path / "out"),
         "--cache_dir", str(tmp_path / "cache")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "Cannot train:\n  --s3_uri: S3 list failed for s3://bucket/x/checkpoints: no AWS credentials found." \
        in result.stderr
    assert "[trainer] data " not in result.stdout


def test_a_checkpoint_in_s3_with_a_pickle_payload_is_refused_before_the_model_loads(
        tiny_model_dir, small_dataset_dir, s3_env, s3_bucket_name, tmp_path):
    """Its manifest verifies (whoever wrote the bucket wrote it too): the pickle is refused all the
    same, by its S3 URL, with what to do; the payload never runs. (``latest`` skips such a
    checkpoint for the one before it: tests/unit/test_storage_attacks.py.)"""
    from tests.unit.test_safe_loading import write_payload

    uri = f"s3://{s3_bucket_name}/crafted"
    checkpoint = tmp_path / "upload" / "checkpoint-4"
    marker = tmp_path / "payload-ran"
    write_payload(checkpoint / "rng_state.pth", marker)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    S3CheckpointStore(f"{uri}/checkpoints").upload(checkpoint)

    result = subprocess.run(
        [sys.executable, "-m", "training.trainer", "--base_model", str(tiny_model_dir), "--dataset",
         str(small_dataset_dir), "--s3_uri", uri, "--resume_from", f"{uri}/checkpoints/checkpoint-4",
         "--max_steps", "6", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")],
        cwd=REPO, env=python_env(**s3_env), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert (f"{uri}/checkpoints/checkpoint-4/rng_state.pth holds a pickle that references posix.system, "
            "which a checkpoint never needs") in result.stderr
    assert "[trainer] model " not in result.stdout
    assert not marker.exists()
    assert not (tmp_path / "out" / "resume" / "checkpoint-4").exists()


def test_a_failed_final_upload_says_training_finished_and_where_the_model_is(
        tiny_model_dir, small_dataset_dir, s3_env, s3_bucket_name, tmp_path, monkeypatch, capfd):
    """Also `--resume_from latest` with nothing uploaded yet (an empty prefix): it starts fresh."""
    from training import train_outputs, trainer
    from training.checkpoint_store import CheckpointStoreError

    def upload_fails(output_dir, files, store):
        raise CheckpointStoreError(f"S3 upload failed for {store.uri}: the endpoint went away.")

    monkeypatch.setattr(train_outputs, "publish_model", upload_fails)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "out" / "logs"))  # the trainer's setdefault
    uri = f"s3://{s3_bucket_name}/finished"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        trainer.main(["--base_model", str(tiny_model_dir), "--dataset", str(small_dataset_dir), "--s3_uri", uri,
                      "--max_steps", "2", "--save_steps", "1000", "--eval_instructions", "none",
                      "--per_device_train_batch_size", "4", "--output_dir", str(out),
                      "--cache_dir", str(tmp_path / "cache"), "--resume_from", "latest"])
    printed = capfd.readouterr().out
    assert "no valid checkpoint in" in printed and "starting fresh" in printed
    message = str(raised.value.code)
    assert message == (f"Training finished: the model is in {out}, the checkpoints in {out / 'checkpoints'}; "
                       f"these did not upload:\n  the model ({uri}/model): S3 upload failed for {uri}: "
                       "the endpoint went away.")
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_sigterm_checkpoints_and_uploads_within_the_grace_period(tiny_model_dir, small_dataset_dir, s3_env,
                                                                 s3_bucket_name, tmp_path):
    import signal

    uri = f"s3://{s3_bucket_name}/preempted"
    log = tmp_path / "trainer.log"
    with started(
        [sys.executable, "-m", "training.trainer", "--base_model", str(tiny_model_dir), "--dataset",
         str(small_dataset_dir), "--s3_uri", uri, "--max_steps", "100000", "--save_steps", "100000",
         "--eval_steps", "100000", "--per_device_train_batch_size", "4", "--logging_steps", "1",
         "--max_seq_length", "1024", "--preemption_grace_s", "20", "--output_dir", str(tmp_path / "out"),
         "--cache_dir", str(tmp_path / "cache")],
        log, cwd=REPO, env=python_env(**s3_env),
    ) as trainer:
        wait_for_output(log, r"\[trainer\] step 5/", trainer, timeout=300)
        trainer.send_signal(signal.SIGTERM)
        # Bounded: if SIGTERM were ignored the trainer would run on toward step 100000. Exiting
        # took 62 s here under a load of 10 on 2 cores, so no wall-clock limit is asserted:
        code = wait_for_exit(trainer, log, timeout=300)
    rest = log.read_text()
    assert code != 0
    # "uploaded to" says the trainer saw the upload finish within the grace period, on its own
    # clock from the SIGTERM it received ("upload not finished within the grace period" if not).
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
            if proc.poll() is None:  # torchrun and its rank: kill() would reach only torchrun
                kill_process_tree(proc.pid)
                proc.wait(timeout=60)
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
    # Listed as a two-node run sees them (a one-node store skips checkpoints of two nodes).
    assert S3CheckpointStore(f"{uri}/checkpoints", nodes=2).names() == ["checkpoint-2", "checkpoint-4"]
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
