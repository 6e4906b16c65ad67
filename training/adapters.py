"""LoRA and QLoRA with peft: wrapping the base model, saving the adapter, merging, loading it back.

Under ``--peft lora`` the base model's weights stay frozen; low-rank adapters on
``--lora_target_modules`` train (``all-linear``: every linear layer but the output head), and
so do the embedding rows of the prompt format's tokens and nothing else of the embedding: the
Dolly keys are new tokens, and with frozen rows the model would never learn to emit ``### End``;
a chat template's tokens (``<|im_end|>``, ``<|eot_id|>``) are often untrained in base models. peft's
``trainable_token_indices`` trains just those rows (of the input embedding and, for a model
whose output head is not tied to it, of the head too) and saves only them, instead of
``modules_to_save=["embed_tokens"]``, which trains and saves the whole matrix (1.2 GB for an 8B
model's 151936 x 4096 bf16 embedding).

``--peft qlora`` loads the frozen base weights in 4-bit NF4 with double quantization
(bitsandbytes, as the QLoRA paper and TRL/axolotl do); the adapters compute in bf16 on a GPU
(fp32 on CPU, where bitsandbytes runs 4-bit too).

What a run writes (``--merge_adapter true``, the default)::

    <output_dir>/               the merged model: plain AutoModelForCausalLM.from_pretrained(dir)
    <output_dir>/adapter/       adapter_model.safetensors, adapter_config.json, tokenizer

With ``--merge_adapter false`` the output directory is the adapter alone, which
:func:`load_adapter_model` (and ``python -m training.generate --model DIR``) puts on its base
model. The adapter names its base model as the user gave it (a hub id, a directory, or
``bundled:smollm2-135m-instruct``), never a cache path of the training machine.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.plan import LinearLayers

ADAPTER_DIR = "adapter"  # under a merged model's directory
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    """A directory that holds a peft adapter at its top (not a merged model)."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def quantization_config(compute_dtype: Any) -> Any:
    """QLoRA's 4-bit storage of the frozen base weights: NF4, double quantization (the
    quantization constants quantized too: ~0.37 bits per parameter saved, QLoRA paper)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


CPU_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"


def quiet_missing_cpu_kernel_warning() -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward ..." warning, which opened every run.

    transformers' Trainer imports peft, and peft imports bitsandbytes, whose CPU backend (0.50),
    on a CPU with AVX-512 BF16, fetches a fused 4-bit inference kernel from the hub with the
    ``kernels`` package as it is imported, and warns when it cannot: on every run, QLoRA or
    not, and always on a machine without hub access. Nothing here needs that kernel: it only
    multiplies by 4-bit weights in bitsandbytes' repacked CPU inference layout, which QLoRA
    training switches off (``_keep_4bit_weights_trainable_on_cpu``); without it bitsandbytes
    uses its own compiled kernel; runs without QLoRA never multiply by 4-bit weights.
    Only this message is dropped: the logger's other warnings still show.
    """
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith(CPU_KERNEL_WARNING))


def peft_problems(model_args: Any, model_path: str, cache_dir: str = "") -> list[str]:
    """What stops ``--peft`` on this model here, found without loading weights: target modules
    the model does not have (with the names it has), QLoRA without bitsandbytes. The model's
    linear layers come from ``ModelFactsCache(cache_dir)``: a later run of the same model reads
    them without importing torch."""
    from training.arguments import lora_target_modules
    from training.model_facts import ModelFactsCache

    if model_args.peft == "none":
        return []
    problems = []
    if model_args.peft == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("--peft qlora needs the bitsandbytes package: pip install 'bitsandbytes>=0.46' "
                        "(the GPU image has it), or use --peft lora.")
    targets = lora_target_modules(model_args.lora_target_modules)
    if targets == "all-linear" or not targets:
        return problems
    try:
        size = ModelFactsCache(cache_dir).size(model_path, trust_remote_code=model_args.trust_remote_code)
    except OSError:
        # A hub model's config out of reach from here (a laptop without hub access): the
        # trainer checks the same names when it loads the model, before training.
        return problems
    if size["linear_layers"] is not None and (
            problem := missing_targets(size["linear_layers"], targets, model_args.base_model)):
        problems.append(problem)
    return problems


