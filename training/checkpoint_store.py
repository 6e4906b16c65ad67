"""Checkpoints in S3: manifests written last, verified downloads, retention, resume.

A checkpoint in S3 is the prefix ``<uri>/<name>/`` holding the Trainer's files (model, optimizer,
scheduler, RNG and trainer state, DeepSpeed ZeRO shards) and ``manifest.json`` listing every
file with its size and sha256. The manifest is uploaded last, so a checkpoint without one (an
upload cut off by a lost node) is incomplete and is never used; a download whose bytes do not
match the manifest is rejected and the previous checkpoint is tried.

On several nodes each node's DeepSpeed ranks write their ZeRO shards to that node's disk, so
every node uploads its own checkpoint folder: node 0 to ``<uri>/<name>/`` (its manifest says how
many nodes there are), node k to ``<uri>/<name>/node-<k>/`` with a manifest of its own. The
checkpoint is complete when every node's manifest is there; node k resumes from node 0's files
with its own laid over them (its ranks' shards and RNG states).

    store = S3CheckpointStore("s3://bucket/runs/42/checkpoints")
    store.upload(Path("out/checkpoints/checkpoint-200"))        # files first, manifest last
    store.names()                                              # ['checkpoint-100', 'checkpoint-200']
    local = store.download_latest_valid(Path("/tmp/resume"))    # verified, or None
    store.prune(keep=2)                                        # save_total_limit, in S3 too
    S3CheckpointStore(uri, node=1, nodes=2).upload(...)        # node 1 of 2: under <name>/node-1/

Credentials come from boto3's usual chain (environment, profile, instance role); none of them is
ever written into a manifest or a log line. ``AWS_ENDPOINT_URL_S3`` points boto3 at an
S3-compatible server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
NODE_FOLDER = "node-{node}"  # where node k > 0 of a multi-node run puts its part of a checkpoint
# The Trainer's copy of the weights, which every node writes (save_on_each_node) and node 0's part
# already holds: node k > 0 leaves it out and takes node 0's when it resumes.
NODE0_ONLY = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
HASH_CHUNK = 8 * 1024 * 1024
FILE_WORKERS = 4  # files uploaded at once


class CheckpointStoreError(RuntimeError):
    """S3 cannot be used as asked; the message names the URL and what to check."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(directory: Path, exclude: tuple[str, ...] = (), hashes: bool = True) -> dict[str, Any]:
    """Every file under ``directory`` (relative path, size, sha256), sorted by path, except those
    whose top-level name (a file, or the folder it is in) matches a pattern in ``exclude``
    ("logs", "*.safetensors"). ``hashes=False`` leaves sha256 to the caller."""
    from fnmatch import fnmatch

    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        if any(fnmatch(path.relative_to(directory).parts[0], pattern) for pattern in exclude):
            continue
        files.append({"path": path.relative_to(directory).as_posix(), "size": path.stat().st_size,
                      "sha256": sha256_file(path) if hashes else None})
    return {"name": directory.name, "created_at": time.time(), "files": files,
            "total_bytes": sum(f["size"] for f in files)}


