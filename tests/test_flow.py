"""DollyFlow as users run it: through Metaflow's Runner and as `python flows/dolly_flow.py run`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, flow_env, python_env, run_bounded, write_config, write_jsonl

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
    # one CPU rank: the trainer itself, no launcher chain (flows/trainer_launch.py)
    assert re.search(r"Launching: \S+ -m training\.trainer ", log) and "The trainer exited with code 0" in log
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
                 "--deepspeed-config", "--peft", "--prompt-format", "--chat-template"):
        assert name in result.stdout, name


def run_flow(config: Path | str, flow_home: Path, *args: str) -> tuple[int, str]:
    """``python flows/dolly_flow.py --config config <config> run <args>``: exit code and output."""
    result = run_bounded([sys.executable, str(FLOW), "--config", "config", str(config), "run", *args],
                         cwd=flow_home, env=flow_env(flow_home), timeout=600)
    return result.returncode, result.stdout + result.stderr


def bad_input_runs(tiny_config: Path, tmp: Path) -> dict[str, tuple[str, list[str], list[str]]]:
    """Bad inputs grouped so that one `start` reports several at once, as it lists every problem:
    run -> (config, flow arguments, what the output must say). One data set and one instruction
    file per run."""
    # A directory of every way a data file can be unreadable: a malformed line, a line nested
    # 100k deep (RecursionError in json.loads), a binary file, a corrupt parquet.
    data_dir = tmp / "data"
    data_dir.mkdir()
    malformed = data_dir / "bad.jsonl"
    malformed.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a", \n'
                         + "[" * 100_000 + "]" * 100_000 + "\n")
    binary = b"\x1f\x8b\x08\x00" + bytes(range(256))  # a gzip header: not UTF-8
    (data_dir / "binary.jsonl").write_bytes(binary)
    (data_dir / "corrupt.parquet").write_bytes(b"PAR1" + binary)
    binary_file = tmp / "binary.jsonl"
    binary_file.write_bytes(binary)
    binary_template = tmp / "binary.jinja"
    binary_template.write_bytes(binary)
    zero_not_object = tmp / "zero-string.json"
    zero_not_object.write_text(json.dumps({"zero_optimization": "3"}))
    no_response = write_jsonl(tmp / "noresp.jsonl", [
        {"instruction": "a", "response": "b"}, {"instruction": "a"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    ])
    stage_7 = tmp / "ds.json"
    stage_7.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    bad_instructions = tmp / "eval.jsonl"
    bad_instructions.write_text('{"instruction": "ok"}\n{"context": "no instruction"}\n')
    return {
        # The bundled model is converted only when every other input is right: problems found
        # without it must not also bring a warning that its size could not be read.
        "numbers, instructions and DeepSpeed config on the default preset": (
            str(REPO / "flows" / "configs" / "local-cpu.json"),
            ["--batch-size", "0", "--eval-instructions", str(binary_file), "--deepspeed-config", str(zero_not_object)],
            ["--batch-size: must be positive, got 0.",
             f"--eval-instructions: {binary_file} is not UTF-8 text (byte 0x8b at offset 1",
             f"--deepspeed-config: {zero_not_object} has zero_optimization '3', a string; it must be an object"],
        ),
        "missing data, numbers, model, DeepSpeed, instructions": (
            str(tiny_config),
            ["--dataset", str(tmp / "nope.jsonl"), "--batch-size", "0", "--deepspeed-config", str(stage_7),
             "--base-model", str(tmp / "no-model"), "--eval-instructions", str(bad_instructions),
             "--prompt-format", "chat", "--chat-template", str(binary_template)],
            ["nope.jsonl does not exist", "--batch-size: must be positive, got 0.", "--deepspeed-config: ",
             "zero_optimization.stage 7", "no-model does not exist",
             "eval.jsonl line 2: needs a non-empty 'instruction' string",
             f"--chat-template: {binary_template} is not UTF-8 text (byte 0x8b at offset 1"],
        ),
        "unreadable data, missing instructions, chat without a template": (
            str(tiny_config),
            ["--dataset", str(data_dir), "--eval-instructions", str(tmp / "nothing.jsonl"), "--prompt-format", "chat"],
            ["bad.jsonl line 2: not valid JSON", "or set config training.skip_bad_rows to skip",
             "bad.jsonl line 3: JSON nested deeper than Python's recursion limit",
             "binary.jsonl: not UTF-8 text (byte 0x8b at offset 1", "corrupt.parquet: not a readable parquet file",
             "nothing.jsonl does not exist",
             "has no chat template. Set one with --chat-template chatml (adds <|im_start|>/<|im_end|>)"],
        ),
        # A typo in the config's training section is an error, not a silently ignored setting.
        # A multi-node preset (num_nodes 2) is refused by DollyFlow, which trains on one node.
        "row without a response, unknown config key, LoRA settings, sequence length, nodes": (
            two_nodes(write_config(tiny_config, tmp, gradient_checkpoint=True, lora_r=0,
                                   lora_target_modules="q_proj,query_key_value", max_seq_length=1_000_000_000)),
            ["--dataset", str(no_response), "--peft", "qlora", "--deepspeed-config", "ds_configs/zero3.json"],
            ["noresp.jsonl line 2: no 'response' (Dolly schema), 'output' (Alpaca)",
             "noresp.jsonl line 3: a conversation with 4 turns; the Dolly prompt format holds one user turn",
             "train it with --prompt-format chat",
             "unknown key 'gradient_checkpoint'. Did you mean 'gradient_checkpointing'?",
             "config training.lora_r: must be a positive rank (8, 16, 64...), got 0.",
             "config training.lora_target_modules: query_key_value not in ",
             "its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or use all-linear)",
             "--peft qlora cannot run under ZeRO-3 (--deepspeed-config ds_configs/zero3.json)",
             "config training.max_seq_length: 1000000000 is more than ",
             " takes (1024 positions); use config training.max_seq_length 1024 or less.",
             "num_nodes is 2: run this preset with flows/dolly_multinode_flow.py"],
        ),
    }


def two_nodes(config: str) -> str:
    """``config`` with num_nodes 2 (a multi-node preset)."""
    values = json.loads(Path(config).read_text())
    values["num_nodes"] = 2
    Path(config).write_text(json.dumps(values))
    return config


@pytest.mark.parametrize("case", ["numbers, instructions and DeepSpeed config on the default preset",
                                  "missing data, numbers, model, DeepSpeed, instructions",
                                  "unreadable data, missing instructions, chat without a template",
                                  "row without a response, unknown config key, LoRA settings, sequence length, nodes"])
def test_bad_inputs_stop_in_start(tiny_config, flow_home, tmp_path, case):
    config, args, expected = bad_input_runs(tiny_config, tmp_path)[case]
    returncode, output = run_flow(config, flow_home, *args)
    assert returncode != 0
    assert "DollyFlow cannot start" in output, output[-3000:]
    missing = [message for message in expected if message not in output]
    assert not missing, (missing, output[-3000:])
    assert "Preflight warning" not in output, output[-3000:]  # only the problems
    assert "Internal error" not in output and "Traceback" not in output, output[-3000:]
    assert "/start/" in output and "/train/" not in output  # stopped before any training task


def test_trainer_failure_fails_the_train_step_with_the_trainers_error(tiny_config, flow_home, tmp_path, monkeypatch):
    # Passes every start check, but every row is longer than 24 tokens: the trainer stops.
    returncode, output = run_flow(write_config(tiny_config, tmp_path, max_seq_length=24), flow_home)
    assert returncode != 0
    assert "/train/" in output and "The trainer failed" in output, output[-3000:]
    assert "every train row is longer than --max_seq_length 24" in output

    # The failed step still has its profile: artifacts and a rendered gpu_profile card.
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_LOCAL", str(flow_home))
    from metaflow import Flow, metadata, namespace
    from metaflow.cards import get_cards

    # The client reads the environment once, when Metaflow is first imported: under xdist another
    # test of this worker may have imported it with another datastore root. Point it here.
    metadata(f"local@{flow_home}")
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
