"""The background uploader never dies silently (issue 22): an EndpointConnectionError raised while
pruning ended its thread, later checkpoints were never uploaded, `failures` stayed empty (the run
ended green) and staged hard links stayed on disk."""

from __future__ import annotations

import pytest
from botocore.exceptions import EndpointConnectionError

from tests.unit.test_checkpoint_store import make_checkpoint
from training.checkpoint_store import S3CheckpointStore
from training.s3_uploads import BackgroundUploader


class PruneLosesTheEndpointOnce(S3CheckpointStore):
    def prune(self, keep):
        if not getattr(self, "dropped", False):
            self.dropped = True
            raise EndpointConnectionError(endpoint_url="http://s3.example")
        return super().prune(keep)


class DiskFullOnFirstUpload(S3CheckpointStore):
    def upload(self, directory, name=None, exclude=()):
        if not getattr(self, "failed", False):
            self.failed = True
            raise OSError(28, "No space left on device")
        return super().upload(directory, name, exclude)


@pytest.mark.parametrize("store_class, failure", [
    (PruneLosesTheEndpointOnce, "checkpoint-1: uploaded, but deleting checkpoints beyond save_total_limit 1 "),
    (DiskFullOnFirstUpload, "checkpoint-1: upload failed: OSError: [Errno 28] No space left on device"),
])
def test_any_error_is_recorded_and_the_next_checkpoint_still_uploads(tmp_path, s3_bucket_name, store_class, failure):
    store = store_class(f"s3://{s3_bucket_name}/run/checkpoints")
    staging = tmp_path / "out" / ".upload-staging"
    uploader = BackgroundUploader(store, keep=1, staging_root=staging)
    for step in (1, 2):
        uploader.submit(make_checkpoint(tmp_path / "out", f"checkpoint-{step}"))
    uploader.close()
    assert len(uploader.failures) == 1 and uploader.failures[0].startswith(failure), uploader.failures
    assert [m["name"] for m in uploader.uploaded][-1] == "checkpoint-2"
    assert store.names() == ["checkpoint-2"]  # pruned to save_total_limit once S3 answered again
    assert not list(staging.iterdir())  # every staged copy removed, failed or not


class ThreadKiller(BaseException):
    """Something no handler in the thread catches (as EndpointConnectionError once was)."""


class DiesOnUpload(S3CheckpointStore):
    def upload(self, directory, name=None, exclude=()):
        raise ThreadKiller("stopped")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_stopped_thread_is_noticed_by_submit_and_close(tmp_path, s3_bucket_name):
    store = DiesOnUpload(f"s3://{s3_bucket_name}/run/checkpoints")
    staging = tmp_path / "out" / ".upload-staging"
    uploader = BackgroundUploader(store, keep=2, staging_root=staging)
    uploader.submit(make_checkpoint(tmp_path / "out", "checkpoint-1"))
    uploader._thread.join(timeout=30)  # the thread has died on checkpoint-1
    assert not uploader._thread.is_alive()
    uploader.submit(make_checkpoint(tmp_path / "out", "checkpoint-2"))
    uploader.close()
    assert uploader.failures == [
        "checkpoint-2: not uploaded: the upload thread has stopped (its traceback is above)",
        "checkpoint-1: the upload thread stopped while uploading it (its traceback is above)",
    ]
    assert not list(staging.iterdir())
    assert store.names() == []
