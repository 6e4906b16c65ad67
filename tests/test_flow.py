"""DollyFlow as users run it: through Metaflow's Runner and as `python flows/dolly_flow.py run`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, flow_env, python_env, write_config, write_jsonl

FLOW = REPO / "flows" / "dolly_flow.py"


def test_tiny_flow_trains_and_publishes_a_model(tiny_run, flow_home):
    run, log = tiny_run
    start, end = run["start"].task.data, run["end"].task.data
    assert start.config["preset"] == "tiny-test"
    assert start.config["dataset_rows"] == {"train": 48, "eval": 16}
    assert len(start.dataset_fingerprint) == 64
    metrics = end.training_metrics
    for key in ("eval_loss_before", "eval_loss_after", "train_loss", "train_runtime_s", "tokens_per_second",
                "global_step"):
        assert key in metrics, key
    assert metrics["global_step"] == 4
    evaluation = run["train"].task.data.evaluation
    assert [point["label"] for point in evaluation] == ["base", "epoch 0.33"]  # 4 of 12 steps per epoch
    assert metrics["ended_share_base"] == evaluation[0]["ended_share"]
    location = Path(end.model_location)
    assert location.is_dir() and location.is_relative_to(flow_home / "models")
    # the trainer's output was streamed into the task log while it ran
    assert "[trainer] step 4/4" in log
    assert "Launching: " in log and "--module training.trainer" in log
    assert "python -m training.generate --model" in log

    from training.generate import generate_response, load_for_generation

    model, tokenizer = load_for_generation(str(location))
    answer = generate_response(model, tokenizer, "Name a color.", max_new_tokens=6)
    assert answer.new_tokens <= 6


def test_run_help_lists_parameters_with_help():
    result = subprocess.run([sys.executable, str(FLOW), "run", "--help"], env=python_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("--base-model", "--dataset", "--epochs", "--max-steps", "--learning-rate", "--batch-size",
                 "--deepspeed-config"):
        assert name in result.stdout, name


def _write_bad(tmp: Path, kind: str) -> list[str]:
    if kind == "missing-dataset":
        return ["--dataset", str(tmp / "nope.jsonl")]
    if kind == "malformed-json":
        path = tmp / "bad.jsonl"
        path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a", \n')
        return ["--dataset", str(path)]
    if kind == "row-without-response":
        path = write_jsonl(tmp / "noresp.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "a"}])
        return ["--dataset", str(path)]
    if kind == "unknown-zero-stage":
        path = tmp / "ds.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
        return ["--deepspeed-config", str(path)]
    if kind == "batch-size-zero":
        return ["--batch-size", "0"]
    if kind == "missing-model-dir":
        return ["--base-model", str(tmp / "no-model")]
    if kind == "malformed-eval-instructions":
        path = tmp / "eval.jsonl"
        path.write_text('{"instruction": "ok"}\n{"context": "no instruction"}\n')
        return ["--eval-instructions", str(path)]
    if kind == "missing-eval-instructions":
        return ["--eval-instructions", str(tmp / "nothing.jsonl")]
    if kind == "two-problems":
        return ["--batch-size", "0", "--dataset", str(tmp / "nope.jsonl")]
    raise AssertionError(kind)


def run_flow(config: Path | str, flow_home: Path, *args: str) -> tuple[int, str]:
    """``python flows/dolly_flow.py --config config <config> run <args>``: exit code and output."""
    result = subprocess.run(
        [sys.executable, str(FLOW), "--config", "config", str(config), "run", *args],
        cwd=flow_home, env=flow_env(flow_home), capture_output=True, text=True, timeout=300,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing-dataset", "nope.jsonl does not exist"),
        ("malformed-json", "bad.jsonl line 2: not valid JSON"),
        ("malformed-json", "or set config training.skip_bad_rows to skip"),
        ("row-without-response", "noresp.jsonl line 2: no 'response' (Dolly schema) or 'output'"),
        ("unknown-zero-stage", "--deepspeed-config: "),
        ("unknown-zero-stage", "zero_optimization.stage 7"),
        ("batch-size-zero", "--batch-size: must be positive, got 0"),
        ("missing-model-dir", "no-model does not exist"),
        ("malformed-eval-instructions", "eval.jsonl line 2: needs a non-empty 'instruction' string"),
        ("missing-eval-instructions", "nothing.jsonl does not exist"),
        ("two-problems", "--batch-size: must be positive, got 0."),
        ("two-problems", "--dataset: "),
    ],
)
def test_bad_inputs_stop_in_start(tiny_config, flow_home, tmp_path, kind, expected):
    returncode, output = run_flow(tiny_config, flow_home, *_write_bad(tmp_path, kind))
    assert returncode != 0
    assert "DollyFlow cannot start" in output and expected in output, output[-3000:]
    assert "/start/" in output and "/train/" not in output  # stopped before any training task


def test_unknown_config_keys_stop_in_start(tiny_config, flow_home, tmp_path):
    """A typo in the config's training section is an error, not a silently ignored setting."""
    returncode, output = run_flow(write_config(tiny_config, tmp_path, gradient_checkpoint=True), flow_home)
    assert returncode != 0
    assert "DollyFlow cannot start" in output, output[-3000:]
    assert "unknown key 'gradient_checkpoint'. Did you mean 'gradient_checkpointing'?" in output
    assert "/train/" not in output


def test_trainer_failure_fails_the_train_step_with_the_trainers_error(tiny_config, flow_home, tmp_path, monkeypatch):
    # Passes every start check, but every row is longer than 24 tokens: the trainer stops.
    returncode, output = run_flow(write_config(tiny_config, tmp_path, max_seq_length=24), flow_home)
    assert returncode != 0
    assert "/train/" in output and "The trainer failed" in output, output[-3000:]
    assert "every train row is longer than --max_seq_length 24" in output

    # The failed step still has its profile: artifacts and a rendered gpu_profile card.
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_LOCAL", str(flow_home))
    from metaflow import Flow, namespace
    from metaflow.cards import get_cards

    namespace(None)
    run_id = re.search(r"Workflow starting \(run-id (\w+)\)", output).group(1)
    task = Flow("DollyFlow")[run_id]["train"].task
    assert not task.successful
    assert task["gpu_profile_data"].data["host"]["t"]
    assert len(get_cards(task, id="gpu_profile")) == 1


def test_code_package_ships_training_ds_configs_and_presets():
    result = subprocess.run([sys.executable, str(FLOW), "package", "list"], env=python_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = result.stdout + result.stderr
    for relative in ("training/trainer.py", "training/data/dolly_sample/train.jsonl", "ds_configs/zero2.json",
                     "gpu_profile/decorator.py", "gpu_profile/sampler.py", "gpu_profile/render.py",
                     "ds_configs/a100x4.json", "flows/configs/local-cpu.json", "flows/trainer_launch.py"):
        assert str(REPO / relative) in listed, relative
