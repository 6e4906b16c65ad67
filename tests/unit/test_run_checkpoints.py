"""Which checkpoints a run owns and resumes from: its own S3 prefix, `latest` only for its own
retries and Metaflow's `resume` (issue: two runs on one --checkpoint-uri shared checkpoints)."""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "flows"))  # the flow's own modules, as the flow imports them
from run_storage import (
    checkpoint_root_of,
    resume_source,  # noqa: E402
)


def test_runs_given_the_same_checkpoint_uri_get_prefixes_of_their_own():
    first = checkpoint_root_of("s3://bucket/shared/", "", "DollyFlow", "7")
    second = checkpoint_root_of("s3://bucket/shared", "", "DollyFlow", "8")
    assert first == "s3://bucket/shared/DollyFlow/7"
    assert second == "s3://bucket/shared/DollyFlow/8"
    # Metaflow's S3 data root is already per run; no S3 at all: local disk only.
    assert checkpoint_root_of("", "s3://root/DollyFlow/9/", "DollyFlow", "9") == "s3://root/DollyFlow/9"
    assert checkpoint_root_of("", "", "DollyFlow", "9") == ""


def test_a_fresh_run_never_resumes_from_what_its_prefix_may_hold():
    assert resume_source("", retry_count=0, resumed_run=False, uploads=True) == ""
    assert resume_source("", retry_count=0, resumed_run=False, uploads=False) == ""


def test_latest_means_this_runs_retries_and_metaflow_resume_only():
    assert resume_source("", retry_count=1, resumed_run=False, uploads=True) == "latest"
    assert resume_source("", retry_count=0, resumed_run=True, uploads=True) == "latest"
    # Nothing was uploaded: there is no `latest` to look for (local checkpoints stay per attempt).
    assert resume_source("", retry_count=2, resumed_run=False, uploads=False) == ""


def test_an_explicit_checkpoint_starts_the_run_and_its_retries_continue_their_own_progress():
    explicit = "s3://bucket/DollyFlow/3/checkpoints"
    assert resume_source(explicit, retry_count=0, resumed_run=False, uploads=True) == explicit
    assert resume_source(explicit, retry_count=0, resumed_run=False, uploads=False) == explicit
    assert resume_source(explicit, retry_count=1, resumed_run=False, uploads=True) == "latest"
