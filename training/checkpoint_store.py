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

Everything read back is checked against what this module writes, because whoever can write the
bucket could otherwise write, delete or fill this machine's disk through it: a name is
``checkpoint-<step>``, ``model`` or ``logs`` (anything else listed under the URI, ``..`` from a
key ``<prefix>/../manifest.json`` included, is ignored); a manifest is a bounded JSON object whose
``files`` are plain relative paths with sizes and sha256 hashes; files are written one folder at a
time without following symlinks, into a folder beside the target that replaces it only once every
file verifies. A bad manifest or file is a CheckpointStoreError: resume skips that checkpoint.

Credentials come from boto3's usual chain (environment, profile, instance role); none of them is
ever written into a manifest or a log line. ``AWS_ENDPOINT_URL_S3`` points boto3 at an
S3-compatible server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any

from training.safe_loading import unsafe_pickles

MANIFEST = "manifest.json"
NODE_FOLDER = "node-{node}"  # where node k > 0 of a multi-node run puts its part of a checkpoint
# The Trainer's copy of the weights, which every node writes (save_on_each_node) and node 0's part
# already holds: node k > 0 leaves it out and takes node 0's when it resumes.
NODE0_ONLY = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
# \Z, not $: "$" also matches before a final newline, and S3 keys may hold one.
CHECKPOINT_NAME = re.compile(r"^checkpoint-([0-9]+)\Z")
# Every name this project writes under a URI: checkpoints, and the run's final model and logs.
STORED_NAME = re.compile(r"^(checkpoint-[0-9]+|model|logs)\Z")
SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
# Our manifests take ~200 bytes a file: a ZeRO checkpoint of 512 ranks (~1,500 files) is ~300 KB.
# 16 MB is 50 times that, and keeps a 5 GB object at the manifest's key from being read whole.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
HASH_CHUNK = 8 * 1024 * 1024
FILE_WORKERS = 4  # files uploaded at once


class CheckpointStoreError(RuntimeError):
    """S3 cannot be used as asked; the message names the URL and what to check."""


def _sha256_of(handle: Any) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return _sha256_of(handle)


def build_manifest(directory: Path, exclude: tuple[str, ...] = (), hashes: bool = True) -> dict[str, Any]:
    """Every file under ``directory`` (relative path, size, sha256), sorted by path, except those
    whose top-level name (a file, or the folder it is in) matches a pattern in ``exclude``
    ("logs", "*.safetensors"). ``hashes=False`` leaves sha256 to the caller."""
    from fnmatch import fnmatch

    files = []
    # Symlinks are left out: an upload never carries what a link outside the folder points at.
    for path in sorted(p for p in directory.rglob("*")
                       if p.is_file() and not p.is_symlink() and p.name != MANIFEST):
        if any(fnmatch(path.relative_to(directory).parts[0], pattern) for pattern in exclude):
            continue
        files.append({"path": path.relative_to(directory).as_posix(), "size": path.stat().st_size,
                      "sha256": sha256_file(path) if hashes else None})
    return {"name": directory.name, "created_at": time.time(), "files": files,
            "total_bytes": sum(f["size"] for f in files)}


def _path_problem(path: Any) -> str:
    """Why ``path`` (a manifest entry's) is not a plain relative path that stays inside the folder
    it is read into; "" when it is. Checked before anything is fetched or written."""
    if not isinstance(path, str) or not path:
        return f"path {path!r} is not a non-empty string"
    # isprintable() refuses NUL, newlines and lone surrogates (which no filename can encode).
    if path.startswith("/") or "\\" in path or not path.isprintable():
        return f"path {path!r} is absolute or holds a backslash or control character"
    if any(part in ("", ".", "..") or len(part.encode()) > 255 for part in path.split("/")):
        return f"path {path!r} has an empty, '.', '..' or over-long component"
    return ""