def verify_directory(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """What in ``directory`` does not match ``manifest``; empty when every file matches."""
    problems = []
    for entry in manifest["files"]:
        path = directory / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{entry['path']}: {path.stat().st_size} bytes, manifest says {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 does not match the manifest")
    return problems


def _step_of(name: str) -> int:
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else -1


def _warn(message: str) -> None:
    print(f"[checkpoints] {message}", file=sys.stderr, flush=True)


class S3CheckpointStore:
    """Checkpoints under one ``s3://bucket/prefix`` (see the module docstring)."""

    def __init__(self, uri: str, client: Any = None, *, node: int = 0, nodes: int = 1):
        """``node``/``nodes``: this node's index and the node count of a multi-node run."""
        if not uri.startswith("s3://") or len(uri) <= len("s3://"):
            raise CheckpointStoreError(f"{uri!r} is not an s3://bucket/prefix URL.")
        if not 0 <= node < nodes:
            raise ValueError(f"node {node} of {nodes}: node must be in 0..{nodes - 1}")
        self.node, self.nodes = node, nodes
        self.uri = uri.rstrip("/")
        self.bucket, _, prefix = self.uri[len("s3://"):].partition("/")
        self.prefix = f"{prefix}/" if prefix else ""
        if client is None:
            import boto3
            from botocore.config import Config

            # Bounded retries: an unreachable endpoint is an error in seconds, not minutes.
            client = boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                      connect_timeout=5, read_timeout=60))
        self.client = client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as err:
            raise CheckpointStoreError(
                f"S3 {what} failed for {self.uri}: {err}. Check the URL, the endpoint "
                "(AWS_ENDPOINT_URL_S3) and your AWS credentials; local checkpoints are kept."
            ) from err

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        # 16 MB parts, 8 at once per file (and FILE_WORKERS files at once): a shard of a few
        # hundred MB is already a dozen parallel part uploads.
        return TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024,
                              max_concurrency=8)

    def _part(self, name: str, node: int) -> str:
        """The key prefix of ``node``'s part of checkpoint ``name``."""
        return f"{self.prefix}{name}/" + (f"{NODE_FOLDER.format(node=node)}/" if node else "")

    def upload(self, directory: Path, name: str | None = None, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """Upload every file of ``directory`` to this node's part of ``<uri>/<name>/``, then its
        manifest; returns it."""
        from concurrent.futures import ThreadPoolExecutor

        name = name or directory.name
        manifest = build_manifest(directory, (*exclude, *(NODE0_ONLY if self.node else ())), hashes=False)
        manifest.update(name=name, node=self.node, nodes=self.nodes)
        part = self._part(name, self.node)
        config = self._transfer_config()

        def upload_one(entry: dict[str, Any]) -> None:
            path = directory / entry["path"]
            # Hash and upload in the same worker: files hash while others are on the wire.
            entry["sha256"] = sha256_file(path)
            self._call("upload", self.client.upload_file, str(path), self.bucket, f"{part}{entry['path']}",
                       Config=config)

        with ThreadPoolExecutor(FILE_WORKERS) as pool:
            list(pool.map(upload_one, manifest["files"]))
        # Last: its presence is what makes the checkpoint valid.
        self._call("upload", self.client.put_object, Bucket=self.bucket, Key=f"{part}{MANIFEST}",
                   Body=json.dumps(manifest, indent=1).encode())
        return manifest

    def _prefixes(self) -> list[str]:
        """Every name under the URI, complete or not."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix,
                                                                    Delimiter="/")))
        return [common["Prefix"][len(self.prefix):].rstrip("/") for page in pages
                for common in page.get("CommonPrefixes", [])]

    def names(self, *, warn: bool = True, prefixes: list[str] | None = None) -> list[str]:
        """Checkpoints that have every manifest (complete uploads), oldest step first; among
        ``prefixes`` when the caller has listed them already."""
        found = []
        for name in self._prefixes() if prefixes is None else prefixes:
            missing = self._missing_parts(name)
            if not missing:
                found.append(name)
            elif warn:
                _warn(f"{self.uri}/{name} {missing}: an incomplete upload, skipped")
        return sorted(found, key=lambda n: (_step_of(n), n))

    def _manifest(self, name: str, node: int = 0) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=f"{self._part(name, node)}{MANIFEST}")["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return json.loads(body)

    def _missing_parts(self, name: str) -> str:
        """What keeps ``name`` from being complete ("" when nothing): node 0's manifest, which
        says how many nodes wrote the checkpoint, then every other node's."""
        manifest = self._manifest(name)
        if manifest is None:
            return f"has no {MANIFEST}"
        absent = [k for k in range(1, manifest.get("nodes", 1)) if self._manifest(name, k) is None]
        if absent:
            return f"misses the {MANIFEST} of node(s) {', '.join(map(str, absent))} of {manifest['nodes']}"
        return ""

    def download(self, name: str, target: Path) -> Path:
        """Download ``name`` into ``target/name`` and verify it; raises CheckpointStoreError if bad.

        On node k of a multi-node run: node 0's files, then node k's own over them.
        """
        manifest = self._manifest(name)
        if manifest is None:
            raise CheckpointStoreError(f"{self.uri}/{name} has no {MANIFEST}: not a complete checkpoint.")
        written_by = manifest.get("nodes", 1)
        if written_by != self.nodes:
            raise CheckpointStoreError(
                f"{self.uri}/{name} was written by {written_by} node(s) and this run has {self.nodes}: "
                "DeepSpeed's ZeRO shards belong to the ranks that wrote them. Resume with the same "
                "num_nodes and GPUs per node, or start fresh."
            )
        parts = [(0, manifest)]
        if self.node:
            own = self._manifest(name, self.node)
            if own is None:
                raise CheckpointStoreError(f"{self.uri}/{name} misses node {self.node}'s part: not a complete checkpoint.")
            parts.append((self.node, own))
        local = target / name
        shutil.rmtree(local, ignore_errors=True)
        config = self._transfer_config()
        expected: dict[str, dict[str, Any]] = {}  # path -> entry; this node's own copy wins
        for node, part in parts:
            for entry in part["files"]:
                path = local / entry["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                self._call("download", self.client.download_file, self.bucket, f"{self._part(name, node)}{entry['path']}",
                           str(path), Config=config)
                expected[entry["path"]] = entry
        problems = verify_directory(local, {"files": list(expected.values())})
        if problems:
            shutil.rmtree(local, ignore_errors=True)
            raise CheckpointStoreError(
                f"{self.uri}/{name} is corrupted: " + "; ".join(problems) + ". Its files in S3 are not "
                "the bytes that were uploaded: upload it again, or use another checkpoint or model."
            )
        (local / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return local

    def download_latest_valid(self, target: Path) -> Path | None:
        """The newest checkpoint that downloads and verifies; older ones are tried in turn."""
        for name in reversed(self.names()):
            try:
                return self.download(name, target)
            except CheckpointStoreError as err:
                _warn(f"skipping {name}: {err}")
        return None

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` checkpoints; returns the names deleted. Incomplete
        checkpoints older than the oldest one kept (a node lost mid-upload) go too."""
        prefixes = self._prefixes()
        names = self.names(warn=False, prefixes=prefixes)
        kept = names[max(0, len(names) - keep):]
        doomed = names[: len(names) - len(kept)]
        if kept:
            oldest_kept = _step_of(kept[0])
            doomed += [n for n in prefixes if n not in names and 0 <= _step_of(n) < oldest_kept]
        for name in doomed:
            # Manifest first: a half-deleted checkpoint must read as incomplete, never as valid.
            self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=f"{self.prefix}{name}/{MANIFEST}")
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{name}/"):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    self._call("delete", self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": keys})
        return doomed


def staged_copy(directory: Path, staging_root: Path) -> Path:
    """Hard-link ``directory`` into ``staging_root``: a frozen view that the Trainer's checkpoint
    rotation cannot delete under a background upload (falls back to copying across devices)."""
    target = staging_root / directory.name
    shutil.rmtree(target, ignore_errors=True)
    for path in directory.rglob("*"):
        destination = target / path.relative_to(directory)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)
    return target
