"""The flow's two preflights (``training/preflight.py`` holds the rules).

In ``start``, on the launching machine: what the config declares (``resources`` and
``gpu_spec``: the preset's GPU, its memory and compute capability) against the plan: precision,
/dev/shm, the memory-fit estimate. In ``train``, on the node, before the trainer starts: the
node's real facts (on a GPU node read in a short subprocess, so the step process never holds a
CUDA context), every rule. Both return ``(findings, record)``; the record is the ``preflight`` artifact and the
card's preflight section.
"""

from __future__ import annotations

from typing import Any

from training.model_facts import ModelFactsCache
from training.node_facts import HardwareFacts, declared_facts, gather_node_facts
from training.plan import TrainingPlan, plan_from_record
from training.preflight import Finding, check, plan_from_args, preflight_record

# Rules that need the model's size: left out (with a warning) when it cannot be read.
SIZE_RULES = ("gpu-memory", "cpu-memory", "disk")


def training_plan(model_args: Any, data_args: Any, train_args: Any,
                  model_path: str) -> tuple[TrainingPlan, list[Finding]]:
    """The plan, with the model's size read from its config (no weights loaded; kept in the
    cache folder, so a later run of the same model reads it without importing torch)."""
    try:
        size = ModelFactsCache(data_args.cache_dir).size(model_path, trust_remote_code=model_args.trust_remote_code)
        return plan_from_args(model_args, data_args, train_args, **size), []
    except Exception as err:  # an unreachable hub on a laptop must not stop start: say so instead
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        note = Finding("warning", "model-size", f"could not read the size of {model_path} ({reason}); "
                       "GPU memory and disk were not estimated here.")
        return plan_from_args(model_args, data_args, train_args, num_parameters=0), [note]


def declared(settings: Any) -> HardwareFacts:
    """The hardware a preset declares (``resources`` and the optional ``gpu_spec``)."""
    resources = settings.resources
    spec = settings.get("gpu_spec") or {}
    capability = spec.get("compute_capability")
    return declared_facts(
        gpus=int(resources.gpu or 0),
        gpu_name=spec.get("name"),
        gpu_memory_gib=spec.get("memory_gib"),
        compute_capability=tuple(capability) if capability else None,
        shared_memory_mb=resources.shared_memory,
        memory_mb=resources.memory,
        num_nodes=int(settings.get("num_nodes", 1)),
    )


def _run(facts: HardwareFacts, plan: TrainingPlan, notes: list[Finding], where: str) -> tuple[list[Finding], dict]:
    findings = check(facts, plan, where=where)
    if not plan.num_parameters:  # the size is unknown: drop the rules that would judge a 0-parameter model
        findings = [f for f in findings if f.code not in SIZE_RULES] + notes
    return findings, preflight_record(facts, plan, findings)


def start_preflight(settings: Any, model_args: Any, data_args: Any, train_args: Any,
                    model_path: str | None) -> tuple[list[Finding], dict | None]:
    """What `start` can judge from the config alone; ([], None) when the DeepSpeed config
    itself is unreadable (start already reports that problem in its own words).

    ``model_path`` None: the model was not resolved (the bundled model is converted only when
    every other input is right), so the rules that need its size are left out without a warning:
    the run is refused for its other problems anyway."""
    from training.preflight import read_zero_settings

    try:
        read_zero_settings(train_args.deepspeed)
    except ValueError:
        return [], None
    if model_path is None:
        return _run(declared(settings), plan_from_args(model_args, data_args, train_args, num_parameters=0), [],
                    "start")
    plan, notes = training_plan(model_args, data_args, train_args, model_path)
    return _run(declared(settings), plan, notes, "start")


def node_preflight(settings: Any, trainer_argv: list[str], output_dir: str, num_nodes: int,
                   start_record: dict | None = None) -> tuple[list[Finding], dict]:
    """Every rule on this node's real facts, before the trainer starts.

    The plan is the one `start` made from the same arguments (``start_record``, its preflight
    record) when `start` could read the model's size: building it again would import
    transformers and build the model on the meta device in this process (~3 s on 2 cores)."""
    if start_record and start_record.get("plan", {}).get("num_parameters"):
        plan, notes = plan_from_record(start_record["plan"]), []
    else:  # no record, or the size unknown in start (a hub model out of reach there): try here
        from training.arguments import parse_args
        from training.base_model import resolve_base_model

        model_args, data_args, train_args = parse_args(trainer_argv)
        plan, notes = training_plan(model_args, data_args, train_args, resolve_base_model(model_args.base_model))
    facts = gather_node_facts(int(settings.resources.gpu or 0), output_dir, num_nodes)
    return _run(facts, plan, notes, "train")
