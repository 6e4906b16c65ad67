"""DollyFlow with Metaflow's S3 datastore on moto's S3 server: checkpoints, model, kill and retry."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import boto3
import psutil
import pytest

from tests.conftest import (
    REPO,
    card_components,
    flow_env,
    metaflow_runner,
    of_type,
    python_env,
    run_bounded,
    started,
    wait_for_exit,
    wait_for_output,
    write_config,
)

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


# Credentials no real account has (moto takes any): found anywhere, they leaked.
LEAK_KEY_ID = "AKIALEAKCHECK7Q3Z9XW"
LEAK_SECRET = "LeakCheckSecret9f3Kq2Zr7Vx1Lm8Np4Tb6Hc0Jd5Wy"
CARD_DATA = re.compile(rb'window\.__MF_DATA__\["[^"]+"\] = "([A-Za-z0-9+/=]+)"')


def find_everywhere(items, needles: list[str]) -> tuple[dict[str, list[tuple[str, str, str]]], Counter]:
    """Where each needle occurs in ``items`` ((kind, name, bytes)): {needle: [(kind, name, view)]},
    and how many views of each kind were read. Views: the bytes as they are, gunzipped
    (Metaflow's datastore blobs) and a card's base64 data; a needle hidden in any of them is found."""
    import base64
    import gzip

    hits: dict[str, list[tuple[str, str, str]]] = {needle: [] for needle in needles}
    read: Counter = Counter()
    for kind, name, blob in items:
        views = [("raw", blob)]
        if blob[:2] == b"\x1f\x8b":
            views.append(("gunzip", gzip.decompress(blob)))
        views += [("card-data", base64.b64decode(m)) for _, text in list(views) for m in CARD_DATA.findall(text)]
        for view, text in views:
            read[kind, view] += 1
            for needle in needles:
                if needle.encode() in text:
                    hits[needle].append((kind, name, view))
    return hits, read


def run_outputs(runs, client, bucket: str):
    """(kind, name, bytes) of everything the runs left: each task's stdout and stderr, each
    artifact (pickled and repr), each card's HTML, and every object in the bucket."""
    import pickle

    from metaflow.cards import get_cards
    from metaflow.plugins.cards.exception import CardNotPresentException

    for run in runs:
        for step in run:
            for task in step:
                yield "log", f"{task.pathspec} stdout", task.stdout.encode()
                yield "log", f"{task.pathspec} stderr", task.stderr.encode()
                for artifact in task:
                    value = artifact.data
                    yield "artifact", f"{task.pathspec}:{artifact.id}", pickle.dumps(value)
                    yield "artifact", f"{task.pathspec}:{artifact.id} repr", repr(value).encode()
                try:
                    cards = list(get_cards(task))
                except CardNotPresentException:  # start has no card
                    cards = []
                for card in cards:
                    yield "card", f"{task.pathspec} card {card.id}", card.get().encode()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            yield "s3", obj["Key"], client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()


def corrupt(client, bucket: str, key: str) -> None:
    """Other bytes, same size: only the manifest's sha256 can tell."""
    size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    client.put_object(Bucket=bucket, Key=key, Body=b"\0" * size)


def test_full_run_publishes_checkpoints_and_model_to_s3(tiny_config, flow_home, s3_flow_env, s3_bucket_name,
                                                         tmp_path, monkeypatch):
    credentials = {"AWS_ACCESS_KEY_ID": LEAK_KEY_ID, "AWS_SECRET_ACCESS_KEY": LEAK_SECRET}
    env = {**s3_flow_env, **credentials}
    for key, value in credentials.items():  # this process's boto3 and Metaflow client too
        monkeypatch.setenv(key, value)
    config = write_config(tiny_config, tmp_path, max_steps=4, save_steps=2, save_total_limit=2)
    with metaflow_runner(str(FLOW), show_output=False, env=env, cwd=str(flow_home),
                         config=[("config", config)]).run() as running:
        assert running.status == "successful", running.stdout[-4000:] + running.stderr[-4000:]
        run = running.run
        log = running.stdout
        consoles = [running.stdout, running.stderr]
    root = f"s3://{s3_bucket_name}/metaflow/data/DollyFlow/{run.id}"
    assert f"Checkpoints and model: {root}" in log
    end = run["end"].task.data
    assert end.model_location == f"{root}/model"
    manifest = run["train"].task.data.checkpoint_manifest
    assert list(manifest["checkpoints"]) == [f"{root}/checkpoints/checkpoint-2",
                                             f"{root}/checkpoints/checkpoint-4"]  # save_total_limit 2
    assert {f["path"] for f in manifest["model"]["files"]} >= {"model.safetensors", "tokenizer.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["model"]["files"])

    from training.generate import generate_response, load_for_generation

    cache = tmp_path / "cache"
    monkeypatch.setenv("DOLLY_CACHE_DIR", str(cache))
    model, tokenizer = load_for_generation(end.model_location)  # downloads and verifies every file
    assert generate_response(model, tokenizer, "Name a color.", max_new_tokens=4).new_tokens <= 4

    # A corrupted model is refused, even with a verified copy of it in the cache.
    client = boto3.client("s3")
    prefix = f"metaflow/data/DollyFlow/{run.id}"
    assert list(cache.glob("s3-models/*/model/model.safetensors"))
    corrupt(client, s3_bucket_name, f"{prefix}/model/model.safetensors")
    refused = subprocess.run([sys.executable, "-m", "training.generate", "--model", end.model_location, "Hi."],
                             cwd=flow_home, env=python_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {end.model_location} is corrupted: model.safetensors: sha256 does not match the manifest. "
        "Its files in S3 are not the bytes that were uploaded: upload it again, or use another checkpoint or model."
    ), refused.stderr[-3000:]

    # A new run that starts from this run's newest valid checkpoint, named by its pathspec: the
    # newest (checkpoint-4) is corrupted, so it continues from checkpoint-2, at step 3.
    corrupt(client, s3_bucket_name, f"{prefix}/checkpoints/checkpoint-4/model.safetensors")
    longer = write_config(tiny_config, tmp_path / "longer", max_steps=6, save_steps=2)
    with metaflow_runner(str(FLOW), show_output=False, env=env, cwd=str(flow_home),
                         config=[("config", longer)]).run(resume_from=f"DollyFlow/{run.id}") as running:
        assert running.status == "successful", running.stdout[-4000:]
        resumed, log = running.run, running.stdout
        consoles += [running.stdout, running.stderr]
    assert (f"skipping checkpoint-4: {root}/checkpoints/checkpoint-4 is corrupted: model.safetensors: "
            "sha256 does not match the manifest") in log, log[-4000:]
    assert f"resuming from {root}/checkpoints/checkpoint-2" in log, log[-4000:]
    trained = [int(step) for step in re.findall(r"\[trainer\] step (\d+)/6 [^\n]*\bloss=", log)]
    assert trained[0] == 3 and trained[-1] == 6, log[-4000:]  # steps 1-2 come from checkpoint-2
    resumed_metrics = resumed["end"].task.data.training_metrics
    assert resumed_metrics["global_step"] == 6 and resumed_metrics["resumed_from_step"] == 2
    # "Before" is still the base model's figure, not the checkpoint's.
    assert resumed_metrics["eval_loss_before"] == pytest.approx(end.training_metrics["eval_loss_before"], rel=1e-5)

    # No credential in any log, artifact, card or S3 object of either run.
    outputs = [("log", f"console {n}", text.encode()) for n, text in enumerate(consoles)]
    outputs += run_outputs([run, resumed], client, s3_bucket_name)
    hits, read = find_everywhere(outputs, [LEAK_SECRET, LEAK_KEY_ID, run.id])
    leaks = [f"{needle[:8]}... in {kind} {name} ({view})" for needle in (LEAK_SECRET, LEAK_KEY_ID)
             for kind, name, view in hits[needle]]
    assert not leaks, "credentials leaked:\n" + "\n".join(leaks)
    # The scan saw what it had to: the run id in every kind of output, in gzipped blobs and in
    # cards' encoded data (where a secret would hide as well).
    found = {(kind, view) for kind, _, view in hits[run.id]}
    assert {"log", "artifact", "card", "s3"} <= {kind for kind, _ in found}, (found, read)
    assert ("s3", "gunzip") in found and ("card", "card-data") in found, (found, read)
    assert read["artifact", "raw"] > 20 and read["card", "raw"] >= 4 and read["s3", "raw"] > 50, read


def _kill_trainer_after(bucket: str, checkpoint: str, marker: str, stop: threading.Event, killed: list) -> None:
    """Wait for `checkpoint`'s manifest in S3, then SIGKILL the trainer processes. No deadline of
    its own: however slow training is, it waits until `stop`, set when the (bounded) run ends."""
    client = boto3.client("s3")
    while not stop.is_set():
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


def first_step_after(log: str, marker: str, max_steps: int) -> int:
    """The first training step the log shows after ``marker`` (e.g. "resuming from ...")."""
    return int(re.search(rf"\[trainer\] step (\d+)/{max_steps} [^\n]*\bloss=", log[log.index(marker):]).group(1))


@pytest.fixture(scope="session")
def uninterrupted(tiny_run) -> dict:
    """The base model's figures from the uninterrupted tiny run (same model, data and decoding),
    read before a test points this process's Metaflow client at S3."""
    train = tiny_run[0]["train"].task.data
    return {"eval_loss_before": train.training_metrics["eval_loss_before"],
            "ended_share_base": train.training_metrics["ended_share_base"],
            "base_answers": train.evaluation[0]["answers"]}


def assert_whole_run(run, uninterrupted: dict, max_steps: int, steps_per_epoch: int) -> None:
    """A killed-and-resumed run reports what an uninterrupted run reports: the base model's
    figures (``uninterrupted``'s), one evaluation point per epoch end, and curves from step 0
    (logging_steps 1)."""
    from metaflow.cards import get_cards

    train = run["train"].task.data
    metrics, evaluation, history = train.training_metrics, train.evaluation, train.training_history
    assert metrics["eval_loss_before"] == pytest.approx(uninterrupted["eval_loss_before"], rel=1e-5)
    assert evaluation[0]["label"] == "base" and evaluation[0]["answers"] == uninterrupted["base_answers"]
    assert metrics["ended_share_base"] == uninterrupted["ended_share_base"]
    ends = list(range(steps_per_epoch, max_steps + 1, steps_per_epoch))
    assert [p["global_step"] for p in evaluation] == [0, *ends, *([max_steps] if max_steps % steps_per_epoch else [])]
    assert [s for s, _ in history["eval_loss"]] == [p["global_step"] for p in evaluation]
    assert [s for s, _ in metrics["eval_loss_history"]] == [p["global_step"] for p in evaluation]
    assert [s for s, _ in history["loss"]] == list(range(1, max_steps + 1))
    # Each attempt has its card; the killed one's says it failed, the finished one's is whole.
    cards = [card_components(card.get()) for card in get_cards(run["train"].task, id="training")]
    (finished,) = [c for c in cards if "**Done**" in "".join(m["source"] for m in of_type(c, "markdown"))]
    (table,) = [t for t in of_type(finished, "table") if t["columns"][0] == "Model"]
    assert [row[0] for row in table["data"]] == [p["label"] for p in evaluation]


# The kill-and-resume runs: 48 rows in batches of 4 make 12 steps an epoch; a checkpoint at every
# epoch end is saved before that epoch's evaluation, which the resumed attempt must then run.
KILLED_RUN = {"max_steps": 60, "save_steps": 12, "save_total_limit": 2, "logging_steps": 1}
STEPS_PER_EPOCH = 12


def test_killed_lora_trainer_is_retried_from_the_last_valid_checkpoint(tiny_config, uninterrupted, flow_home,
                                                                      s3_flow_env, s3_bucket_name, tmp_path):
    """A LoRA run (`resume` below covers full fine-tuning) killed after checkpoint-24 continues
    from it on @retry; its checkpoints are adapters; `generate --run` answers with the model."""
    config = write_config(tiny_config, tmp_path, **KILLED_RUN, retries=1, peft="lora", learning_rate=5e-3)
    segments_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    with trainer_killed_after(s3_bucket_name, "checkpoint-24", str(flow_home)) as killed, metaflow_runner(
        str(FLOW), show_output=False, env=s3_flow_env, cwd=str(flow_home), config=[("config", config)]
    ).run() as running:
        log = running.stdout
        status = running.status
        run = running.run
    assert killed, "the trainer finished before it could be killed"
    assert status == "successful", log[-4000:]
    resumed = re.search(r"resuming from s3://\S+/checkpoints/checkpoint-(\d+)", log)
    assert resumed and int(resumed.group(1)) >= 24, log[-4000:]
    # Continued, not restarted: the retry's first step is the one after the checkpoint.
    assert first_step_after(log, resumed.group(0), 60) == int(resumed.group(1)) + 1, log[-4000:]
    train = run["train"].task
    assert train.current_attempt == 1
    assert run["end"].task.data.training_metrics["global_step"] == 60
    # LoRA starts as the base model itself (its B matrices are zero): the same base figures.
    assert_whole_run(run, uninterrupted, max_steps=60, steps_per_epoch=STEPS_PER_EPOCH)
    # The killed rank could not remove its 66 MB /dev/shm segment; the train task did.
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= segments_before

    metrics = run["end"].task.data.training_metrics
    assert metrics["peft"] == "lora" and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    # Adapter checkpoints: the trainable weights (fp32) and their optimizer state, no base weight:
    # no model file, and no frozen embedding under a second (tied) name in DeepSpeed's model
    # states (the tiny model's is 403 x 32 x 4 = 52 KB; the states' own bookkeeping is ~24 KB).
    manifest = train.data.checkpoint_manifest
    trained_bytes = 4 * metrics["trainable_parameters"]
    for name, checkpoint in manifest["checkpoints"].items():
        sizes = {f["path"]: f["size"] for f in checkpoint["files"]}
        assert "adapter_model.safetensors" in sizes and "model.safetensors" not in sizes, (name, sorted(sizes))
        assert sizes["adapter_model.safetensors"] < trained_bytes + 16_000, (name, sizes)
        (states,) = [size for path, size in sizes.items() if path.endswith("mp_rank_00_model_states.pt")]
        assert states < trained_bytes + 40_000, (name, sizes)
    # The model in S3: merged (what serving stacks load) and the adapter beside it.
    assert {"model.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= {
        f["path"] for f in manifest["model"]["files"]}
    answer = run_bounded([sys.executable, "-m", "training.generate", "--run", f"DollyFlow/{run.id}",
                          "--max-new-tokens", "6", "Name a color."],
                         cwd=flow_home, env={**s3_flow_env, "DOLLY_CACHE_DIR": str(tmp_path / "cache")}, timeout=300)
    assert answer.returncode == 0, answer.stdout[-2000:] + answer.stderr[-3000:]
    assert f"[model of run DollyFlow/{run.id}: {run['end'].task.data.model_location}]" in answer.stdout


def test_sigterm_to_the_train_task_checkpoints_to_s3(tiny_config, flow_home, s3_flow_env, s3_bucket_name, tmp_path):
    """A preempted pod: SIGTERM reaches the train task, which has the trainer save and upload."""
    import os
    import signal
    import sys

    config = write_config(tiny_config, tmp_path, max_steps=100000, save_steps=100000, eval_steps=100000,
                          logging_steps=1)
    log = tmp_path / "flow.log"
    with started([sys.executable, str(FLOW), "--config", "config", config, "run"], log, cwd=flow_home,
                 env=s3_flow_env) as flow:
        found = wait_for_output(log, r"\[(\d+)/train/\d+ \(pid (\d+)\)\] \[trainer\] step 5/", flow, timeout=300)
        run_id, task_pid = found.group(1), int(found.group(2))
        os.kill(task_pid, signal.SIGTERM)
        sent_at = time.time()
        # Bounded: if SIGTERM were lost the trainer would run on toward step 100000. At most 25 s
        # of grace, then the failed task's card and the flow's end.
        code = wait_for_exit(flow, log, timeout=300)
    rest = log.read_text()
    assert code != 0
    assert "Stopped by SIGTERM" in rest, rest[-3000:]
    # "uploaded to": the trainer saw the upload finish within its grace period (25 s), timed
    # from the SIGTERM it received; "upload not finished within the grace period" otherwise.
    saved = re.search(r"Preempted \(SIGTERM\) at step (\d+): checkpoint-\d+ uploaded to", rest)
    assert saved, rest[-3000:]
    prefix = f"metaflow/data/DollyFlow/{run_id}/checkpoints/"
    listing = boto3.client("s3").list_objects_v2(Bucket=s3_bucket_name, Prefix=prefix)
    manifests = [o for o in listing.get("Contents", []) if o["Key"].endswith("manifest.json")]
    assert [o["Key"] for o in manifests] == [f"{prefix}checkpoint-{saved.group(1)}/manifest.json"]
    # Written because of the SIGTERM, not before it (S3 keeps whole seconds).
    assert manifests[0]["LastModified"].timestamp() >= int(sent_at) - 1


def test_resume_continues_a_failed_run_from_its_last_valid_checkpoint(tiny_config, uninterrupted, flow_home, s3_flow_env,
                                                                     s3_bucket_name, tmp_path):
    """`python flows/dolly_flow.py resume`: the new attempt continues, it does not start over.
    (A new run from another run's checkpoint, `--resume-from`: the full-run test above.)"""
    config = write_config(tiny_config, tmp_path, **KILLED_RUN, retries=0)
    with trainer_killed_after(s3_bucket_name, "checkpoint-24", str(flow_home)) as killed, metaflow_runner(
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
    assert found and int(found.group(1)) >= 24, log[-3000:]
    assert first_step_after(log, found.group(0), 60) == int(found.group(1)) + 1, log[-3000:]
    assert run["end"].task.data.training_metrics["global_step"] == 60
    assert_whole_run(run, uninterrupted, max_steps=60, steps_per_epoch=STEPS_PER_EPOCH)

