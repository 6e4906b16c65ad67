"""The ``end`` step's card: the whole run on one screen.

What was trained (base model, data, preset, DeepSpeed, hyperparameters), how it did (loss,
perplexity, the share of answers that end at ``### End``, throughput), where the model is and
how to load it.

    python flows/dolly_flow.py card view end --id summary
"""

from __future__ import annotations

import shlex
from typing import Any

from metaflow.cards import Markdown, Table

from gpu_profile.render import code_block, code_span

CARD_ID = "summary"


def load_instructions(model_location: str, pathspec: str) -> str:
    """How to answer instructions with this run's model: CLI and Python, as Markdown code blocks
    (the location is the user's: code blocks show it as typed, and the shell line quotes it)."""
    return "\n".join([
        code_block(f"python -m training.generate --run {pathspec} \"Give three tips for a good night's sleep.\"\n"
                   f"python -m training.generate --model {shlex.quote(model_location)} \"What is a haiku?\""),
        code_block("from training.generate import load_for_generation, generate_response\n"
                   f"model, tokenizer = load_for_generation({model_location!r})\n"
                   "print(generate_response(model, tokenizer, 'What is a haiku?').text)", "python"),
    ])


def or_na(value: float | None, fmt: str) -> str:
    """``value`` formatted, or "n/a" where the run has no such figure (no evaluation answers
    under --eval-instructions none, no checkpoint, a failed sweep point)."""
    return "n/a" if value is None else format(value, fmt)


def change(before: float | None, after: float | None, fmt: str) -> str:
    """``"2.3456 → 1.2345"``; "n/a" for a figure the run does not have."""
    if before is None and after is None:
        return "n/a"
    return f"{or_na(before, fmt)} → {or_na(after, fmt)}"


def _method(metrics: dict[str, Any]) -> str:
    """Full fine-tuning, or LoRA/QLoRA with its settings, the trainable share and the adapter."""
    peft, lora = metrics.get("peft", "none"), metrics.get("lora")
    trainable = (f"{metrics.get('trainable_parameters', 0) / 1e6:,.2f}M of "
                 f"{metrics.get('parameters', 0) / 1e6:,.2f}M parameters trained")
    if peft == "none" or not lora:
        return f"full fine-tuning ({trainable})"
    base = "4-bit NF4 base (QLoRA)" if peft == "qlora" else "frozen base"
    kept = "merged model, adapter in adapter/" if lora["merged"] else "adapter only"
    return (f"{'QLoRA' if peft == 'qlora' else 'LoRA'} r={lora['r']}, alpha {lora['alpha']:g}, "
            f"dropout {lora['dropout']:g} "
            f"on {lora['target_modules']} + the prompt format's token rows, {base}: {trainable} "
            f"({metrics['trainable_parameters'] / metrics['parameters']:.1%}); adapter "
            f"{metrics.get('adapter_bytes', 0) / 1e6:.1f} MB ({kept})")


def _prompt_format(training: dict[str, Any], metrics: dict[str, Any]) -> str:
    if training.get("prompt_format", "dolly") != "chat":
        return "dolly (### Instruction / ### Response / ### End)"
    template = training.get("chat_template") or "the model's own"
    return f"chat: {template} chat template, answers end at {metrics.get('end_marker', '?')}"


def summary_components(*, pathspec: str, config: dict[str, Any], metrics: dict[str, Any],
                       evaluation: list[dict[str, Any]], model_location: str) -> list:
    """Card components for a finished run (artifacts of ``start`` and ``train``)."""
    training = config["training"]
    ranks = metrics.get("world_size", 1)
    accumulation = training.get("gradient_accumulation_steps", 1)
    effective = training["batch_size"] * accumulation * ranks
    rows = config.get("dataset_rows", {})
    inputs = [
        ["Base model", config["base_model"]],
        ["Data", f"{config['dataset']}: {metrics['train_rows']} train / {metrics['eval_rows']} eval rows used "
                 f"({rows.get('train', '?')} / {rows.get('eval', '?')} in the data; "
                 f"{metrics['dropped_long_rows']} too long, {metrics['skipped_bad_rows']} bad), "
                 f"fingerprint {metrics['dataset_fingerprint'][:12]}"],
        ["Preset", f"{config['preset']}: {config['resources'].get('gpu') or 0} GPU(s), "
                   f"{config['resources'].get('cpu')} CPUs, {config['resources'].get('memory')} MB"],
        ["Method", _method(metrics)],
        ["Prompt format", _prompt_format(config["training"], metrics)],
        ["DeepSpeed", config.get("deepspeed_config") or "off"],
        ["Precision, ranks", f"{metrics['precision']}, {ranks}"],
        ["Schedule", f"{metrics['global_step']} steps, {metrics['epochs']:.2f} epochs, "
                     f"lr {training['learning_rate']:g}, "
                     f"batch {training['batch_size']} x {accumulation} accumulation x {ranks} rank(s) = "
                     f"{effective} sequences/step"],
    ]
    first = evaluation[0] if evaluation else {}
    last = evaluation[-1] if evaluation else {}
    results = [
        ["Eval loss", change(metrics["eval_loss_before"], metrics["eval_loss_after"], ".4f")],
        ["Perplexity", change(metrics["perplexity_before"], metrics["perplexity_after"], ".2f")],
        [f"Answers ending at {metrics.get('end_marker', '### End')}",
         change(metrics.get("ended_share_base"), metrics.get("ended_share_final"), ".0%")],
        ["Mean answer tokens", change(first.get("mean_new_tokens"), last.get("mean_new_tokens"), ".0f")],
        ["Training throughput", f"{metrics['tokens_per_second']:,.0f} tokens/s in training steps, "
                                f"{metrics.get('tokens_per_second_overall', 0):,.0f} overall with evaluation and "
                                f"checkpoints ({metrics['tokens']:,} tokens)"],
        ["Time", f"{metrics['train_runtime_s']:.0f} s training, {metrics['total_runtime_s']:.0f} s in the trainer"],
    ]
    return [
        Markdown(f"# {pathspec}\nFine-tuned {code_span(config['base_model'])} on {code_span(config['dataset'])}."),
        Table(data=inputs, headers=["What was trained", ""]),
        Table(data=results, headers=["How it did (base → tuned)", ""]),
        Markdown(f"## The model\n{code_span(model_location)}\n\n" + load_instructions(model_location, pathspec)),
        Markdown("Curves and every answer: `card view train --id training`; GPU use: "
                 "`card view train --id gpu_profile`."),
    ]
