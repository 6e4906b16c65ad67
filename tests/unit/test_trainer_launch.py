"""The config's "training" section becomes the trainer's command line: every key, or an error."""

from __future__ import annotations

import sys

from tests.conftest import REPO
from training.arguments import find_problems, parse_args

sys.path.insert(0, str(REPO / "flows"))  # the flow's own modules, as the flow imports them
from trainer_launch import trainer_arguments, training_section_problems  # noqa: E402

FLOW_VALUES = dict(base_model="bundled", dataset="data.jsonl", deepspeed_config="ds_configs/zero2.json", epochs=1.0,
                   max_steps=-1, learning_rate=1e-4, batch_size=4)


def test_switches_and_values_reach_the_trainer_parser():
    training = {"packing": True, "group_by_length": False, "gradient_checkpointing": True,
                "attn_implementation": "sdpa", "gradient_accumulation_steps": 3, "eval_batch_size": 2}
    assert training_section_problems(training) == []
    model_args, data_args, train_args = parse_args(trainer_arguments(**FLOW_VALUES, training=training))
    assert train_args.packing and not train_args.group_by_length and model_args.gradient_checkpointing
    assert model_args.attn_implementation == "sdpa" and train_args.gradient_accumulation_steps == 3
    assert (train_args.per_device_train_batch_size, train_args.per_device_eval_batch_size) == (4, 2)
    assert not model_args.trust_remote_code  # absent switches keep the trainer's default
    # group_by_length is on by default, so a config that leaves it out keeps it on.
    _, _, train_args = parse_args(trainer_arguments(**FLOW_VALUES, training={}))
    assert train_args.group_by_length and not train_args.packing
    assert find_problems(*parse_args(trainer_arguments(**FLOW_VALUES, training=training))) == []


def test_unknown_keys_and_non_boolean_switches_are_refused_with_the_fix():
    problems = training_section_problems({"grad_accumulation_steps": 4, "packing": "yes", "flux": 1})
    assert len(problems) == 3
    assert problems[0].startswith("config training: unknown key 'flux'.")
    assert "unknown key 'grad_accumulation_steps'. Did you mean 'gradient_accumulation_steps'?" in problems[1]
    assert "Known keys: " in problems[1] and "packing" in problems[1]
    assert problems[2] == "config training.packing: must be true or false, got 'yes'."


def test_segments_of_killed_ranks_are_removed_by_launch_port(tmp_path):
    """Only this launch's segments (its master port) go; another job's stay."""
    import os
    from pathlib import Path

    from trainer_launch import launch_command, release_shared_memory

    command = launch_command(["--max_steps", "1"], 2)
    port = command[command.index("--master_port") + 1]
    shm = Path("/dev/shm")
    mine = [shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}" for rank in (0, 1)]
    other = shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{int(port) + 1}_0"
    try:
        for path in [*mine, other]:
            path.write_bytes(b"x")
        assert sorted(release_shared_memory(command)) == sorted(p.name for p in mine)
        assert not any(p.exists() for p in mine) and other.exists()
    finally:
        other.unlink(missing_ok=True)
