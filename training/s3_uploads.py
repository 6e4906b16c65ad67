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
    """A queue of checkpoint folders and the one thread that uploads them, in order.

    Whatever goes wrong with one checkpoint (an S3 error, a dropped connection while pruning, a
    full disk) lands in ``failures`` as "<checkpoint>: <what happened>" and the thread goes on
    with the next; the trainer fails the run at its end when ``failures`` is not empty. Should
    the thread stop anyway, ``submit`` and ``close`` notice and record what it left undone."""

    def __init__(self, store: S3CheckpointStore, keep: int, staging_root: Path):
        self.store = store
        self.keep = keep
        self.staging_root = staging_root
        self.failures: list[str] = []
        self.uploaded: list[dict[str, Any]] = []
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._in_flight = ""  # the checkpoint being uploaded, "" between uploads
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def _fail(self, name: str, what: str) -> None:
        self.failures.append(f"{name}: {what}")
        _log(f"{name}: {what} (the local checkpoint is kept)")

    def submit(self, checkpoint: Path) -> None:
        if not self._thread.is_alive():
            # Staging it would leave hard links on disk that no thread removes.
            self._fail(checkpoint.name, "not uploaded: the upload thread has stopped (its traceback is above)")
            return
        self._queue.put(staged_copy(checkpoint, self.staging_root))

    def _run(self) -> None:
        while (staged := self._queue.get()) is not None:
            self._in_flight = staged.name
            try:
                self._upload(staged)
            except CheckpointStoreError as err:
                self._fail(staged.name, str(err))
            # Any other exception too: a botocore EndpointConnectionError raised while pruning
            # used to end this thread, and every later checkpoint went unuploaded with
            # `failures` empty and the run reported green.
            except Exception as err:  # recorded: the run fails at its end, naming the checkpoint
                self._fail(staged.name, f"upload failed: {type(err).__name__}: {err}")
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            self._in_flight = ""

    def _upload(self, staged: Path) -> None:
        manifest = self.store.upload(staged)
        self.uploaded.append(manifest)
        _log(f"uploaded {staged.name} ({manifest['total_bytes'] / 1e6:.1f} MB) to {self.store.uri}/{staged.name}")
        if self.store.node:  # node 0 alone applies the limit (to whole checkpoints, every node's part)
            return
        try:
            deleted = self.store.prune(self.keep)
        except Exception as err:  # any error: the upload is done, only the cleanup failed
            raise CheckpointStoreError(
                f"uploaded, but deleting checkpoints beyond save_total_limit {self.keep} from {self.store.uri} "
                f"failed ({type(err).__name__}: {err}); delete the oldest ones there by hand"
            ) from err
        for name in deleted:
            _log(f"deleted {self.store.uri}/{name} (save_total_limit {self.keep})")

    def close(self, timeout: float | None = None) -> None:
        """Wait for every queued upload (``timeout`` None: as long as it takes). Checkpoints a
        stopped thread left undone are recorded in ``failures`` and their staged copies removed."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        if self._thread.is_alive():
            return  # still uploading past the timeout (a preempted node): what is queued is lost with it
        if self._in_flight:
            self._fail(self._in_flight, "the upload thread stopped while uploading it (its traceback is above)")
            self._in_flight = ""
        while not self._queue.empty():
            if (staged := self._queue.get_nowait()) is not None:
                self._fail(staged.name, "not uploaded: the upload thread stopped before it (its traceback is above)")
                shutil.rmtree(staged, ignore_errors=True)


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
                "lines above say why). Pass a run's checkpoints folder (s3://.../<run>/checkpoints) or one "
                "checkpoint (.../checkpoint-<step>), or leave --resume_from out to start fresh."
            )
        return found
    local = Path(resume_from).expanduser()
    if not (local / "trainer_state.json").is_file():
        raise CheckpointStoreError(
            f"--resume_from: {local} is not a Trainer checkpoint (no trainer_state.json)."
        )
    return local
