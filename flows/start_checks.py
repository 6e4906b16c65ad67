"""What `start` checks before any GPU is spent: one run (DollyFlow), or every point of a sweep.

``InputChecker(flow).check(point)`` builds the trainer's command line of one run (the flow's
parameters and preset, with a sweep point's settings on top), parses it with the trainer's own
parser and runs every check the trainer would: numbers, DeepSpeed config, the data (every bad
row), the model's layers for LoRA, the chat template, the declared hardware's preflight. The data
and the model are read once for all points. Problems come back in the flow's terms
(``in_flow_terms``): ``--learning-rate``, ``config training.lora_r``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from preflight_checks import start_preflight
from trainer_argv import trainer_arguments, training_section_problems

# The trainer's flags that the flow exposes as parameters; every other trainer flag is set by
# the config's "training" section. Problems are reported in the flow's terms.
PARAMETER_FOR_FLAG = {
    "base_model": "--base-model",
    "dataset": "--dataset",
    "deepspeed": "--deepspeed-config",
    "epochs": "--epochs",
    "max_steps": "--max-steps",
    "learning_rate": "--learning-rate",
    "per_device_train_batch_size": "--batch-size",
    "peft": "--peft",
    "prompt_format": "--prompt-format",
    "chat_template": "--chat-template",
    "eval_instructions": "--eval-instructions",
}
CONFIG_KEY_FOR_FLAG = {"per_device_eval_batch_size": "eval_batch_size"}
# Config "training" keys that are the defaults of flow parameters (a sweep point may set them).
PARAMETER_KEYS = ("epochs", "max_steps", "learning_rate", "batch_size", "peft", "prompt_format", "chat_template")


def in_flow_terms(problem: str) -> str:
    """Rename trainer flags in a problem to the flow parameter or config key that sets them."""

    def rename(match: re.Match) -> str:
        name = match.group(1)
        if name in PARAMETER_FOR_FLAG:
            return PARAMETER_FOR_FLAG[name]
        return f"config training.{CONFIG_KEY_FOR_FLAG.get(name, name)}"

    return re.sub(r"--(\w+)", rename, problem)


@dataclass
class CheckedRun:
    """One run's checked inputs: what `start` records and `train` launches."""

    trainer_argv: list[str]
    config: dict[str, Any]
    preflight: dict | None = None
    data: Any = None  # training.dataset.InstructionData
    warnings: list[str] = field(default_factory=list)


def run_values(flow: Any, point: dict[str, Any]) -> dict[str, Any]:
    """``trainer_arguments`` keywords: the flow's parameters and preset, with ``point`` on top."""
    values = {key: getattr(flow, key) for key in PARAMETER_KEYS}
    training = dict(flow.settings.training)
    for key, value in point.items():
        if key in PARAMETER_KEYS:
            values[key] = value
        else:
            training[key] = value
    return dict(base_model=flow.base_model, dataset=flow.dataset, deepspeed_config=flow.deepspeed_config,
                training=training, **values)


class InputChecker:
    """Checks runs of one flow; reads the data and resolves the model once for all of them."""

    def __init__(self, flow: Any):
        self.flow = flow
        self._data: dict[tuple, Any] = {}
        self._models: dict[str, Any] = {}
        self._positions: dict[tuple[str, bool], int | None] = {}

    def check(self, point: dict[str, Any], *, already_wrong: bool = False) -> tuple[list[str], CheckedRun]:
        """(problems in the flow's terms, the checked run). ``already_wrong``: problems outside
        this run were found, so the bundled model is not converted (~30 s) just to check it."""
        from training.adapters import peft_problems
        from training.arguments import find_problems, parse_args
        from training.base_model import check_base_model
        from training.chat import check_chat_template_setting

        flow = self.flow
        values = run_values(flow, point)
        argv = trainer_arguments(**values) + ["--eval_instructions", flow.eval_instructions]
        # The trainer's own parser and checks: start fails with the message the trainer would print.
        model_args, data_args, train_args = parse_args(argv)
        problems = training_section_problems(values["training"])
        problems += find_problems(model_args, data_args, train_args)
        # Every problem at once: the data is checked even when a number is already wrong.
        data, problem = self._load_data(data_args)
        problems += [problem] if problem else []
        resolved_model = model_args.base_model
        model_resolved = False  # the model's config can be read (for its size) only once resolved
        # Resolving may convert the bundled model (~30 s once): only worth it if all else is fine.
        # Another model resolves at once and its layers are checked with the other inputs.
        bundled = model_args.base_model.startswith("bundled:")
        if not check_base_model(model_args.base_model) and (not (problems or already_wrong) or not bundled):
            resolved_model, problem = self._resolve_model(model_args.base_model)
            if problem:
                problems.append(problem)
            else:
                model_resolved = True
                problems += peft_problems(model_args, resolved_model, data_args.cache_dir)
                problems += self._max_seq_length_problems(model_args, data_args, resolved_model)
                if data_args.prompt_format == "chat" and not check_chat_template_setting(
                        data_args.prompt_format, data_args.chat_template):
                    rows = data.train + data.eval if data is not None else []
                    problems += chat_template_problems(model_args, data_args, resolved_model, rows)
        # What the config declares about the hardware against the plan: precision, /dev/shm,
        # GPU memory. The train node checks again with its real facts.
        findings, preflight = start_preflight(flow.settings, model_args, data_args, train_args,
                                              resolved_model if model_resolved else None)
        problems += [f.message for f in findings if f.severity == "error"]
        warnings = [f"Preflight warning [{f.code}]: {in_flow_terms(f.message)}"
                    for f in findings if f.severity == "warning"]
        config = {
            "preset": flow.settings.name,
            "resources": dict(flow.settings.resources),
            "base_model": model_args.base_model,
            "base_model_resolved": resolved_model,
            "dataset": data_args.dataset,
            "dataset_rows": {"train": len(data.train), "eval": len(data.eval)} if data is not None else {},
            "deepspeed_config": train_args.deepspeed,
            "trainer_argv": argv,
            "training": {**values["training"], **{key: values[key] for key in PARAMETER_KEYS}},
        }
        return [in_flow_terms(p) for p in problems], CheckedRun(argv, config, preflight, data, warnings)

    def _load_data(self, data_args: Any) -> tuple[Any, str | None]:
        from training.dataset import DatasetError, load_instruction_data

        key = (data_args.dataset, data_args.skip_bad_rows, data_args.prompt_format)
        if key not in self._data:
            try:
                self._data[key] = (load_instruction_data(data_args.dataset, skip_bad_rows=data_args.skip_bad_rows,
                                                         prompt_format=data_args.prompt_format), None)
            except DatasetError as err:
                self._data[key] = (None, str(err))
        return self._data[key]

    def _max_seq_length_problems(self, model_args: Any, data_args: Any, model_path: str) -> list[str]:
        """--max_seq_length against the model's positions, read as the trainer reads them (from
        the tokenizer ``load_tokenizer`` sets up); once per model, not once per sweep point, and
        from the cache folder when an earlier run read this model (``ModelFactsCache``)."""
        from training.arguments import max_seq_length_problem
        from training.model_facts import ModelFactsCache

        key = (model_path, model_args.trust_remote_code)
        if key not in self._positions:
            try:
                self._positions[key] = ModelFactsCache(data_args.cache_dir).positions(
                    model_path, trust_remote_code=key[1])
            except OSError:  # a hub model on a laptop without hub access: the trainer checks before loading it
                self._positions[key] = None
        problem = max_seq_length_problem(data_args.max_seq_length, self._positions[key], model_args.base_model)
        return [problem] if problem else []

    def _resolve_model(self, name: str) -> tuple[str, str | None]:
        from training.base_model import BaseModelError, resolve_base_model

        if name not in self._models:
            try:
                self._models[name] = (resolve_base_model(name), None)
            except BaseModelError as err:
                self._models[name] = (name, str(err))
        return self._models[name]


