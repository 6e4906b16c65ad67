"""Checkpoints in S3: manifests written last, verified downloads, retention, resume.

A checkpoint in S3 is the prefix ``<uri>/<name>/`` holding the Trainer's files (model, optimizer,
scheduler, RNG and trainer state, DeepSpeed ZeRO shards) and ``manifest.json`` listing every
file with its size and sha256. The manifest is uploaded last, so a checkpoint without one (an
upload cut off by a lost node) is incomplete and is never used; a download whose bytes do not
match the manifest is rejected and the previous checkpoint is tried.

    store = S3CheckpointStore("s3://bucket/runs/42/checkpoints")
    store.upload(Path("out/checkpoints/checkpoint-200"))        # files first, manifest last
    store.names()                                              # ['checkpoint-100', 'checkpoint-200']
    local = store.download_latest_valid(Path("/tmp/resume"))    # verified, or None
    store.prune(keep=2)                                        # save_total_limit, in S3 too

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
    under the top-level folders named in ``exclude``. ``hashes=False`` leaves sha256 to the caller."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        if path.relative_to(directory).parts[0] in exclude:
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

    def __init__(self, uri: str, client: Any = None):
        if not uri.startswith("s3://") or len(uri) <= len("s3://"):
            raise CheckpointStoreError(f"{uri!r} is not an s3://bucket/prefix URL.")
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

    def upload(self, directory: Path, name: str | None = None, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """Upload every file of ``directory`` to ``<uri>/<name>/``, then its manifest; returns it."""
        from concurrent.futures import ThreadPoolExecutor

        name = name or directory.name
        manifest = build_manifest(directory, exclude, hashes=False)
        manifest["name"] = name
        config = self._transfer_config()

        def upload_one(entry: dict[str, Any]) -> None:
            path = directory / entry["path"]
            # Hash and upload in the same worker: files hash while others are on the wire.
            entry["sha256"] = sha256_file(path)
            self._call("upload", self.client.upload_file, str(path), self.bucket, f"{self.prefix}{name}/{entry['path']}",
                       Config=config)

        with ThreadPoolExecutor(FILE_WORKERS) as pool:
            list(pool.map(upload_one, manifest["files"]))
        # Last: its presence is what makes the checkpoint valid.
        self._call("upload", self.client.put_object, Bucket=self.bucket, Key=f"{self.prefix}{name}/{MANIFEST}",
                   Body=json.dumps(manifest, indent=1).encode())
        return manifest

    def names(self) -> list[str]:
        """Checkpoints that have a manifest (complete uploads), oldest step first."""
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix,
                                                                    Delimiter="/")))
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(self.prefix):].rstrip("/")
                if self._manifest(name) is not None:
                    found.append(name)
                else:
                    _warn(f"{self.uri}/{name} has no {MANIFEST}: an incomplete upload, skipped")
        return sorted(found, key=lambda n: (_step_of(n), n))

    def _manifest(self, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}{name}/{MANIFEST}")["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return json.loads(body)

    def download(self, name: str, target: Path) -> Path:
        """Download ``name`` into ``target/name`` and verify it; raises CheckpointStoreError if bad."""
        manifest = self._manifest(name)
        if manifest is None:
            raise CheckpointStoreError(f"{self.uri}/{name} has no {MANIFEST}: not a complete checkpoint.")
        local = target / name
        shutil.rmtree(local, ignore_errors=True)
        config = self._transfer_config()
        for entry in manifest["files"]:
            path = local / entry["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            self._call("download", self.client.download_file, self.bucket, f"{self.prefix}{name}/{entry['path']}",
                       str(path), Config=config)
        problems = verify_directory(local, manifest)
        if problems:
            shutil.rmtree(local, ignore_errors=True)
            raise CheckpointStoreError(f"{self.uri}/{name} is corrupted: " + "; ".join(problems))
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
        """Delete all but the newest ``keep`` checkpoints; returns the names deleted."""
        names = self.names()
        doomed = names[: max(0, len(names) - keep)]
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
