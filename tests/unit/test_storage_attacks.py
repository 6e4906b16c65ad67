"""What a writer of the checkpoint bucket can do to the machine that reads it back (issue 22):
traversal by a manifest's paths or by a prefix's name, malformed manifests, symlinks in the
download folder, a run prefix taken for a checkpoint, pruning beyond checkpoints. Against moto's
standalone server; each attack was shown on the code before these guards."""

from __future__ import annotations

import hashlib
import json

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from tests.unit.test_checkpoint_store import make_checkpoint
from training.checkpoint_store import (
    MANIFEST,
    CheckpointStoreError,
    S3CheckpointStore,
    verify_directory,
)

PAYLOAD = b"written by whoever can write the bucket"


def two_checkpoints(tmp_path, bucket: str, prefix: str = "run/checkpoints") -> tuple[S3CheckpointStore, str]:
    """checkpoint-1 and checkpoint-2, both valid; the tests then spoil checkpoint-2."""
    uri = f"s3://{bucket}/{prefix}"
    store = S3CheckpointStore(uri)
    for step in (1, 2):
        store.upload(make_checkpoint(tmp_path / "local", f"checkpoint-{step}"))
    return store, uri


def read_manifest(bucket: str, key: str) -> dict:
    return json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def put(bucket: str, key: str, body: bytes | dict | list) -> None:
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body)


class CountingClient:
    """A real boto3 client that counts get_object calls and the bytes read from their bodies,
    and can refuse some keys."""

    def __init__(self, denied: str = ""):
        self.client = boto3.client("s3")
        self.denied = denied
        self.gets: list[str] = []
        self.bytes_read = 0

    def get_object(self, **kwargs):
        self.gets.append(kwargs["Key"])
        if self.denied and self.denied in kwargs["Key"]:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
        response = self.client.get_object(**kwargs)
        body = response["Body"]
        counter = self

        class CountedBody:
            def read(self, amt=None):
                data = body.read(amt)
                counter.bytes_read += len(data)
                return data

            def close(self):
                body.close()

        return {**response, "Body": CountedBody()}

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.mark.parametrize("evil", ["../../escaped", "{outside}/escaped", "a/../../../escaped"])
def test_a_manifest_path_cannot_write_outside_the_download_folder(tmp_path, s3_bucket_name, capsys, evil):
    """A manifest entry `../../x` or an absolute path was joined to the download folder as it
    was: the file landed outside it, verified, and the checkpoint was used."""
    store, uri = two_checkpoints(tmp_path, s3_bucket_name)
    (tmp_path / "outside").mkdir()
    evil = evil.format(outside=tmp_path / "outside")
    key = f"run/checkpoints/checkpoint-2/{MANIFEST}"
    manifest = read_manifest(s3_bucket_name, key)
    manifest["files"].append({"path": evil, "size": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest()})
    put(s3_bucket_name, key, manifest)
    put(s3_bucket_name, f"run/checkpoints/checkpoint-2/{evil}", PAYLOAD)  # what the old join fetched

    target = tmp_path / "out" / "resume"
    assert store.download_latest_valid(target).name == "checkpoint-1"
    assert not (tmp_path / "out" / "escaped").exists()
    assert not (tmp_path / "outside" / "escaped").exists()
    assert not list(tmp_path.rglob("escaped"))
    assert f"path {evil!r}" in capsys.readouterr().err


@pytest.mark.parametrize("path, why", [
    ("..\\..\\escaped", "backslash"),
    ("global_step1/./x", "'.'"),
    ("global_step1//x", "empty"),
    ("x\n", "control character"),
    ("", "not a non-empty string"),
    (7, "not a non-empty string"),
])
def test_a_manifest_path_that_is_not_plain_refuses_the_checkpoint(tmp_path, s3_bucket_name, path, why):
    store, _ = two_checkpoints(tmp_path, s3_bucket_name)
    key = f"run/checkpoints/checkpoint-2/{MANIFEST}"
    manifest = read_manifest(s3_bucket_name, key)
    manifest["files"].append({"path": path, "size": 0, "sha256": hashlib.sha256(b"").hexdigest()})
    put(s3_bucket_name, key, manifest)
    with pytest.raises(CheckpointStoreError, match=f"is not a checkpoint manifest: .*{why}"):
        store.download("checkpoint-2", tmp_path / "resume")
    assert not (tmp_path / "resume" / "checkpoint-2").exists()


