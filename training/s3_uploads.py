"""Uploading checkpoints to S3 while training runs, and finding the one to resume from.

Layout under ``--s3_uri s3://bucket/prefix``::

    checkpoints/checkpoint-<step>/...   every checkpoint the Trainer writes, manifest last
    checkpoints/checkpoint-<step>/node-<k>/...  on several nodes: node k's part (its ranks' shards)
    model/...                           the final model (safetensors, tokenizer, metrics.json)

Each checkpoint is hard-linked into a staging folder the moment the Trainer has written it (so
the Trainer's own rotation cannot delete files under the upload) and uploaded by a background
thread, while the next steps train. ``save_total_limit`` is applied in S3 after each upload.
An upload that fails is reported with the checkpoint's name; the local checkpoint stays.
"""

from __future__ import annotations

import queue
import shutil
import threading
from pathlib import Path
from typing import Any

from training.checkpoint_store import (
    CHECKPOINT_NAME,
    CheckpointStoreError,
    S3CheckpointStore,
    staged_copy,
)

STAGING = ".upload-staging"


def _log(message: str) -> None:
    print(f"[checkpoints] {message}", flush=True)


class BackgroundUploader:
    """A queue of checkpoint folders and the one thread that uploads them, in order."""

    def __init__(self, store: S3CheckpointStore, keep: int, staging_root: Path):
        self.store = store
        self.keep = keep
        self.staging_root = staging_root
        self.failures: list[str] = []
        self.uploaded: list[dict[str, Any]] = []
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, checkpoint: Path) -> None:
        self._queue.put(staged_copy(checkpoint, self.staging_root))

    def _run(self) -> None:
        while (staged := self._queue.get()) is not None:
            try:
                manifest = self.store.upload(staged)
                self.uploaded.append(manifest)
                _log(f"uploaded {staged.name} ({manifest['total_bytes'] / 1e6:.1f} MB) to {self.store.uri}/{staged.name}")
                # Node 0 alone applies the limit (to whole checkpoints, every node's part).
                for name in self.store.prune(self.keep) if self.store.node == 0 else []:
                    _log(f"deleted {self.store.uri}/{name} (save_total_limit {self.keep})")
            except CheckpointStoreError as err:
                self.failures.append(f"{staged.name}: {err}")
                _log(f"upload of {staged.name} failed, the local checkpoint is kept: {err}")
            finally:
                shutil.rmtree(staged, ignore_errors=True)

    def close(self, timeout: float | None = None) -> None:
        """Wait for every queued upload (``timeout`` None: as long as it takes)."""
        self._queue.put(None)
        self._thread.join(timeout)


def upload_callback(uploader: BackgroundUploader) -> Any:
    from transformers import TrainerCallback

    class UploadCheckpoints(TrainerCallback):
        """Hands each checkpoint to the uploader as soon as the Trainer has saved it."""

        def on_save(self, args, state, control, **kwargs):
            # One process per node uploads: with ZeRO every rank of the node has written its
            # shard into the same folder by the time on_save runs (the save ends in a barrier).
            if state.is_local_process_zero:
                uploader.submit(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return UploadCheckpoints()


def resolve_resume(resume_from: str, s3_uri: str, download_root: Path, *, node: int = 0,
                   nodes: int = 1) -> Path | None:
    """The local checkpoint folder to resume from, or None to start from scratch.

    ``latest``: the newest valid checkpoint under ``--s3_uri`` (none yet: start fresh);
    ``s3://.../checkpoint-N``: that checkpoint, verified; ``s3://.../checkpoints``: the newest
    valid checkpoint in that folder (none: an error); a local folder: used as it is.
    ``node`` of ``nodes``: on several nodes, node 0's files with this node's part over them.
    """
    parent, _, name = resume_from.rstrip("/").rpartition("/")
    if resume_from.startswith("s3://") and CHECKPOINT_NAME.match(name):
        local = S3CheckpointStore(parent, node=node, nodes=nodes).download(name, download_root)
        _log(f"resuming from {resume_from}")
        return local
    if resume_from == "latest" or resume_from.startswith("s3://"):
        # A folder, not one checkpoint (`--resume-from DollyFlow/<id>` passes the run's): a newest
        # checkpoint that fails verification falls back to the one before it, not fails the run.
        uri = f"{s3_uri.rstrip('/')}/checkpoints" if resume_from == "latest" else resume_from
        store = S3CheckpointStore(uri, node=node, nodes=nodes)
        found = store.download_latest_valid(download_root)
        if found:
            _log(f"resuming from {store.uri}/{found.name}")
        elif resume_from == "latest":
            _log(f"no valid checkpoint in {store.uri}: starting fresh")
        else:
            raise CheckpointStoreError(
                f"--resume_from: no checkpoint in {store.uri} downloads and verifies (the [checkpoints] "
                "lines above say why). Pass another run or checkpoint, or leave --resume_from out to start fresh."
            )
        return found
    local = Path(resume_from).expanduser()
    if not (local / "trainer_state.json").is_file():
        raise CheckpointStoreError(
            f"--resume_from: {local} is not a Trainer checkpoint (no trainer_state.json)."
        )
    return local