def missing_targets(layers: LinearLayers, targets: list[str], model_name: str) -> str | None:
    """The problem with target module names the model (its ``linear_layers``) does not have,
    listing those it has."""
    available = sorted(layers.in_features)
    missing = [name for name in targets if name not in available]
    if not missing:
        return None
    return (f"--lora_target_modules: {', '.join(missing)} not in {model_name}; its linear layers "
            f"are {', '.join(available)} (or use all-linear).")


def _module_name(model: Any, module: Any) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def apply_lora(model: Any, tokenizer: Any, model_args: Any, *, quantized: bool) -> Any:
    """The peft model: frozen base, LoRA adapters, the embedding rows of the prompt format's
    tokens trainable (the Dolly keys, or the chat template's special tokens).

    Raises ValueError naming the missing layers when a target module is not in the model.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from training.arguments import lora_target_modules
    from training.base_model import recipe_tokens
    from training.memory_estimate import linear_layers

    targets = lora_target_modules(model_args.lora_target_modules)
    if targets != "all-linear" and (problem := missing_targets(linear_layers(model), targets, model_args.base_model)):
        raise ValueError(problem)
    token_ids = sorted({tokenizer.convert_tokens_to_ids(token) for token in recipe_tokens(tokenizer)})
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    # A tied head follows the input rows by itself (peft ties the two adapters); an untied
    # head (Pythia's embed_out) needs its own rows, or it could not learn to predict the keys.
    trainable_rows = {_module_name(model, embeddings): token_ids}
    if head is not None and head.weight is not embeddings.weight:
        trainable_rows[_module_name(model, head)] = token_ids
    _collect_token_rows_on_any_device()
    if quantized:
        _keep_4bit_weights_trainable_on_cpu(model)
        # Casts the few unquantized weights (norms, embeddings) to fp32 for stable training.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_args.gradient_checkpointing)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        trainable_token_indices=trainable_rows,
    )
    peft_model = get_peft_model(model, config)
    _gather_token_rows_under_zero3(peft_model)
    peft_model.register_state_dict_post_hook(_drop_frozen_aliases)
    # The adapter names its base as the user gave it: the training machine's cache path would
    # mean nothing anywhere else.
    peft_model.peft_config["default"].base_model_name_or_path = model_args.base_model
    # peft's save_pretrained would otherwise save the WHOLE resized embedding matrices ("auto":
    # the vocabulary grew by the Dolly keys), when their new rows are in the adapter already.
    # The Trainer saves checkpoints and the final adapter through this method.
    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)
    if model_args.gradient_checkpointing:
        peft_model.enable_input_require_grads()  # recomputed blocks need an input that requires grad
    return peft_model


def _collect_token_rows_on_any_device() -> None:
    """Let peft set up the trainable token rows under ZeRO-3 on CPU ranks too.

    peft 0.21's ``TrainableTokensLayer._collect_token_weights`` (ZeRO-3 only) allocates the rows
    it receives from rank 0 on ``cuda:<current device>`` ("right now, only CUDA is implemented"),
    so CPU ranks fail with "Torch not compiled with CUDA enabled". The same steps on the
    weight's own device (the GPU on GPU ranks) work everywhere.
    """
    import torch
    import torch.distributed as dist
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.integrations import gather_params_ctx

    def collect(self: Any, weight: Any, rows: Any, embed_dim: int) -> Any:
        with gather_params_ctx([weight], modifier_rank=None):
            if dist.get_rank() == 0:
                token_weights = weight[rows].clone()
            else:
                token_weights = torch.empty((len(rows), embed_dim), dtype=weight.dtype, device=weight.device)
        dist.broadcast(token_weights, src=0)
        return token_weights

    TrainableTokensLayer._collect_token_weights = collect


def _keep_4bit_weights_trainable_on_cpu(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference in the middle of training.

    On a CPU with AVX-512 BF16, bitsandbytes 0.50's ``Linear4bit`` converts its weight to a CPU
    inference layout at the first forward pass without gradients (our evaluation before
    training) and keeps it; the backward pass then reads that layout as plain NF4. Measured on
    the bundled model: the gradient reaching the input embeddings fell from norm 2.93 to 0.036
    after one evaluation, and QLoRA's eval loss rose (3.43 -> 4.17 in the default schedule)
    instead of falling. Without the conversion both passes use the regular kernels (GPUs never
    convert).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _drop_frozen_aliases(module: Any, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Leave second names of frozen weights out of the model's state dict.

    DeepSpeed saves a checkpoint's model states with ``exclude_frozen_parameters``, which deletes
    the frozen weights by their ``named_parameters()`` names; a head tied to the embedding is
    listed there once, so its second name stayed: the bundled model's checkpoints carried its
    frozen 113 MB embedding (133 of 215 MB). peft's adapter saving keeps adapter weights only,
    and resuming loads the base from the base model, so neither needs the alias.
    """
    canonical = {prefix + name for name, _ in module.named_parameters()}
    frozen = {(p.data_ptr(), tuple(p.shape)) for p in module.parameters() if not p.requires_grad and p.numel()}
    for key in [k for k, v in state_dict.items() if k not in canonical and hasattr(v, "data_ptr")]:
        if (state_dict[key].data_ptr(), tuple(state_dict[key].shape)) in frozen:
            del state_dict[key]