def test_a_prefix_named_dot_dot_is_never_listed_downloaded_or_deleted(tmp_path, s3_bucket_name):
    """A manifest stored at `<prefix>/../manifest.json` made names() return `..`, and the
    download of `..` into `<output>/resume` emptied `<output>`: the model and resume/ went."""
    output = tmp_path / "out"
    (output / "resume").mkdir(parents=True)
    (output / "model.safetensors").write_bytes(b"the trained model")
    (output / "resume" / "CHOSEN").write_text("kept")
    uri = f"s3://{s3_bucket_name}/run/checkpoints"
    store = S3CheckpointStore(uri)
    dot_dot = f"run/checkpoints/../{MANIFEST}"
    put(s3_bucket_name, dot_dot, {"name": "..", "files": [], "nodes": 1})
    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket_name, Prefix="run/checkpoints/", Delimiter="/")
    assert [p["Prefix"] for p in listed["CommonPrefixes"]] == ["run/checkpoints/../"]  # the attack is set up

    assert store.names() == []
    assert store.download_latest_valid(output / "resume") is None
    with pytest.raises(CheckpointStoreError, match="'..' is not a name this project writes"):
        store.download("..", output / "resume")
    assert (output / "model.safetensors").read_bytes() == b"the trained model"
    assert (output / "resume" / "CHOSEN").read_text() == "kept"
    # With two checkpoints kept, `..` (step -1) was the oldest name and pruning deleted it.
    for step in (1, 2):
        store.upload(make_checkpoint(tmp_path / "local", f"checkpoint-{step}"))
    assert store.prune(keep=2) == []
    assert read_manifest(s3_bucket_name, dot_dot)["name"] == ".."