def _manifest_problem(manifest: Any) -> str:
    """What makes ``manifest`` (parsed JSON) not one this module wrote; "" when nothing."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    nodes = manifest.get("nodes", 1)
    if type(nodes) is not int or nodes < 1:
        return f"'nodes' is {nodes!r}, not a count of nodes"
    files = manifest.get("files")
    if not isinstance(files, list):
        return "'files' is missing or not a list"
    for entry in files:
        if not isinstance(entry, dict):
            return f"a 'files' entry is {entry!r}, not an object"
        if problem := _path_problem(entry.get("path")):
            return problem
        if type(entry.get("size")) is not int or entry["size"] < 0:
            return f"{entry['path']}: size {entry.get('size')!r} is not a byte count"
        if not isinstance(entry.get("sha256"), str) or not SHA256.match(entry["sha256"]):
            return f"{entry['path']}: sha256 {entry.get('sha256')!r} is not a sha256 hex digest"
    return ""


def _open_under(root_fd: int, relative: str, flags: int, *, make_folders: bool = False) -> int:
    """A descriptor for ``relative`` (a path _path_problem accepts) under the folder ``root_fd``,
    opened one component at a time relative to the one before, with O_NOFOLLOW: a symlink on the
    way, or a folder renamed or replaced meanwhile, is an OSError, never a way out of the folder."""
    *folders, leaf = relative.split("/")
    fd = os.dup(root_fd)
    try:
        for folder in folders:
            if make_folders:
                # Made already for an earlier file; if something else is there the open refuses it.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(folder, 0o755, dir_fd=fd)
            inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        return os.open(leaf, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644, dir_fd=fd)
    finally:
        os.close(fd)


def _verify_under(root_fd: int, files: list[dict[str, Any]]) -> list[str]:
    problems = []
    for entry in files:
        try:
            fd = _open_under(root_fd, entry["path"], os.O_RDONLY)
        except FileNotFoundError:
            problems.append(f"{entry['path']}: missing")
            continue
        except OSError as err:  # ELOOP: a symlink, ENOTDIR: a symlink or file where a folder is
            problems.append(f"{entry['path']}: not a regular file inside the folder ({err.strerror})")
            continue
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                problems.append(f"{entry['path']}: not a regular file")
            elif info.st_size != entry["size"]:
                problems.append(f"{entry['path']}: {info.st_size} bytes, manifest says {entry['size']}")
            elif _sha256_of(handle) != entry["sha256"]:
                problems.append(f"{entry['path']}: sha256 does not match the manifest")
    return problems


def verify_directory(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """What in ``directory`` does not match ``manifest``; empty when every file matches. Files
    are read without following symlinks: a symlink is a problem, not the file it points to."""
    root_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _verify_under(root_fd, manifest["files"])
    finally:
        os.close(root_fd)


def _step_of(name: str) -> int:
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else -1


def _dead_partials(target: Path, name: str) -> list[str]:
    """The ``.<name>.partial-<pid>`` folders in ``target`` whose process is gone (a download that
    was killed), this process's own included; a live process's download is left alone."""
    found = []
    for entry in os.listdir(target):
        prefix, _, pid = entry.rpartition("-")
        if prefix != f".{name}.partial" or not pid.isdigit():
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # alive: another process is downloading this name
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
        found.append(entry)
    return found


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
            from botocore.exceptions import BotoCoreError

            try:
                # Bounded retries: an unreachable endpoint is an error in seconds, not minutes.
                client = boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                          connect_timeout=5, read_timeout=60))
            except BotoCoreError as err:  # ProfileNotFound (a bad AWS_PROFILE) and the like
                raise self._error("setup", err) from err
        self.client = client

    def _error(self, what: str, err: Exception) -> CheckpointStoreError:
        from botocore.exceptions import NoCredentialsError

        if isinstance(err, NoCredentialsError):
            return CheckpointStoreError(
                f"S3 {what} failed for {self.uri}: no AWS credentials found. Set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where an instance role provides them."
            )
        return CheckpointStoreError(
            f"S3 {what} failed for {self.uri}: {err}. Check the URL, the endpoint (AWS_ENDPOINT_URL_S3) "
            "and your AWS credentials."
        )

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as err:
            raise self._error(what, err) from err

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

    def _pages(self, prefix: str, **options: Any) -> list[dict[str, Any]]:
        """Every page of list_objects_v2 under ``prefix``."""
        paginator = self.client.get_paginator("list_objects_v2")
        return self._call("list", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix, **options)))

    def _prefixes(self) -> list[str]:
        """Every checkpoint name under the URI, complete or not. Other names listed there (the
        run's ``model``, a ``..`` made by a key ``<prefix>/../manifest.json``) are left out:
        nothing reads or deletes them as checkpoints."""
        pages = self._pages(self.prefix, Delimiter="/")
        names = (common["Prefix"][len(self.prefix):].rstrip("/") for page in pages
                 for common in page.get("CommonPrefixes", []))
        return [name for name in names if CHECKPOINT_NAME.match(name)]

    def names(self, *, warn: bool = True, prefixes: list[str] | None = None) -> list[str]:
        """Checkpoints that have every manifest (complete uploads), oldest step first; among
        ``prefixes`` (from _prefixes) when the caller has listed them already. A checkpoint whose
        manifest cannot be read or is not one of ours is left out, with a warning."""
        found = []
        for name in self._prefixes() if prefixes is None else prefixes:
            try:
                missing = self._missing_parts(name)
            except CheckpointStoreError as err:
                if warn:
                    _warn(f"{self.uri}/{name} skipped: {err}")
                continue
            if not missing:
                found.append(name)
            elif warn:
                _warn(f"{self.uri}/{name} {missing}; skipped")
        return sorted(found, key=_step_of)

    def _manifest(self, name: str, node: int = 0) -> dict[str, Any] | None:
        """``node``'s manifest of ``name``, checked (None: not uploaded yet); CheckpointStoreError
        when it cannot be read or is not a manifest this module wrote."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = f"{self._part(name, node)}{MANIFEST}"
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with contextlib.closing(body):
                data = body.read(MAX_MANIFEST_BYTES + 1)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(f"read of {MANIFEST}", err) from err
        except BotoCoreError as err:
            raise self._error(f"read of {MANIFEST}", err) from err
        where = f"s3://{self.bucket}/{key}"
        if len(data) > MAX_MANIFEST_BYTES:
            problem = f"over {MAX_MANIFEST_BYTES >> 20} MB, far more than any manifest written here"
        else:
            try:
                manifest = json.loads(data)
                problem = _manifest_problem(manifest)
            except (ValueError, RecursionError) as err:  # bad JSON or UTF-8; nested too deep
                problem = f"not JSON ({type(err).__name__}: {err})"
        if problem:
            raise CheckpointStoreError(
                f"{where} is not a checkpoint manifest: {problem}. This module did not write it; "
                "delete that checkpoint from S3 (or upload it again), and resume from another."
            )
        return manifest

    def _node_count_problem(self, manifest: dict[str, Any]) -> str:
        if manifest.get("nodes", 1) == self.nodes:
            return ""
        return (f"was written by {manifest.get('nodes', 1)} node(s) and this run has {self.nodes}: DeepSpeed's "
                "ZeRO shards belong to the ranks that wrote them. Resume with the same num_nodes and GPUs "
                "per node, or start fresh")

    def _missing_parts(self, name: str) -> str:
        """What keeps ``name`` from being complete ("" when nothing): node 0's manifest, which
        says how many nodes wrote the checkpoint, then every other node's. Only a checkpoint
        written by as many nodes as this store has is looked into: its node count bounds the reads
        (a manifest claiming 2000 nodes costs one read, not 2000)."""
        manifest = self._manifest(name)
        if manifest is None:
            return f"has no {MANIFEST} (an incomplete upload)"
        if problem := self._node_count_problem(manifest):
            return problem
        absent = [k for k in range(1, self.nodes) if self._manifest(name, k) is None]
        if absent:
            return (f"misses the {MANIFEST} of node(s) {', '.join(map(str, absent))} of {self.nodes} "
                    "(an incomplete upload)")
        return ""

    def download(self, name: str, target: Path) -> Path:
        """Download ``name`` into ``target/name`` and verify it; raises CheckpointStoreError if bad.

        The files land in a new folder beside ``target/name`` that replaces it only once every
        one matches the manifest: a failed download leaves what was there before.
        On node k of a multi-node run: node 0's files, then node k's own over them.
        """
        if not STORED_NAME.match(name):
            raise CheckpointStoreError(
                f"{self.uri}/{name}: {name!r} is not a name this project writes under an S3 URI "
                "(checkpoint-<step>, model, logs); pass the URL of a checkpoint or of a run's model folder."
            )
        manifest = self._manifest(name)
        if manifest is None:
            raise CheckpointStoreError(f"{self.uri}/{name} has no {MANIFEST}: not a complete checkpoint.")
        if problem := self._node_count_problem(manifest):
            raise CheckpointStoreError(f"{self.uri}/{name} {problem}.")
        parts = [(0, manifest)]
        if self.node:
            own = self._manifest(name, self.node)
            if own is None:
                raise CheckpointStoreError(
                    f"{self.uri}/{name} misses node {self.node}'s part: not a complete checkpoint.")
            parts.append((self.node, own))
        expected: dict[str, dict[str, Any]] = {}  # path -> entry; this node's own copy wins
        for _, part in parts:
            expected.update((entry["path"], entry) for entry in part["files"])
        # A path that is both a file and a folder of another ("a" and "a/b") cannot be written.
        folders = {"/".join(path.split("/")[:i]) for path in expected for i in range(1, path.count("/") + 1)}
        if clash := sorted(folders & expected.keys()):
            raise CheckpointStoreError(f"{self.uri}/{name}: its manifests list {clash[0]!r} as a file and as "
                                       "a folder; this module did not write them. Use another checkpoint.")

        target.mkdir(parents=True, exist_ok=True)
        target_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        partial = f".{name}.partial-{os.getpid()}"
        try:
            for left in _dead_partials(target, name):  # what killed downloads of this name left
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(left, dir_fd=target_fd)
            os.mkdir(partial, 0o755, dir_fd=target_fd)
            partial_fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=target_fd)
            try:
                self._fetch_parts(name, parts, partial_fd)
                problems = _verify_under(partial_fd, list(expected.values()))
                if problems:
                    raise CheckpointStoreError(
                        f"{self.uri}/{name} is corrupted: " + "; ".join(problems) + ". Its files in S3 are not "
                        "the bytes that were uploaded: upload it again, or use another checkpoint or model."
                    )
                # Verified bytes prove integrity, not authorship (the manifest sits in the same
                # bucket): a checkpoint whose pickles reference anything a checkpoint never needs
                # is refused here, so that resume falls back to the one before it.
                if CHECKPOINT_NAME.match(name) and (refused := unsafe_pickles(target / partial)):
                    # Named by their S3 URLs: the partial folder is gone once this is read.
                    raise CheckpointStoreError(" ".join(
                        line.replace(str(target / partial), f"{self.uri}/{name}") for line in refused))
                fd = _open_under(partial_fd, MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                with os.fdopen(fd, "w") as handle:
                    handle.write(json.dumps(manifest, indent=1))
            finally:
                os.close(partial_fd)
            self._replace(target_fd, partial, name)
        finally:
            with contextlib.suppress(FileNotFoundError):  # renamed into place: nothing left to remove
                shutil.rmtree(partial, dir_fd=target_fd)
            os.close(target_fd)
        return target / name

    def _fetch_parts(self, name: str, parts: list[tuple[int, dict[str, Any]]], folder_fd: int) -> None:
        config = self._transfer_config()
        for node, part in parts:
            for entry in part["files"]:
                fd = _open_under(folder_fd, entry["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, make_folders=True)
                with os.fdopen(fd, "wb") as handle:
                    self._call("download", self.client.download_fileobj, self.bucket,
                               f"{self._part(name, node)}{entry['path']}", handle, Config=config)

    @staticmethod
    def _replace(target_fd: int, partial: str, name: str) -> None:
        """Rename the verified ``partial`` folder to ``name`` inside ``target_fd``; what was at
        ``name`` (an older download, or a symlink, which is removed and not followed) goes."""
        old = f".{name}.old-{os.getpid()}"
        try:
            os.rename(name, old, src_dir_fd=target_fd, dst_dir_fd=target_fd)
        except FileNotFoundError:
            old = ""
        try:
            os.rename(partial, name, src_dir_fd=target_fd, dst_dir_fd=target_fd)
        except OSError:
            if old:  # put the earlier copy back: a failed download must not cost it
                os.rename(old, name, src_dir_fd=target_fd, dst_dir_fd=target_fd)
            raise
        if not old:
            return
        if stat.S_ISDIR(os.stat(old, dir_fd=target_fd, follow_symlinks=False).st_mode):
            shutil.rmtree(old, dir_fd=target_fd)
        else:
            os.unlink(old, dir_fd=target_fd)

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
        checkpoints older than the oldest one kept (a node lost mid-upload) go too. Only
        ``checkpoint-<step>`` prefixes are ever deleted (_prefixes lists no other)."""
        prefixes = self._prefixes()
        names = self.names(warn=False, prefixes=prefixes)
        kept = names[max(0, len(names) - keep):]
        doomed = names[: len(names) - len(kept)]
        if kept:
            oldest_kept = _step_of(kept[0])
            doomed += [n for n in prefixes if n not in names and _step_of(n) < oldest_kept]
        for name in doomed:
            # Manifest first: a half-deleted checkpoint must read as incomplete, never as valid.
            self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=f"{self.prefix}{name}/{MANIFEST}")
            for page in self._pages(f"{self.prefix}{name}/"):
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
