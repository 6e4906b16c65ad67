"""DollyFlow with Metaflow's S3 datastore on moto's S3 server: checkpoints, model, kill and retry.

One chain of runs (below) covers publishing, @retry, `resume`, `--resume-from`, corrupted
checkpoints and models, and the credential scan; a preempted (SIGTERMed) run is a run of its own.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from training.checkpoint_store import S3CheckpointStore

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


# The killed-and-resumed chain, one LoRA configuration for all its runs: 48 rows in batches of 4
# make 12 steps an epoch; a checkpoint at every epoch end is saved before that epoch's
# evaluation, which a resumed attempt must then run.
#   1. `run` (@retry once): the trainer is SIGKILLed after checkpoint-24; the retry continues
#      from it and is SIGKILLed after checkpoint-36: the run fails.
#   2. `resume` of that run: continues from checkpoint-36 to step 60 and publishes the model.
#   3. a new run `--resume-from` the resumed run, whose newest checkpoint is then corrupted:
#      it continues from the one before.
# Every run holds credentials no real account has: none may appear in any output of the three.
KILLED_RUN = {"max_steps": 60, "save_steps": 12, "save_total_limit": 2, "logging_steps": 1,
              "peft": "lora", "learning_rate": 5e-3}
STEPS_PER_EPOCH = 12
KILLED_AFTER = ("checkpoint-24", "checkpoint-36")  # the first attempt's kill, then the retry's


def _kill_trainers_after(bucket: str, checkpoints: list[str], marker: str, stop: threading.Event,
                         killed: list) -> None:
    """For each of `checkpoints` in turn: wait for its manifest in S3, then SIGKILL the trainer
    processes, recording (pid, MASTER_PORT) of each. No deadline of its own: however slow
    training is, it waits until `stop`, set when the (bounded) run ends."""
    client = boto3.client("s3")
    pending = list(checkpoints)
    while pending and not stop.is_set():
        listing = client.list_objects_v2(Bucket=bucket, Prefix="metaflow/data/DollyFlow/")
        if any(obj["Key"].endswith(f"/{pending[0]}/manifest.json") for obj in listing.get("Contents", [])):
            victims = []
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if "training.trainer" in cmdline and marker in cmdline and "deepspeed" not in cmdline.split()[0]:
                    with contextlib.suppress(psutil.Error):
                        port = proc.environ().get("MASTER_PORT")  # names its /dev/shm segments
                        proc.kill()
                        victims.append((proc.info["pid"], port))
            if victims:
                killed.append(victims)
                pending.pop(0)
        time.sleep(0.1)


@contextlib.contextmanager
def trainers_killed_after(bucket: str, checkpoints: list[str], marker: str):
    """While the body runs, SIGKILL the trainer once each of `checkpoints` is complete in S3, in
    turn; yields the list of kills, each a list of (pid, port) (short if training finished first)."""
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_trainers_after, args=(bucket, checkpoints, marker, stop, killed))
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
    # The finished attempt's card is whole.
    (finished,) = [c for c in training_cards(run) if "**Done**" in markdown(c)]
    (table,) = [t for t in of_type(finished, "table") if t["columns"][0] == "Model"]
    assert [row[0] for row in table["data"]] == [p["label"] for p in evaluation]


def training_cards(run) -> list[list]:
    """The components of the `training` card of each attempt of the run's train task."""
    from metaflow.cards import get_cards

    return [card_components(card.get()) for card in get_cards(run["train"].task, id="training")]


def markdown(components: list) -> str:
    return "".join(m["source"] for m in of_type(components, "markdown"))


@dataclass
class FlowRun:
    run: Any
    status: str
    stdout: str
    stderr: str


def finished(running) -> FlowRun:
    return FlowRun(running.run, running.status, running.stdout, running.stderr)


