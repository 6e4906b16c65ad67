"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest


@pytest.fixture
def s3_bucket(monkeypatch):
    """A boto3 S3 client on moto's in-process S3, with an empty bucket named "data"."""
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="data")
        yield client
