"""The last phases of ``train()``: the run's metrics, and the model published (adapter merged,
``metrics.json`` written, the model and TensorBoard logs uploaded to S3).

    metrics = collect_metrics(inputs, built, run, final, watch, args, started=started)
    publish(metrics, model_args, train_args, tokens, watch, output_dir, adapter_dir, dtype, cache_dir)

What the published model holds is an allowlist (``PUBLISHED``): the output folder may hold
anything (``--output_dir .``: a ``.env``, symlinks), and only weights as safetensors, configs,
tokenizer files and the metrics leave it; never ``training_args.bin`` (a pickle), never a symlink.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from training.adapters import ADAPTER_DIR, save_merged
from training.arguments import DataArguments, ModelArguments, TrainArguments
from training.checkpoint_store import CheckpointStoreError, S3CheckpointStore
from training.run_history import whole_train_loss
from training.s3_uploads import STAGING
from training.train_inputs import BuiltModel, Hardware, Rows, Tokens, log
from training.train_loop import FinalEvaluation, Fit, Watchers
from training.trainer_errors import UploadsFailed

METRICS_FILE = "metrics.json"
UPLOADS_FILE = "s3_uploads.json"  # what went to S3, with manifests (files, sizes, sha256)
PUBLISHED = (
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "adapter_model.safetensors", "adapter_config.json",
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    METRICS_FILE,
)


@dataclass(frozen=True)
class RunInputs:
    """What the run trained on, as its metrics report it."""

    model_args: ModelArguments
    data_args: DataArguments
    hardware: Hardware
    rows: Rows
    tokens: Tokens


def collect_metrics(inputs: RunInputs, built: BuiltModel, run: Fit, final: FinalEvaluation, watch: Watchers,
                    args: Any, *, started: float, output_dir: Path) -> dict[str, Any]:
    """The metrics ``metrics.json`` holds (this rank's view; rank 0 writes them)."""
    model_args, state, tokens = inputs.model_args, run.trainer.state, inputs.tokens
    # Since step 0: earlier attempts up to the resumed checkpoint, then this one.
    runtime = watch.stream.restored_train_seconds + float(run.result.metrics["train_runtime"])
    seen = int(state.num_input_tokens_seen)
    before, after = final.history[0][1], final.history[-1][1]  # step 0: eval_on_start, the untrained model
    answers = final.answers
    return {
        "base_model": model_args.base_model,
        "dataset": inputs.data_args.dataset,
        "dataset_fingerprint": inputs.rows.data.fingerprint,
        "precision": inputs.hardware.precision,
        "world_size": args.world_size,
        "train_rows": len(tokens.train_set),
        "eval_rows": len(tokens.eval_set),
        "dropped_long_rows": tokens.dropped_train + tokens.dropped_eval,
        "skipped_bad_rows": inputs.rows.data.skipped_rows,
        "prompt_format": inputs.data_args.prompt_format,
        "end_marker": tokens.marker,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "eval_loss_history": final.history,
        "perplexity_before": math.exp(min(before, 50.0)),
        "perplexity_after": math.exp(min(after, 50.0)),
        "ended_share_base": answers[0]["ended_share"] if answers else None,
        "ended_share_final": answers[-1]["ended_share"] if answers else None,
        "evaluation": answers,
        "train_loss": whole_train_loss(state.log_history, start_step=run.start_step,
                                       attempt_loss=float(run.result.training_loss),
                                       global_step=int(state.global_step)),
        "train_runtime_s": runtime,
        "train_samples": round(len(tokens.train_set) * (state.epoch or 0.0)),  # sequences trained on
        "tokens": seen,
        "evaluation_generation_s": final.generation_s,
        # Training throughput: tokens over the seconds spent inside optimizer steps (forward,
        # backward, update), as the card plots it. "overall" also pays for evaluation,
        # checkpoints and data loading (not for the answer generation).
        "tokens_per_second": seen / watch.stream.step_seconds if watch.stream.step_seconds > 0 else 0.0,
        "tokens_per_second_overall": seen / (runtime - final.generation_s) if runtime > final.generation_s else 0.0,
        "global_step": int(state.global_step),
        "epochs": float(state.epoch or 0.0),
        "total_runtime_s": time.time() - started,  # this attempt, start-up included
        "resumed_from_step": run.start_step,
        "peft": model_args.peft,
        "lora": ({"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": model_args.lora_dropout,
                  "target_modules": model_args.lora_target_modules, "merged": model_args.merge_adapter}
                 if model_args.peft != "none" else None),
        "trainable_parameters": built.trainable,
        "parameters": built.parameters,
        # The newest checkpoint on this node's disk (model or adapter, optimizer and trainer state).
        "checkpoint_bytes": _newest_checkpoint_bytes(output_dir / "checkpoints"),
        # This rank's peak so far: GPU memory the tensors took, else (CPU) the process's resident set.
        "peak_memory_bytes": _peak_memory_bytes(inputs.hardware.cuda),
    }


def publish(metrics: dict[str, Any], run: Fit, inputs: RunInputs, train_args: TrainArguments, watch: Watchers,
            *, output_dir: Path, adapter_dir: Path, dtype: Any, cache_dir: Path) -> None:
    """Rank 0: the tokenizer beside the weights, the adapter merged, ``metrics.json``, the
    model and logs uploaded. Raises UploadsFailed, after all of it, for what did not upload."""
    not_uploaded = []
    if watch.uploader is not None:
        watch.uploader.close()
        metrics["checkpoints_uploaded"] = [m["name"] for m in watch.uploader.uploaded]
        not_uploaded += watch.uploader.failures
    if run.trainer.is_world_process_zero():
        merged = _write_model(metrics, inputs, train_args, output_dir, adapter_dir, dtype, cache_dir)
        watch.stream.end(metrics["global_step"], "done")  # training is done, whatever the uploads below do
        if train_args.s3_uri:
            not_uploaded += _upload_model(metrics, output_dir, train_args.s3_uri, watch, merged=merged)
        log(
            f"done: eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}, "
            f"{metrics['global_step']} steps, {metrics['tokens_per_second']:.0f} tokens/s; model in {output_dir}"
        )
    if not_uploaded:
        raise UploadsFailed(
            f"Training finished: the model is in {output_dir}, the checkpoints in {output_dir / 'checkpoints'}; "
            "these did not upload:\n  " + "\n  ".join(not_uploaded)
        )


def _write_model(metrics: dict[str, Any], inputs: RunInputs, train_args: TrainArguments, output_dir: Path,
                 adapter_dir: Path, dtype: Any, cache_dir: Path) -> bool:
    """The tokenizer saved, the adapter merged (returns whether), ``metrics.json`` written."""
    model_args = inputs.model_args
    inputs.tokens.tokenizer.save_pretrained(str(adapter_dir))
    merged = adapter_dir != output_dir
    if merged:
        metrics["adapter_bytes"] = _bytes_in(adapter_dir)
        log(f"merging the adapter ({metrics['adapter_bytes'] / 1e6:.1f} MB) into the base model")
        save_merged(adapter_dir, output_dir, dtype=dtype, trust_remote_code=model_args.trust_remote_code,
                    cache_dir=cache_dir)
    elif model_args.peft != "none":
        adapter_files = [f for f in published_files(output_dir, merged_adapter=False) if f.name != METRICS_FILE]
        metrics["adapter_bytes"] = sum((output_dir / f).stat().st_size for f in adapter_files)
    if train_args.s3_uri:
        metrics["model_location"] = f"{train_args.s3_uri.rstrip('/')}/model"
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return merged


def _upload_model(metrics: dict[str, Any], output_dir: Path, s3_uri: str, watch: Watchers, *,
                  merged: bool) -> list[str]:
    """The model and TensorBoard logs to ``<s3_uri>/model`` and ``/logs``, then ``s3_uploads.json``;
    returns what did not upload."""
    run_store = S3CheckpointStore(s3_uri)
    try:
        model_manifest = publish_model(output_dir, published_files(output_dir, merged_adapter=merged), run_store)
        if events := tensorboard_files(output_dir):  # tensorboard --logdir s3://.../logs
            publish_model(output_dir, events, run_store, name="logs", folder="logs")
        kept = set(S3CheckpointStore(f"{run_store.uri}/checkpoints").names())
    except CheckpointStoreError as err:
        return [f"the model ({metrics['model_location']}): {err}"]
    uploaded = watch.uploader.uploaded if watch.uploader is not None else []
    uploads = {
        "model_location": metrics["model_location"],
        "model": model_manifest,
        "checkpoints": {f"{run_store.uri}/checkpoints/{m['name']}": m for m in uploaded if m["name"] in kept},
    }
    # Written after the model upload, so it is not part of it: the flow reads it.
    (output_dir / UPLOADS_FILE).write_text(json.dumps(uploads, indent=1))
    log(f"final model uploaded to {metrics['model_location']}")
    return []


def published_files(output_dir: Path, *, merged_adapter: bool) -> list[Path]:
    """What of ``output_dir`` is the model (paths relative to it): the names PUBLISHED allows, at
    its top and, when the adapter was merged, in its adapter/ folder; regular files, never a symlink."""
    folders = [output_dir, output_dir / ADAPTER_DIR] if merged_adapter else [output_dir]
    return [path.relative_to(output_dir) for folder in folders if folder.is_dir() and not folder.is_symlink()
            for path in sorted(folder.iterdir())
            if not path.is_symlink() and path.is_file() and any(fnmatch(path.name, p) for p in PUBLISHED)]


def publish_model(output_dir: Path, files: list[Path], store: S3CheckpointStore, *, name: str = "model",
                  folder: str = "") -> dict[str, Any]:
    """Upload ``files`` of ``output_dir / folder`` (published_files, tensorboard_files) as
    ``<store uri>/<name>``; returns the manifest. The store uploads whole folders: the files are
    hard-linked into a staging folder that holds nothing else, and that folder is uploaded."""
    source = output_dir / folder
    staged = output_dir / STAGING / name
    shutil.rmtree(staged, ignore_errors=True)
    try:
        for relative in files:
            (staged / relative).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / relative, staged / relative)
            except OSError:  # a file system without hard links: a copy, for the upload's duration
                shutil.copy2(source / relative, staged / relative)
        return store.upload(staged, name=name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def tensorboard_files(output_dir: Path) -> list[Path]:
    """TensorBoard's event files under ``output_dir/logs`` (relative to it), regular files only:
    with ``--output_dir .`` a user's own ``logs/`` folder is not uploaded with them."""
    logs = output_dir / "logs"
    return sorted(path.relative_to(logs) for path in logs.rglob("events.out.tfevents.*")
                  if path.is_file() and not path.is_symlink()) if logs.is_dir() else []


def _bytes_in(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _peak_memory_bytes(cuda: bool) -> int:
    import resource

    import torch

    if cuda:
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _newest_checkpoint_bytes(checkpoints: Path) -> int | None:
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    return _bytes_in(found[-1]) if found else None
