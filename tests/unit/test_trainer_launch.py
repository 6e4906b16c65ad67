"""The config's "training" section becomes the trainer's command line: every key, or an error."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import REPO
from training.arguments import find_problems, parse_args

sys.path.insert(0, str(REPO / "flows"))  # the flow's own modules, as the flow imports them
from trainer_argv import trainer_arguments, training_section_problems

FLOW_VALUES = dict(base_model="bundled", dataset="data.jsonl", deepspeed_config="ds_configs/zero2.json", epochs=1.0,
                   max_steps=-1, learning_rate=1e-4, batch_size=4, peft="none")


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

    launch = launch_command(["--max_steps", "1"], 2)
    port = launch.command[launch.command.index("--master_port") + 1]
    assert launch.port == port
    shm = Path("/dev/shm")
    mine = [shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}" for rank in (0, 1)]
    other = shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{int(port) + 1}_0"
    try:
        for path in [*mine, other]:
            path.write_bytes(b"x")
        assert sorted(release_shared_memory(launch)) == sorted(p.name for p in mine)
        assert not any(p.exists() for p in mine) and other.exists()
    finally:
        other.unlink(missing_ok=True)


def test_lora_settings_reach_the_trainer_and_bad_ones_are_named():
    training = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "lora_target_modules": "q_proj,v_proj",
                "merge_adapter": False}
    assert training_section_problems(training) == []
    argv = trainer_arguments(**{**FLOW_VALUES, "peft": "lora"}, training=training)
    model_args, _, _ = parse_args(argv)
    assert (model_args.peft, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == ("lora", 8, 16, 0.1)
    assert model_args.lora_target_modules == "q_proj,v_proj" and model_args.merge_adapter is False
    bad = {"lora_r": 0, "lora_alpha": -1, "lora_dropout": 1.0, "lora_target_modules": " , "}
    problems = find_problems(*parse_args(trainer_arguments(**{**FLOW_VALUES, "peft": "lora"}, training=bad)))
    assert problems == [
        "--lora_r: must be a positive rank (8, 16, 64...), got 0.",
        "--lora_alpha: must be positive (usually 2 x --lora_r), got -1.0.",
        "--lora_dropout: must be in [0, 1), got 1.0.",
        "--lora_target_modules: empty; use all-linear or names such as q_proj,v_proj.",
    ]
    # Full fine-tuning ignores the LoRA settings; an unknown method is named.
    assert find_problems(*parse_args(trainer_arguments(**FLOW_VALUES, training=bad))) == []
    assert find_problems(*parse_args(trainer_arguments(**{**FLOW_VALUES, "peft": "dora"}, training={}))) == [
        "--peft: 'dora' is not one of none, lora, qlora."]


def test_qlora_under_zero3_is_refused_with_the_reason_and_the_fix():
    values = {**FLOW_VALUES, "peft": "qlora", "deepspeed_config": "ds_configs/zero3.json"}
    problems = find_problems(*parse_args(trainer_arguments(**values, training={})))
    assert len(problems) == 1 and problems[0].startswith("--peft qlora cannot run under ZeRO-3")
    assert "ds_configs/zero2.json" in problems[0] and "--peft lora with ZeRO-3" in problems[0]
    values["deepspeed_config"] = "ds_configs/zero2.json"
    assert find_problems(*parse_args(trainer_arguments(**values, training={}))) == []


def test_target_modules_the_model_lacks_are_listed_with_the_ones_it_has(tiny_model_dir):
    from training.adapters import peft_problems

    argv = trainer_arguments(**{**FLOW_VALUES, "peft": "lora", "base_model": str(tiny_model_dir)},
                             training={"lora_target_modules": "q_proj,query_key_value"})
    model_args, _, _ = parse_args(argv)
    assert peft_problems(model_args, str(tiny_model_dir)) == [
        f"--lora_target_modules: query_key_value not in {tiny_model_dir}; its linear layers are "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or use all-linear)."
    ]
    model_args.lora_target_modules = "all-linear"
    assert peft_problems(model_args, str(tiny_model_dir)) == []


def test_prompt_format_and_chat_template_reach_the_trainer_and_bad_values_are_named(tmp_path):
    assert training_section_problems({"prompt_format": "chat", "chat_template": "chatml"}) == []
    _, data_args, _ = parse_args(trainer_arguments(**FLOW_VALUES, prompt_format="chat", chat_template="chatml",
                                                   training={}))
    assert (data_args.prompt_format, data_args.chat_template) == ("chat", "chatml")
    assert find_problems(*parse_args(trainer_arguments(**FLOW_VALUES, prompt_format="chat", chat_template="chatml",
                                                       training={}))) == []

    def problems(prompt_format: str, chat_template: str) -> list[str]:
        argv = trainer_arguments(**FLOW_VALUES, prompt_format=prompt_format, chat_template=chat_template, training={})
        return find_problems(*parse_args(argv))

    assert problems("chatty", "") == ["--prompt_format: 'chatty' is not one of dolly, chat."]
    assert problems("dolly", "chatml") == ["--chat_template chatml: applies to --prompt_format chat only (this run: "
                                           "dolly); drop it, or set --prompt_format chat."]
    (missing,) = problems("chat", str(tmp_path / "none.jinja"))
    assert missing.startswith(f"--chat_template: {tmp_path / 'none.jinja'} is neither 'chatml' "
                              "nor an existing Jinja file")
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}")
    assert problems("chat", str(template)) == []


def test_one_rank_runs_the_trainer_itself_and_several_through_a_launcher():
    """One rank on one node: no launcher chain, the rendezvous in the environment; several GPUs:
    DeepSpeed's launcher; several nodes: torchrun with this node's rank and the run's port."""
    from trainer_launch import Nodes, launch_command

    one = launch_command(["--max_steps", "1"], 1)
    assert one.command == [sys.executable, "-m", "training.trainer", "--max_steps", "1"]
    assert one.env["MASTER_PORT"] == one.port and one.port.isdigit()
    assert {k: one.env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    four = launch_command(["--max_steps", "1"], 4)
    assert Path(four.command[0]).name == "deepspeed" and four.env == {}
    assert four.command[1:5] == ["--num_gpus", "4", "--master_port", four.port]
    nodes = launch_command(["--max_steps", "1"], 2, Nodes(count=2, rank=1, main_addr="10.0.0.1", port=23456))
    assert nodes.command[1:3] == ["-m", "torch.distributed.run"] and nodes.port == "23456"
    assert nodes.command[nodes.command.index("--node_rank") + 1] == "1"
    assert nodes.command[-3:] == ["training.trainer", "--max_steps", "1"]
