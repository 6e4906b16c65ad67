"""The published model is an allowlist of the trainer's output directory: safetensors, configs,
tokenizer files and metrics; never training_args.bin (a pickle), a .env beside it, or a symlink
(`--output_dir .` in a user's project must not upload their secrets or a link's target)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.s3_uploads import STAGING
from training.train_outputs import publish_model, published_files, tensorboard_files

MODEL_FILES = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "metrics.json"]
ADAPTER_FILES = ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json"]


@pytest.fixture
def output_dir(tmp_path) -> Path:
    """What a merged LoRA run leaves in `--output_dir .` of a user's project."""
    out = tmp_path / "project"
    for name in MODEL_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    for name in ADAPTER_FILES:
        (out / "adapter" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "adapter" / name).write_text(name)
    secret = tmp_path / "secret.txt"
    secret.write_text("AWS_SECRET_ACCESS_KEY=...")
    (out / ".env").write_text("AWS_SECRET_ACCESS_KEY=...")
    (out / "training_args.bin").write_bytes(b"a pickle")
    (out / "adapter" / "training_args.bin").write_bytes(b"a pickle")
    (out / "README.md").write_text("the user's project")
    (out / "s3_uploads.json").write_text("{}")
    # Symlinks under names the allowlist takes: their targets are not the model.
    (out / "special_tokens_map.json").symlink_to(secret)
    (out / "model-00002-of-00002.safetensors").symlink_to(secret)
    (out / "adapter" / "vocab.json").symlink_to(secret)
    for folder in ("checkpoints/checkpoint-2", "logs", "resume", "src"):
        (out / folder).mkdir(parents=True)
        (out / folder / "config.json").write_text("{}")
    return out


def test_only_the_model_files_are_published(output_dir):
    published = published_files(output_dir, merged_adapter=True)

    assert sorted(map(str, published)) == sorted(MODEL_FILES + [f"adapter/{name}" for name in ADAPTER_FILES])


def test_an_unmerged_run_publishes_no_adapter_folder(output_dir):
    """Without a merge the output directory is the adapter itself; an adapter/ folder there is
    something else (an older run's)."""
    assert sorted(map(str, published_files(output_dir, merged_adapter=False))) == sorted(MODEL_FILES)


def test_an_adapter_folder_that_is_a_symlink_is_not_followed(output_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (output_dir / "adapter").rename(elsewhere)
    (output_dir / "adapter").symlink_to(elsewhere)

    assert sorted(map(str, published_files(output_dir, merged_adapter=True))) == sorted(MODEL_FILES)


def test_the_upload_holds_the_published_files_alone(output_dir, s3_bucket_name):
    import boto3

    from training.checkpoint_store import S3CheckpointStore

    files = published_files(output_dir, merged_adapter=True)
    manifest = publish_model(output_dir, files, S3CheckpointStore(f"s3://{s3_bucket_name}/run"))

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket_name, Prefix="run/")["Contents"]]
    assert sorted(keys) == sorted([f"run/model/{f}" for f in map(str, files)] + ["run/model/manifest.json"])
    assert sorted(f["path"] for f in manifest["files"]) == sorted(map(str, files))
    assert not (output_dir / STAGING / "model").exists()  # the staged links are gone
    assert (output_dir / "model.safetensors").read_text() == "model.safetensors"  # the model stays


def test_only_tensorboard_event_files_of_logs_are_published(output_dir, tmp_path, s3_bucket_name):
    """`--output_dir .` in a project that has a logs/ folder of its own: its files stay home."""
    import boto3

    from training.checkpoint_store import S3CheckpointStore

    events = output_dir / "logs" / "Dec02_09-00-00" / "events.out.tfevents.1764666000.host.1.0"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"tensorboard")
    (output_dir / "logs" / "app.log").write_text("the user's own log")
    (output_dir / "logs" / "events.out.tfevents.link").symlink_to(tmp_path / "secret.txt")

    files = tensorboard_files(output_dir)
    assert files == [Path("Dec02_09-00-00/events.out.tfevents.1764666000.host.1.0")]
    publish_model(output_dir, files, S3CheckpointStore(f"s3://{s3_bucket_name}/run"), name="logs", folder="logs")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket_name, Prefix="run/")["Contents"]]
    assert sorted(keys) == ["run/logs/Dec02_09-00-00/events.out.tfevents.1764666000.host.1.0", "run/logs/manifest.json"]
    assert tensorboard_files(output_dir / "nowhere") == []
