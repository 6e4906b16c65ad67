"""What users type that reads checkpoint storage: `training.generate --model s3://...` and the
flow's `--resume-from`. Without credentials, with an unreachable endpoint or an unknown run:
one line naming the URL or run and the fix, never a traceback (issue 22, point 9)."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "flows"))  # the flow's own modules, as the flow imports them
from run_storage import resolve_resume_from  # noqa: E402

URL = "s3://some-bucket/DollyFlow/17644/model"


def generate_error(capsys, *argv: str) -> str:
    from training.generate import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "What is a haiku?"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """boto3 finds no credentials anywhere, and nothing leaves this machine."""
    import boto3

    # boto3's default session keeps the credentials it found for earlier tests' clients.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens on port 9


def test_generate_without_credentials_names_the_url_and_the_fix(no_credentials, capsys):
    err = generate_error(capsys, "--model", URL)
    assert err.startswith("error: S3 read of manifest.json failed for s3://some-bucket/DollyFlow/17644")
    assert "no AWS credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err


def test_generate_with_an_unreachable_endpoint_names_the_url_and_the_fix(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    err = generate_error(capsys, "--model", URL)
    assert "failed for s3://some-bucket/DollyFlow/17644: Could not connect to the endpoint URL" in err
    assert "Check the URL, the endpoint (AWS_ENDPOINT_URL_S3) and your AWS credentials." in err


def test_generate_refuses_a_name_this_project_never_writes(no_credentials, capsys):
    err = generate_error(capsys, "--model", "s3://some-bucket/DollyFlow/17644/..")
    assert "'..' is not a name this project writes under an S3 URI (checkpoint-<step>, model, logs)" in err


def test_an_unknown_resume_from_run_is_a_value_error(tmp_path, monkeypatch):
    """Metaflow's MetaflowNotFound went past `start`'s problem list as "Internal error"; start_checks
    collects ValueError into that list."""
    monkeypatch.chdir(tmp_path)  # no .metaflow here: no run exists
    with pytest.raises(ValueError, match=r"^DollyFlow/999: no such run \(Metaflow looked in .*\.metaflow"):
        resolve_resume_from("DollyFlow/999")
    with pytest.raises(ValueError, match=r"'999' is not a run: pass <FlowName>/<run id>"):
        resolve_resume_from("999")
