"""Checkpoints in S3 against moto's standalone server: manifests, verification, retention."""

from __future__ import annotations

import json

import boto3
import pytest

from training.checkpoint_store import (
    MANIFEST,
    CheckpointStoreError,
    S3CheckpointStore,
    build_manifest,
    staged_copy,
    verify_directory,
)


def shard_bytes(tag: bytes) -> bytes:
    """A torch.save archive, as DeepSpeed writes its shards: a download scans every .pt it gets
    (training.safe_loading) and refuses anything else."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"shard": tag}, buffer)
    return buffer.getvalue()


def make_checkpoint(root, name, payload: bytes = b"weights"):
    directory = root / name
    (directory / "global_step1").mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(payload * 1000)
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": int(name.split("-")[1])}))
    (directory / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(shard_bytes(b"shard" * 100))
    return directory


def test_manifest_lists_every_file_and_verification_catches_changes(tmp_path):
    directory = make_checkpoint(tmp_path, "checkpoint-5")
    manifest = build_manifest(directory)
    assert [f["path"] for f in manifest["files"]] == [
        "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt", "model.safetensors", "trainer_state.json"]
    assert manifest["total_bytes"] == sum(f["size"] for f in manifest["files"])
    assert verify_directory(directory, manifest) == []
    (directory / "model.safetensors").write_bytes(b"x" * 7000)  # same size, other bytes
    (directory / "trainer_state.json").unlink()
    problems = verify_directory(directory, manifest)
    assert "model.safetensors: sha256 does not match the manifest" in problems
    assert "trainer_state.json: missing" in problems


def test_upload_then_download_verifies_and_lists_in_step_order(tmp_path, s3_bucket_name):
    store = S3CheckpointStore(f"s3://{s3_bucket_name}/run/checkpoints")
    for step in (10, 2, 30):
        store.upload(make_checkpoint(tmp_path / "local", f"checkpoint-{step}"))
    assert store.names() == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    local = store.download_latest_valid(tmp_path / "restore")
    assert local.name == "checkpoint-30"
    assert json.loads((local / "trainer_state.json").read_text())["global_step"] == 30
    assert ((local / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes()
            == shard_bytes(b"shard" * 100))


def test_missing_manifest_and_corrupted_file_are_skipped(tmp_path, s3_bucket_name, capsys):
    uri = f"s3://{s3_bucket_name}/ckpts"
    store = S3CheckpointStore(uri)
    for step in (1, 2, 3):
        store.upload(make_checkpoint(tmp_path / "local", f"checkpoint-{step}"))
    client = boto3.client("s3")
    client.delete_object(Bucket=s3_bucket_name, Key=f"ckpts/checkpoint-3/{MANIFEST}")  # cut-off upload
    client.put_object(Bucket=s3_bucket_name, Key="ckpts/checkpoint-2/model.safetensors", Body=b"y" * 7000)
    assert store.names() == ["checkpoint-1", "checkpoint-2"]
    local = store.download_latest_valid(tmp_path / "restore")
    assert local.name == "checkpoint-1"
    warnings = capsys.readouterr().err
    assert "checkpoint-3 has no manifest.json" in warnings
    assert "skipping checkpoint-2" in warnings and "sha256 does not match" in warnings
    assert not (tmp_path / "restore" / "checkpoint-2").exists()  # rejected bytes are not left behind


def test_resume_from_a_checkpoints_folder_skips_a_corrupted_newest(tmp_path, s3_bucket_name, capsys):
    """`--resume_from s3://.../checkpoints` (what `--resume-from DollyFlow/<id>` passes): the newest
    checkpoint that verifies. One named checkpoint is that one or an error, never another."""
    import re

    from training.s3_uploads import resolve_resume

    uri = f"s3://{s3_bucket_name}/run/checkpoints"
    store = S3CheckpointStore(uri)
    for step in (2, 4):
        store.upload(make_checkpoint(tmp_path / "local", f"checkpoint-{step}"))
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket_name, Key="run/checkpoints/checkpoint-4/model.safetensors", Body=b"y" * 7000)
    assert resolve_resume(uri, "", tmp_path / "a").name == "checkpoint-2"
    assert f"resuming from {uri}/checkpoint-2" in capsys.readouterr().out
    with pytest.raises(CheckpointStoreError, match="checkpoint-4 is corrupted: model.safetensors: sha256"):
        resolve_resume(f"{uri}/checkpoint-4", "", tmp_path / "b")
    client.put_object(Bucket=s3_bucket_name, Key="run/checkpoints/checkpoint-2/model.safetensors", Body=b"y" * 7000)
    with pytest.raises(CheckpointStoreError, match=re.escape(f"no checkpoint in {uri} downloads and verifies")):
        resolve_resume(uri, "", tmp_path / "c")


def test_prune_keeps_the_newest_and_deletes_manifest_first(tmp_path, s3_bucket_name):
    store = S3CheckpointStore(f"s3://{s3_bucket_name}/p")
    for step in (1, 2, 3, 4):
        store.upload(make_checkpoint(tmp_path / "local", f"checkpoint-{step}"))
    assert store.prune(keep=2) == ["checkpoint-1", "checkpoint-2"]
    assert store.names() == ["checkpoint-3", "checkpoint-4"]
    left = boto3.client("s3").list_objects_v2(Bucket=s3_bucket_name, Prefix="p/checkpoint-1/")
    assert left.get("KeyCount", 0) == 0


def node_part(root, name, rank: int):
    """What node k of a multi-node run has: its own trainer state and its rank's ZeRO shard."""
    directory = root / name
    (directory / "global_step1").mkdir(parents=True)
    (directory / "trainer_state.json").write_text(json.dumps({"node": rank}))
    (directory / "global_step1" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(
        shard_bytes(b"s%d" % rank * 50))
    (directory / f"rng_state_{rank}.pth").write_bytes(shard_bytes(b"rng"))
    (directory / "model.safetensors").write_bytes(b"same weights, written again by node %d" % rank)
    return directory


def test_a_multi_node_checkpoint_is_complete_with_every_nodes_part(tmp_path, s3_bucket_name, capsys):
    uri = f"s3://{s3_bucket_name}/mn/checkpoints"
    node0, node1 = S3CheckpointStore(uri, nodes=2), S3CheckpointStore(uri, node=1, nodes=2)
    node0.upload(make_checkpoint(tmp_path / "n0", "checkpoint-2"))
    node1.upload(node_part(tmp_path / "n1", "checkpoint-2", 1))
    node0.upload(make_checkpoint(tmp_path / "n0", "checkpoint-4"))  # node 1's part never arrived
    assert node0.names() == node1.names() == ["checkpoint-2"]
    assert "checkpoint-4 misses the manifest.json of node(s) 1 of 2" in capsys.readouterr().err
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket_name, Prefix="mn/")["Contents"]]
    assert "mn/checkpoints/checkpoint-2/node-1/global_step1/zero_pp_rank_1_mp_rank_00_optim_states.pt" in keys

    # Node 1 gets node 0's files with its own over them; node 0 gets node 0's alone.
    mine = node1.download_latest_valid(tmp_path / "restore1")
    assert json.loads((mine / "trainer_state.json").read_text()) == {"node": 1}
    assert (mine / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").read_bytes() == shard_bytes(b"s1" * 50)
    assert (mine / "rng_state_1.pth").is_file()
    # Node 1 did not upload its copy of the weights: node 0's serves every node.
    assert (mine / "model.safetensors").read_bytes() == b"weights" * 1000
    assert not [k for k in keys if k.startswith("mn/checkpoints/checkpoint-2/node-1/model")]
    theirs = node0.download_latest_valid(tmp_path / "restore0")
    assert json.loads((theirs / "trainer_state.json").read_text())["global_step"] == 2
    assert not (theirs / "rng_state_1.pth").exists()

    # Node 1's part corrupted: node 1 rejects the checkpoint, naming the file.
    boto3.client("s3").put_object(Bucket=s3_bucket_name, Body=b"x",
                                  Key="mn/checkpoints/checkpoint-2/node-1/rng_state_1.pth")
    with pytest.raises(CheckpointStoreError,
                       match=f"rng_state_1.pth: 1 bytes, manifest says {len(shard_bytes(b'rng'))}"):
        node1.download("checkpoint-2", tmp_path / "restore1")
    # Shards belong to ranks: a different node count cannot use them.
    with pytest.raises(CheckpointStoreError, match="written by 2 node.s. and this run has 1"):
        S3CheckpointStore(uri).download("checkpoint-2", tmp_path / "restore")
    # Pruning removes every node's part.
    node0.upload(make_checkpoint(tmp_path / "n0b", "checkpoint-6"))
    node1.upload(node_part(tmp_path / "n1b", "checkpoint-6", 1))
    node0.upload(make_checkpoint(tmp_path / "n0c", "checkpoint-8"))  # node 1 still uploading its part
    # The incomplete checkpoint-4 (older than what is kept) goes too; checkpoint-8 may yet complete.
    assert node0.prune(keep=1) == ["checkpoint-2", "checkpoint-4"]
    for gone in ("checkpoint-2", "checkpoint-4"):
        left = boto3.client("s3").list_objects_v2(Bucket=s3_bucket_name, Prefix=f"mn/checkpoints/{gone}/")
        assert left.get("KeyCount", 0) == 0
    assert node0.names() == ["checkpoint-6"]
    node1.upload(node_part(tmp_path / "n1c", "checkpoint-8", 1))
    assert node0.names() == ["checkpoint-6", "checkpoint-8"]


def test_unreachable_s3_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = S3CheckpointStore("s3://nowhere/x")
    with pytest.raises(CheckpointStoreError, match="S3 list failed for s3://nowhere/x") as err:
        store.names()
    assert "Check the URL, the endpoint (AWS_ENDPOINT_URL_S3)" in str(err.value)
    assert "testing" not in str(err.value)  # no credentials in messages


def test_staged_copy_survives_deletion_of_the_original(tmp_path):
    original = make_checkpoint(tmp_path, "checkpoint-9")
    staged = staged_copy(original, tmp_path / "staging")
    manifest = build_manifest(original)
    import shutil

    shutil.rmtree(original)  # what the Trainer's rotation does
    assert verify_directory(staged, manifest) == []


def test_bad_uri_is_refused():
    with pytest.raises(CheckpointStoreError, match="not an s3://bucket/prefix URL"):
        S3CheckpointStore("/local/path")
