"""The trainer's command line from the flow's parameters and its preset's ``training`` section.

    argv = trainer_arguments(base_model=..., dataset=..., epochs=1, ..., training={"lora_r": 8})
    training_section_problems({"grad_accumulation_steps": 4})   # ["config training: unknown key ... Did you mean ..."]

``flows/trainer_launch.py`` runs the command this builds.
"""

from __future__ import annotations

from typing import Any


def trainer_arguments(
    *,
    base_model: str,
    dataset: str,
    deepspeed_config: str,
    epochs: float,
    max_steps: int,
    learning_rate: float,
    batch_size: int,
    peft: str,
    training: dict[str, Any],
    prompt_format: str = "dolly",
    chat_template: str = "",
) -> list[str]:
    """The trainer's command-line arguments from the flow's parameters and config ``training``.

    The train step adds ``--output_dir``, which only it knows.
    """
    values: dict[str, Any] = {
        "base_model": base_model,
        "dataset": dataset,
        "deepspeed": deepspeed_config,
        "epochs": epochs,
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "per_device_train_batch_size": batch_size,
        "peft": peft,
        "prompt_format": prompt_format,
        "chat_template": chat_template,
        "per_device_eval_batch_size": training.get("eval_batch_size", batch_size),
    }
    for name in PASSED_THROUGH:
        if name in training:
            values[name] = training[name]
    for name in SWITCHES:  # explicit true/false: group_by_length is on by default
        if name in training:
            values[name] = "true" if training[name] else "false"
    argv = []
    for name, value in values.items():
        argv += [f"--{name}", str(value)]
    return argv



# The config's "training" keys that become trainer flags of the same name, as values...
PASSED_THROUGH = (
    "gradient_accumulation_steps",
    "warmup_steps",
    "weight_decay",
    "max_seq_length",
    "precision",
    "attn_implementation",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "test_size",
    "sample_fraction",
    "seed",
    "cache_dir",
    "eval_max_new_tokens",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
)



# ...as JSON true/false switches...
SWITCHES = ("gradient_checkpointing", "trust_remote_code", "skip_bad_rows", "group_by_length", "packing",
            "merge_adapter")



# ...and the ones the flow reads itself (parameter defaults; the eval batch falls back to batch_size).
FLOW_KEYS = ("batch_size", "eval_batch_size", "epochs", "max_steps", "learning_rate", "peft", "prompt_format",
             "chat_template")



def training_section_problems(training: dict[str, Any]) -> list[str]:
    """Keys of the config's "training" section that would otherwise be silently ignored."""
    import difflib

    known = (*FLOW_KEYS, *PASSED_THROUGH, *SWITCHES)
    problems = []
    for key in sorted(set(training) - set(known)):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        problems.append(f"config training: unknown key {key!r}.{hint} Known keys: {', '.join(sorted(known))}.")
    for key in SWITCHES:
        if key in training and not isinstance(training[key], bool):
            problems.append(f"config training.{key}: must be true or false, got {training[key]!r}.")
    return problems