MALFORMED = {
    "invalid JSON": (b'{"files": [', "not JSON"),
    "JSON nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    "not UTF-8": (b'{"files": "\xff"}', "not JSON"),
    "a list, not an object": ([{"path": "x"}], "a JSON list, not an object"),
    "no files": ({"name": "checkpoint-2", "nodes": 1}, "'files' is missing or not a list"),
    "files not a list": ({"files": "model.safetensors", "nodes": 1}, "'files' is missing or not a list"),
    "an entry not an object": ({"files": ["model.safetensors"]}, "not an object"),
    "no sha256": ({"files": [{"path": "model.safetensors", "size": 7000}]}, "sha256 None"),
    "a sha256 that is no digest": ({"files": [{"path": "x", "size": 1, "sha256": "0" * 63 + "g"}]}, "not a sha256"),
    "a negative size": ({"files": [{"path": "x", "size": -1, "sha256": "0" * 64}]}, "size -1"),
    "a size as text": ({"files": [{"path": "x", "size": "7000", "sha256": "0" * 64}]}, "size '7000'"),
    "nodes as text": ({"files": [], "nodes": "2"}, "'nodes' is '2'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_manifest_is_skipped_for_the_previous_checkpoint(tmp_path, s3_bucket_name, capsys, case):
    """Invalid JSON, a manifest without `files` or with `files` of the wrong type crashed the
    listing or the download (JSONDecodeError, KeyError, TypeError) instead of falling back."""
    from training.s3_uploads import resolve_resume

    body, problem = MALFORMED[case]
    store, uri = two_checkpoints(tmp_path, s3_bucket_name)
    put(s3_bucket_name, f"run/checkpoints/checkpoint-2/{MANIFEST}", body)
    assert store.names() == ["checkpoint-1"]
    assert problem in capsys.readouterr().err
    assert resolve_resume(uri, "", tmp_path / "resume").name == "checkpoint-1"
    with pytest.raises(CheckpointStoreError, match="is not a checkpoint manifest") as err:
        store.download("checkpoint-2", tmp_path / "resume")
    assert "delete that checkpoint from S3" in str(err.value)


def test_an_oversized_manifest_is_not_read_whole(tmp_path, s3_bucket_name, capsys):
    """A valid manifest padded to 17 MB was read and used; it is refused after 16 MB."""
    store, _ = two_checkpoints(tmp_path, s3_bucket_name)
    key = f"run/checkpoints/checkpoint-2/{MANIFEST}"
    manifest = read_manifest(s3_bucket_name, key)
    manifest["padding"] = "x" * (17 * 1024 * 1024)
    put(s3_bucket_name, key, manifest)
    client = CountingClient()
    assert S3CheckpointStore(store.uri, client=client).names() == ["checkpoint-1"]
    assert "over 16 MB" in capsys.readouterr().err
    assert client.bytes_read <= 16 * 1024 * 1024 + 1 + 2000  # the bound, and checkpoint-1's manifest


def test_access_denied_on_a_manifest_skips_that_checkpoint(tmp_path, s3_bucket_name, capsys):
    """Only NoSuchKey was handled: an AccessDenied ClientError crashed the resume."""
    _, uri = two_checkpoints(tmp_path, s3_bucket_name)
    store = S3CheckpointStore(uri, client=CountingClient(denied="checkpoint-2/"))
    assert store.names() == ["checkpoint-1"]
    assert "AccessDenied" in capsys.readouterr().err
    assert store.download_latest_valid(tmp_path / "resume").name == "checkpoint-1"
    with pytest.raises(CheckpointStoreError, match=f"S3 read of {MANIFEST} failed for {uri}: .*AccessDenied"):
        store.download("checkpoint-2", tmp_path / "resume")


def test_a_manifest_claiming_2000_nodes_costs_one_read(tmp_path, s3_bucket_name, capsys):
    """Node 0's manifest says how many node manifests to read: 2000 meant 2000 GETs per
    checkpoint on every listing. Only this store's own node count is read."""
    _, uri = two_checkpoints(tmp_path, s3_bucket_name)
    key = f"run/checkpoints/checkpoint-2/{MANIFEST}"
    manifest = read_manifest(s3_bucket_name, key)
    put(s3_bucket_name, key, {**manifest, "nodes": 2000})
    client = CountingClient()
    assert S3CheckpointStore(uri, client=client).names() == ["checkpoint-1"]
    assert len(client.gets) == 2  # one manifest per checkpoint
    assert "written by 2000 node(s) and this run has 1" in capsys.readouterr().err
    # A 2-node run reads node 1's manifest only for a checkpoint that says 2 nodes.
    two_nodes = CountingClient()
    assert S3CheckpointStore(uri, client=two_nodes, nodes=2).names() == []
    assert len(two_nodes.gets) == 2


def test_a_run_prefix_is_not_a_checkpoint(tmp_path, s3_bucket_name):
    """`--resume_from s3://.../run5` (whose children are checkpoints/, model/, logs/) resumed
    from model/: names() listed every prefix that held a manifest."""
    from training.s3_uploads import resolve_resume

    run = f"s3://{s3_bucket_name}/run5"
    S3CheckpointStore(f"{run}/checkpoints").upload(make_checkpoint(tmp_path / "local", "checkpoint-4"))
    model = make_checkpoint(tmp_path / "final", "checkpoint-0")
    S3CheckpointStore(run).upload(model, name="model")
    S3CheckpointStore(run).upload(model / "global_step1", name="logs")
    assert S3CheckpointStore(run).names() == []
    with pytest.raises(CheckpointStoreError, match=r"Pass a run's checkpoints folder \(s3://.../<run>/checkpoints\)"):
        resolve_resume(run, "", tmp_path / "resume")
    assert not (tmp_path / "resume" / "model").exists()
    assert resolve_resume(f"{run}/checkpoints", "", tmp_path / "resume").name == "checkpoint-4"
    # The run's final model still downloads by its own name.
    assert S3CheckpointStore(run).download("model", tmp_path / "m").name == "model"


def test_prune_deletes_checkpoints_only(tmp_path, s3_bucket_name):
    """Names without a step sorted first, so pruning a prefix that also holds model/ and logs/
    deleted them before any old checkpoint."""
    uri = f"s3://{s3_bucket_name}/mixed"
    store = S3CheckpointStore(uri)
    for step in (1, 2, 3):
        store.upload(make_checkpoint(tmp_path / "local", f"checkpoint-{step}"))
    store.upload(make_checkpoint(tmp_path / "final", "checkpoint-0"), name="model")
    store.upload(make_checkpoint(tmp_path / "tb", "checkpoint-0"), name="logs")
    assert store.prune(keep=2) == ["checkpoint-1"]
    client = boto3.client("s3")
    for kept in ("model", "logs", "checkpoint-2", "checkpoint-3"):
        assert client.list_objects_v2(Bucket=s3_bucket_name, Prefix=f"mixed/{kept}/")["KeyCount"] > 0, kept
    assert client.list_objects_v2(Bucket=s3_bucket_name, Prefix="mixed/checkpoint-1/")["KeyCount"] == 0


def test_a_failed_download_leaves_the_earlier_copy(tmp_path, s3_bucket_name):
    """download() emptied `target/name` before fetching: a corrupt file or a dropped connection
    cost the copy that was there. Files now land beside it and replace it once verified."""
    store, _ = two_checkpoints(tmp_path, s3_bucket_name)
    target = tmp_path / "resume"
    earlier = store.download("checkpoint-2", target)
    manifest = json.loads((earlier / MANIFEST).read_text())

    put(s3_bucket_name, "run/checkpoints/checkpoint-2/model.safetensors", b"y" * 7000)  # corrupted since
    with pytest.raises(CheckpointStoreError, match="checkpoint-2 is corrupted: model.safetensors: sha256"):
        store.download("checkpoint-2", target)
    assert verify_directory(earlier, manifest) == []
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint-2"]  # no partial folder left

    class DropsTheSecondFile(CountingClient):
        def download_fileobj(self, *args, **kwargs):
            return self._second_fails(self.client.download_fileobj, *args, **kwargs)

        def download_file(self, *args, **kwargs):  # what the download used before
            return self._second_fails(self.client.download_file, *args, **kwargs)

        def _second_fails(self, fn, *args, **kwargs):
            self.gets.append("file")
            if self.gets.count("file") == 2:
                raise EndpointConnectionError(endpoint_url="http://s3.example")
            return fn(*args, **kwargs)

    earlier_1 = store.download("checkpoint-1", target)
    manifest_1 = json.loads((earlier_1 / MANIFEST).read_text())
    flaky = S3CheckpointStore(store.uri, client=DropsTheSecondFile())
    with pytest.raises(CheckpointStoreError, match="S3 download failed for .*Could not connect"):
        flaky.download("checkpoint-1", target)
    assert verify_directory(earlier_1, manifest_1) == []
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_a_symlink_in_the_download_folder_is_replaced_not_followed(tmp_path, s3_bucket_name):
    """`target/checkpoint-2` a symlink to another folder: rmtree refused it (errors ignored) and
    the download wrote the checkpoint through it into that folder."""
    store, _ = two_checkpoints(tmp_path, s3_bucket_name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("not yours")
    target = tmp_path / "resume"
    target.mkdir()
    (target / "checkpoint-2").symlink_to(elsewhere)
    local = store.download("checkpoint-2", target)
    assert not local.is_symlink() and (local / "model.safetensors").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious"]


def test_verification_does_not_follow_symlinks(tmp_path):
    """A symlink where the manifest expects a file is a problem, not the file it points to."""
    from training.checkpoint_store import build_manifest

    directory = make_checkpoint(tmp_path, "checkpoint-3")
    manifest = build_manifest(directory)
    real = tmp_path / "real-weights"
    (directory / "model.safetensors").rename(real)
    (directory / "model.safetensors").symlink_to(real)
    assert verify_directory(directory, manifest) == [
        "model.safetensors: not a regular file inside the folder (Too many levels of symbolic links)"]


def test_a_newest_checkpoint_with_a_pickle_payload_is_skipped_for_the_one_before(tmp_path, s3_bucket_name, capsys):
    """Its manifest verifies (the manifest sits in the same bucket): the pickle is refused all the
    same while downloading, named by its S3 URL, and `latest` resumes from checkpoint-1."""
    from tests.unit.test_safe_loading import write_payload
    from training.s3_uploads import resolve_resume

    store, uri = two_checkpoints(tmp_path, s3_bucket_name)
    crafted = make_checkpoint(tmp_path / "crafted", "checkpoint-2")
    marker = tmp_path / "payload-ran"
    write_payload(crafted / "global_step2" / "mp_rank_00_model_states.pt", marker)
    store.upload(crafted)  # a complete upload, manifest last, hashes matching
    assert resolve_resume(uri, "", tmp_path / "resume").name == "checkpoint-1"
    assert (f"skipping checkpoint-2: {uri}/checkpoint-2/global_step2/mp_rank_00_model_states.pt holds a pickle "
            "that references posix.system") in capsys.readouterr().err
    with pytest.raises(CheckpointStoreError, match="it was not written by this trainer"):
        store.download("checkpoint-2", tmp_path / "resume")
    assert not (tmp_path / "resume" / "checkpoint-2").exists()
    assert not marker.exists()


def test_partial_folders_of_killed_downloads_are_removed_and_a_live_ones_kept(tmp_path, s3_bucket_name):
    import os
    import subprocess

    store, _ = two_checkpoints(tmp_path, s3_bucket_name)
    target = tmp_path / "resume"
    dead = subprocess.Popen(["true"])  # a process id that has ended
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        for pid in (dead.pid, live.pid, os.getpid()):
            (target / f".checkpoint-2.partial-{pid}" / "global_step1").mkdir(parents=True)
        (target / ".checkpoint-1.partial-1").mkdir()  # another name's: not this download's business
        store.download("checkpoint-2", target)
        left = sorted(p.name for p in target.iterdir())
    finally:
        live.kill()
        live.wait()
    assert left == sorted([".checkpoint-1.partial-1", f".checkpoint-2.partial-{live.pid}", "checkpoint-2"])