@dataclass(frozen=True)
class RunWide:
    """What `start` resolves for the whole run, and the problems found doing so."""

    checkpoint_root: str  # where checkpoints and the model go ("": local disk only)
    resume_checkpoint: str  # the checkpoint --resume-from names, resolved ("": none)
    problems: list[str]


def run_wide_checks(flow: Any, flow_name: str, run_id: str) -> RunWide:
    """Checks that do not depend on the training settings: where checkpoints go, what to resume
    from, the node count, the evaluation instructions. The caller keeps the resolved values as
    the flow's artifacts (``checkpoint_root``, ``resume_checkpoint``)."""
    from run_storage import checkpoint_root_of, resolve_resume_from, run_s3_root

    from training.checkpoint_store import CheckpointStoreError
    from training.evaluation import (
        DEFAULT_EVAL_INSTRUCTIONS,
        EvalInstructionsError,
        load_eval_instructions,
    )

    problems = []
    checkpoint_root = checkpoint_root_of(flow.checkpoint_uri, run_s3_root(flow_name, run_id), flow_name, run_id)
    if checkpoint_root and not checkpoint_root.startswith("s3://"):
        problems.append(f"--checkpoint-uri: {flow.checkpoint_uri!r} is not an s3:// URL; pass s3://bucket/prefix.")
    resume_checkpoint = ""
    if flow.resume_from:
        try:
            resume_checkpoint = resolve_resume_from(flow.resume_from)
        except (ValueError, KeyError, CheckpointStoreError) as err:
            problems.append(f"--resume-from: {err}")
    nodes = int(flow.settings.get("num_nodes", 1))
    if nodes > 1 and not flow.MULTI_NODE:
        problems.append(
            f"config num_nodes is {nodes}: run this preset with flows/dolly_multinode_flow.py "
            "(the same flow with train as a @parallel gang), or set num_nodes to 1."
        )
    if flow.eval_instructions != "none":
        try:
            load_eval_instructions(flow.eval_instructions or DEFAULT_EVAL_INSTRUCTIONS)
        except EvalInstructionsError as err:
            problems.append(in_flow_terms(str(err)))  # it names the trainer's --eval_instructions
    return RunWide(checkpoint_root, resume_checkpoint, problems)


def chat_template_problems(model_args: Any, data_args: Any, model_path: str, rows: list) -> list[str]:
    """What stops --prompt-format chat with this model's tokenizer: no template, one that cannot
    render the data's turns, or whose answers cannot be located exactly (training.chat)."""
    from training.base_model import load_tokenizer
    from training.chat import setup_problems

    try:
        tokenizer = load_tokenizer(model_path, trust_remote_code=model_args.trust_remote_code,
                                   prompt_format="chat", chat_template=data_args.chat_template)
    except OSError as err:  # a hub model on a laptop without hub access: the train node checks again
        print(f"Preflight warning [chat-template]: could not load the tokenizer of {model_path} ({err}); "
              "the chat template is checked on the train node.")
        return []
    return setup_problems(tokenizer, rows, model_args.base_model)