@pytest.fixture(scope="module")
def chain(s3_server, flow_home, uninterrupted) -> Iterator[tuple[dict[str, str], str]]:
    """(the flows' environment, the bucket) of the chain: Metaflow's datastore and data root in a
    bucket of its own, and the leak-check credentials, which this process's boto3 and Metaflow
    client use too while the module runs (read ``uninterrupted`` before: it is on local disk)."""
    bucket = "killed-and-resumed"
    env = {
        **flow_env(flow_home),
        **s3_server,
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{bucket}/metaflow",
        "METAFLOW_DATATOOLS_S3ROOT": f"s3://{bucket}/metaflow/data",
        "METAFLOW_S3_ENDPOINT_URL": s3_server["AWS_ENDPOINT_URL_S3"],
        "AWS_ACCESS_KEY_ID": LEAK_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": LEAK_SECRET,
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield env, bucket


@pytest.fixture(scope="module")
def killed_run(tiny_config, flow_home, chain, tmp_path_factory) -> tuple[FlowRun, list]:
    """Step 1 of the chain: (the failed run, its kills)."""
    env, bucket = chain
    config = write_config(tiny_config, tmp_path_factory.mktemp("killed"), **KILLED_RUN, retries=1)
    with trainers_killed_after(bucket, KILLED_AFTER, str(flow_home)) as killed, metaflow_runner(
        str(FLOW), show_output=False, env=env, cwd=str(flow_home), config=[("config", config)]
    ).run() as running:
        return finished(running), killed


@pytest.fixture(scope="module")
def resumed_run(killed_run, flow_home, chain) -> FlowRun:
    """Step 2: `resume` of the failed run (it takes that run's configuration: Metaflow refuses
    --config there)."""
    env, _ = chain
    with metaflow_runner(str(FLOW), show_output=False, env=env,
                         cwd=str(flow_home)).resume(origin_run_id=killed_run[0].run.id) as running:
        assert running.status == "successful", running.stdout[-4000:] + running.stderr[-4000:]
        return finished(running)


def run_root(bucket: str, run_id: str) -> str:
    return f"s3://{bucket}/metaflow/data/DollyFlow/{run_id}"


def test_killed_lora_trainer_is_retried_from_the_last_valid_checkpoint(killed_run, chain):
    """A LoRA run killed after checkpoint-24 continues from it on @retry, not from the start."""
    failed, killed = killed_run
    log = failed.stdout
    assert len(killed) == 2, f"the trainer finished before it could be killed twice: {killed}"
    assert failed.status == "failed", log[-4000:]  # retried once, killed again
    assert f"Checkpoints and model: {run_root(chain[1], failed.run.id)}" in log
    resumed = re.search(r"resuming from s3://\S+/checkpoints/checkpoint-(\d+)", log)
    assert resumed and int(resumed.group(1)) >= 24, log[-4000:]
    # Continued, not restarted: the retry's first step is the one after the checkpoint.
    assert first_step_after(log, resumed.group(0), 60) == int(resumed.group(1)) + 1, log[-4000:]
    assert failed.run["train"].task.current_attempt == 1
    # Each attempt has its card; neither finished.
    cards = training_cards(failed.run)
    assert len(cards) == 2 and not [c for c in cards if "**Done**" in markdown(c)]
    # The killed ranks could not remove their 66 MB /dev/shm segments; the train task did. Only
    # the segments of this run's rendezvous ports: other tests may be training meanwhile.
    ports = {port for kill in killed for _, port in kill if port}
    assert ports, killed
    left = [s.name for port in ports for s in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert left == []


def test_resume_continues_a_failed_run_from_its_last_valid_checkpoint(killed_run, resumed_run, uninterrupted,
                                                                     flow_home, chain, tmp_path):
    """`python flows/dolly_flow.py resume`: the new attempt continues, it does not start over;
    its checkpoints are adapters; `generate --run` answers with the model."""
    env, _ = chain
    origin, run, log = killed_run[0].run.id, resumed_run.run, resumed_run.stdout
    found = re.search(r"resuming from s3://\S+/DollyFlow/" + origin + r"/checkpoints/checkpoint-(\d+)", log)
    assert found and int(found.group(1)) >= 36, log[-3000:]
    assert first_step_after(log, found.group(0), 60) == int(found.group(1)) + 1, log[-3000:]
    assert run["end"].task.data.training_metrics["global_step"] == 60
    # LoRA starts as the base model itself (its B matrices are zero): the same base figures.
    assert_whole_run(run, uninterrupted, max_steps=60, steps_per_epoch=STEPS_PER_EPOCH)

    metrics = run["end"].task.data.training_metrics
    assert metrics["peft"] == "lora" and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    # Adapter checkpoints: the trainable weights (fp32) and their optimizer state, no base weight:
    # no model file, and no frozen embedding under a second (tied) name in DeepSpeed's model
    # states (the tiny model's is 403 x 32 x 4 = 52 KB; the states' own bookkeeping is ~24 KB).
    manifest = run["train"].task.data.checkpoint_manifest
    trained_bytes = 4 * metrics["trainable_parameters"]
    assert manifest["checkpoints"]
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
                         cwd=flow_home, env={**env, "DOLLY_CACHE_DIR": str(tmp_path / "cache")}, timeout=300)
    assert answer.returncode == 0, answer.stdout[-2000:] + answer.stderr[-3000:]
    assert f"[model of run DollyFlow/{run.id}: {run['end'].task.data.model_location}]" in answer.stdout


def test_the_resumed_run_publishes_checkpoints_and_model_to_s3(killed_run, resumed_run, chain, flow_home,
                                                              tmp_path, monkeypatch):
    """`resume` keeps the run's prefix: the model and the checkpoints land where the failed run
    put its own. A corrupted model is refused, even with a verified copy of it in the cache."""
    _, bucket = chain
    origin, run = killed_run[0].run.id, resumed_run.run
    root = run_root(bucket, origin)
    end = run["end"].task.data
    assert end.model_location == f"{root}/model"
    # The checkpoints this run uploaded (those after the one it resumed from) that save_total_limit
    # 2 kept: the newest two of the prefix, whichever attempt uploaded them.
    resumed_from = end.training_metrics["resumed_from_step"]
    uploaded = [f"{root}/checkpoints/checkpoint-{step}" for step in range(resumed_from + 12, 61, 12) if step >= 48]
    manifest = run["train"].task.data.checkpoint_manifest
    assert list(manifest["checkpoints"]) == uploaded
    assert S3CheckpointStore(f"{root}/checkpoints").names() == ["checkpoint-48", "checkpoint-60"]
    assert {f["path"] for f in manifest["model"]["files"]} >= {"model.safetensors", "tokenizer.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["model"]["files"])

    from training.generate import generate_response, load_for_generation

    cache = tmp_path / "cache"
    monkeypatch.setenv("DOLLY_CACHE_DIR", str(cache))
    model, tokenizer = load_for_generation(end.model_location)  # downloads and verifies every file
    assert generate_response(model, tokenizer, "Name a color.", max_new_tokens=4).new_tokens <= 4

    assert list(cache.glob("s3-models/*/model/model.safetensors"))
    corrupt(boto3.client("s3"), bucket, f"metaflow/data/DollyFlow/{origin}/model/model.safetensors")
    refused = subprocess.run([sys.executable, "-m", "training.generate", "--model", end.model_location, "Hi."],
                             cwd=flow_home, env=python_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {end.model_location} is corrupted: model.safetensors: sha256 does not match the manifest. "
        "Its files in S3 are not the bytes that were uploaded: upload it again, or use another checkpoint or model."
    ), refused.stderr[-3000:]


@pytest.fixture(scope="module")
def continued_run(resumed_run, killed_run, tiny_config, flow_home, chain, tmp_path_factory) -> FlowRun:
    """Step 3: a new run from the resumed run's newest valid checkpoint, named by its pathspec;
    the newest (checkpoint-60) is corrupted first."""
    env, bucket = chain
    corrupt(boto3.client("s3"), bucket,
            f"metaflow/data/DollyFlow/{killed_run[0].run.id}/checkpoints/checkpoint-60/adapter_model.safetensors")
    config = write_config(tiny_config, tmp_path_factory.mktemp("continued"), **KILLED_RUN)
    with metaflow_runner(str(FLOW), show_output=False, env=env, cwd=str(flow_home),
                         config=[("config", config)]).run(resume_from=f"DollyFlow/{resumed_run.run.id}") as running:
        assert running.status == "successful", running.stdout[-4000:] + running.stderr[-4000:]
        return finished(running)


def test_a_new_run_continues_from_another_runs_newest_valid_checkpoint(killed_run, resumed_run, continued_run,
                                                                       chain):
    """`--resume-from DollyFlow/<run id>`: the newest checkpoint is corrupted, so it continues
    from checkpoint-48, at step 49."""
    root = run_root(chain[1], killed_run[0].run.id)
    log = continued_run.stdout
    assert (f"skipping checkpoint-60: {root}/checkpoints/checkpoint-60 is corrupted: adapter_model.safetensors: "
            "sha256 does not match the manifest") in log, log[-4000:]
    assert f"resuming from {root}/checkpoints/checkpoint-48" in log, log[-4000:]
    trained = [int(step) for step in re.findall(r"\[trainer\] step (\d+)/60 [^\n]*\bloss=", log)]
    assert trained[0] == 49 and trained[-1] == 60, log[-4000:]  # steps 1-48 come from checkpoint-48
    metrics = continued_run.run["end"].task.data.training_metrics
    assert metrics["global_step"] == 60 and metrics["resumed_from_step"] == 48
    # "Before" is still the base model's figure, not the checkpoint's.
    before = resumed_run.run["end"].task.data.training_metrics["eval_loss_before"]
    assert metrics["eval_loss_before"] == pytest.approx(before, rel=1e-5)


def test_no_credential_in_any_log_artifact_card_or_object_of_the_chain(killed_run, resumed_run, continued_run, chain):
    _, bucket = chain
    runs = [killed_run[0], resumed_run, continued_run]
    outputs = [("log", f"console {n}", text.encode()) for n, flow_run in enumerate(runs)
               for text in (flow_run.stdout, flow_run.stderr)]
    outputs += run_outputs([flow_run.run for flow_run in runs], boto3.client("s3"), bucket)
    run_id = killed_run[0].run.id
    hits, read = find_everywhere(outputs, [LEAK_SECRET, LEAK_KEY_ID, run_id])
    leaks = [f"{needle[:8]}... in {kind} {name} ({view})" for needle in (LEAK_SECRET, LEAK_KEY_ID)
             for kind, name, view in hits[needle]]
    assert not leaks, "credentials leaked:\n" + "\n".join(leaks)
    # The scan saw what it had to: the run id in every kind of output, in gzipped blobs and in
    # cards' encoded data (where a secret would hide as well).
    found = {(kind, view) for kind, _, view in hits[run_id]}
    assert {"log", "artifact", "card", "s3"} <= {kind for kind, _ in found}, (found, read)
    assert ("s3", "gunzip") in found and ("card", "card-data") in found, (found, read)
    assert read["artifact", "raw"] > 20 and read["card", "raw"] >= 4 and read["s3", "raw"] > 50, read


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