def _gather_token_rows_under_zero3(peft_model: Any) -> None:
    """Under ZeRO-3, tell DeepSpeed what peft's token-row layers read in their forward.

    ZeRO-3 gathers a module's own parameters when that module's forward runs. peft's
    ``TrainableTokensLayer`` instead reads its base embedding's weight and its rows (a
    ``ParameterDict``) directly and calls ``F.embedding``/``F.linear``, so both stayed
    partitioned: "index_copy_(): Number of indices (3) should be equal to source.size(dim) (0)"
    on two CPU ranks. Registered as external parameters, they are gathered for its forward.
    """
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for module in peft_model.modules():
        if isinstance(module, TrainableTokensLayer):
            register_external_parameter(module, module.get_base_layer().weight)
            for rows in module.trainable_tokens_delta.values():
                register_external_parameter(module, rows)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, all) parameter counts; ZeRO-3 shards report their full size (ds_numel)."""
    trainable = total = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", parameter.numel())
        # A 4-bit weight packs two values per byte: count what it stands for.
        if parameter.__class__.__name__ == "Params4bit":
            count = count * 2
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def load_adapter_model(adapter_dir: str | Path, *, dtype: Any = None, trust_remote_code: bool = False,
                       cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): the adapter's base model (resolved like ``--base_model``, the prompt
    format's tokens added) with the adapter merged in, for generation or for saving a merged model."""
    import json

    from peft import PeftModel
    from transformers import AutoTokenizer

    from training.base_model import load_model, resolve_base_model

    adapter_dir = Path(adapter_dir)
    base_name = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    base_path = resolve_base_model(base_name, cache_dir)
    # The adapter's tokenizer, saved with it: the base's with the format's tokens and chat
    # template, the ids the adapter's rows belong to.
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=trust_remote_code)
    model = load_model(base_path, tokenizer, dtype=dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.merge_and_unload(), tokenizer


def save_merged(adapter_dir: Path, output_dir: Path, *, dtype: Any, trust_remote_code: bool = False,
                cache_dir: str | Path | None = None) -> None:
    """The base model with the adapter merged, saved as a plain model directory.

    The merge starts from the base weights in ``dtype`` (not QLoRA's 4-bit copy, which would
    round the merged weights to NF4): loading an 8B base takes 16 GB of host memory in bf16.
    Runs on world rank 0 alone, after training.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # After ZeRO-3 training, from_pretrained would still load through deepspeed.zero.Init,
    # a collective call that waits for ranks that have finished (gloo: "Connection closed").
    unset_hf_deepspeed_config()
    model, tokenizer = load_adapter_model(adapter_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                          cache_dir=cache_dir)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
