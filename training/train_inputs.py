"""The phases of ``train()`` before the first step: settings, rows, the checkpoint to resume
from, tokens, the model. Each returns a small value and raises ``training.trainer_errors``
errors; the heavy libraries are imported inside them (``--help`` and the flow's checks stay fast).

    hardware = check_settings(model_args, data_args, train_args)      # precision, attention, S3
    rows = load_rows(data_args, train_args, cache_dir)
    tokens = tokenize(model_args, data_args, rows, args, cache_dir)     # args: TrainingArguments
    built = build_model(model_args, train_args, tokens, hardware, args)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.adapters import apply_lora, count_parameters, quantization_config
from training.arguments import (
    DataArguments,
    ModelArguments,
    TrainArguments,
    check_attention,
    find_problems,
    flash_attn_version,
    resolve_precision,
)
from training.base_model import load_model, load_tokenizer, resolve_base_model
from training.batching import PaddingCollator, packing_collator, tokenize_rows
from training.chat import setup_problems
from training.checkpoint_store import CheckpointStoreError, S3CheckpointStore
from training.dataset import load_instruction_data, sample_and_split
from training.evaluation import DEFAULT_EVAL_INSTRUCTIONS, load_eval_instructions
from training.prompt_format import end_marker, stop_token_ids
from training.s3_uploads import resolve_resume
from training.safe_loading import unsafe_pickles
from training.shared_memory import cpu_comm_op_path
from training.trainer_errors import CannotResume, CannotTrain


def log(message: str) -> None:
    # flush: the flow streams the trainer's output into the task log line by line.
    print(f"[trainer] {message}", flush=True)


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    precision: str  # bf16, fp16 or fp32: --precision resolved for this device


@dataclass(frozen=True)
class Rows:
    data: Any  # training.dataset.InstructionData: source, fingerprint, skipped rows
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    instructions: list[dict[str, Any]]  # answered before and after training ([] with "none")


@dataclass(frozen=True)
class Tokens:
    model_path: str  # the base model resolved (the bundled one converted, a hub one downloaded)
    tokenizer: Any
    train_set: Any  # datasets.Dataset of input_ids/labels
    eval_set: Any
    dropped_train: int  # rows longer than --max_seq_length
    dropped_eval: int
    marker: str  # the text that ends an answer (### End, or the chat template's end of turn)


@dataclass(frozen=True)
class BuiltModel:
    model: Any  # the transformers model, peft-wrapped under LoRA/QLoRA
    collator: Any
    dtype: Any  # torch dtype of the weights
    trainable: int
    parameters: int


def check_settings(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> Hardware:
    """Every problem of the arguments with this device and S3, at once, before any data loads."""
    import torch

    problems = find_problems(model_args, data_args, train_args)
    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability(0) if cuda else None
    precision = ""
    try:
        precision = resolve_precision(train_args.precision, cuda=cuda, compute_capability=capability)
    except ValueError as err:
        problems.append(str(err))
    else:
        problems += check_attention(model_args.attn_implementation, cuda=cuda, compute_capability=capability,
                                    precision=precision, flash_attn_version=flash_attn_version())
    problems += s3_access_problems(train_args)
    if problems:
        raise CannotTrain(problems)
    return Hardware(cuda, precision)


def s3_access_problems(train_args: TrainArguments) -> list[str]:
    """Each S3 prefix the run reads or writes, listed now: missing credentials or an unreachable
    endpoint show in seconds, not after the data is tokenized and the model loaded."""
    checkpoints = f"{train_args.s3_uri.rstrip('/')}/checkpoints" if train_args.s3_uri.startswith("s3://") else ""
    flags = [("--s3_uri", checkpoints),
             ("--resume_from", train_args.resume_from if train_args.resume_from.startswith("s3://") else "")]
    problems = []
    for flag, uri in flags:
        if not uri:
            continue
        try:
            S3CheckpointStore(uri).names(warn=False)
        except CheckpointStoreError as err:
            problems.append(f"{flag}: {err}")
    return problems


def load_rows(data_args: DataArguments, train_args: TrainArguments, cache_dir: Path) -> Rows:
    """The data set read, validated, sampled and split; the evaluation instructions."""
    instructions = []
    if train_args.eval_instructions != "none":
        instructions = load_eval_instructions(train_args.eval_instructions or DEFAULT_EVAL_INSTRUCTIONS)
    data = load_instruction_data(data_args.dataset, skip_bad_rows=data_args.skip_bad_rows, cache_dir=cache_dir,
                                 prompt_format=data_args.prompt_format)
    train_rows, eval_rows = sample_and_split(
        data, sample_fraction=data_args.sample_fraction, test_size=data_args.test_size, seed=train_args.seed
    )
    log(
        f"data {data.source}: {len(train_rows)} train / {len(eval_rows)} eval rows, "
        f"{data.skipped_rows} bad rows skipped, fingerprint {data.fingerprint[:12]}"
    )
    return Rows(data, train_rows, eval_rows, instructions)


def choose_resume(train_args: TrainArguments, args: Any, output_dir: Path, node: int, nodes: int) -> str | None:
    """The checkpoint folder every rank resumes from (downloaded once per node), checked for
    pickles that could run code before any model loads; None for a fresh start."""
    if not train_args.resume_from:
        return None
    chosen = output_dir / "resume" / "CHOSEN"  # the other local ranks read which folder it chose
    with args.main_process_first(local=True, desc="checkpoint download"):
        if args.local_process_index == 0:
            found = resolve_resume(train_args.resume_from, train_args.s3_uri, output_dir / "resume",
                                   node=node, nodes=nodes)
            chosen.parent.mkdir(parents=True, exist_ok=True)
            chosen.write_text(str(found or ""))
        resume_path = chosen.read_text() or None
    _same_checkpoint_everywhere(resume_path, args.world_size)
    if resume_path and (refused := unsafe_pickles(Path(resume_path))):
        # weights_only_loads refuses such a file again when the trainer loads it.
        from_s3 = train_args.resume_from == "latest" or train_args.resume_from.startswith("s3://")
        where = (f" (downloaded from the {Path(resume_path).name} that --resume_from {train_args.resume_from} "
                 "picked: delete it in S3 or pass an older one, --resume_from s3://.../checkpoint-N)"
                 if from_s3 else "")
        raise CannotResume("Cannot resume" + where + ":\n  " + "\n  ".join(refused))
    return resume_path


def _same_checkpoint_everywhere(resume_path: str | None, world_size: int) -> None:
    """Every node resolved ``--resume_from`` on its own: stop if they did not pick the same step
    (a download that failed verification on one node only), instead of mixing optimizer states."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    picked = [None] * world_size
    dist.all_gather_object(picked, Path(resume_path).name if resume_path else "")
    if len(set(picked)) > 1:
        found = ", ".join(f"rank {rank}: {name or 'none (fresh start)'}" for rank, name in enumerate(picked))
        raise CannotResume(
            f"Cannot resume: the ranks found different checkpoints ({found}); see the [checkpoints] "
            "lines of each node. Pass one checkpoint explicitly with --resume_from s3://.../checkpoint-N."
        )


def tokenize(model_args: ModelArguments, data_args: DataArguments, rows: Rows, args: Any, cache_dir: Path) -> Tokens:
    """The base model resolved, its tokenizer set up for the prompt format, both splits tokenized
    (by the first rank; the others read its cache)."""
    with args.main_process_first(desc="base model conversion and tokenization"):
        model_path = resolve_base_model(model_args.base_model, cache_dir)
        tokenizer = load_tokenizer(model_path, trust_remote_code=model_args.trust_remote_code,
                                   prompt_format=data_args.prompt_format, chat_template=data_args.chat_template)
        if data_args.prompt_format == "chat" and (problem := setup_problems(tokenizer, rows.train + rows.eval,
                                                                            model_args.base_model)):
            raise CannotTrain(problem)
        (train_set, dropped_train), (eval_set, dropped_eval) = (
            tokenize_rows(split_rows, tokenizer, max_seq_length=data_args.max_seq_length,
                          cache_dir=cache_dir / "tokenized", split=split, prompt_format=data_args.prompt_format)
            for split, split_rows in (("train", rows.train), ("eval", rows.eval))
        )
    marker = end_marker(tokenizer)
    log(f"prompt format {data_args.prompt_format}: answers end at {marker} (ids {stop_token_ids(tokenizer)})")
    log(
        f"dropped {'conversations' if data_args.prompt_format == 'chat' else 'rows'} longer than "
        f"{data_args.max_seq_length} tokens: {dropped_train} train, {dropped_eval} eval"
    )
    if len(train_set) == 0 or len(eval_set) == 0:
        raise CannotTrain(
            f"every {'train' if len(train_set) == 0 else 'eval'} row is longer than "
            f"--max_seq_length {data_args.max_seq_length} tokens; raise --max_seq_length."
        )
    return Tokens(model_path, tokenizer, train_set, eval_set, dropped_train, dropped_eval, marker)


def build_model(model_args: ModelArguments, train_args: TrainArguments, tokens: Tokens, hardware: Hardware,
                args: Any) -> BuiltModel:
    """The model loaded in its precision (4-bit base under QLoRA), its collator, the adapters."""
    import torch


    dtype = torch.bfloat16 if hardware.precision == "bf16" else torch.float32  # fp16: fp32 master weights
    quantized = model_args.peft == "qlora"
    quantization = quantization_config(torch.float16 if hardware.precision == "fp16" else dtype) if quantized else None
    model = load_model(tokens.model_path, tokens.tokenizer, dtype=dtype, trust_remote_code=model_args.trust_remote_code,
                       attn_implementation=model_args.attn_implementation, quantization=quantization,
                       device=args.local_process_index if hardware.cuda else None)
    if model_args.gradient_checkpointing:
        model.config.use_cache = False
    try:
        if train_args.packing:
            collator = packing_collator(model)  # refuses attention that would mix the sequences
        else:
            collator = PaddingCollator(tokens.tokenizer.pad_token_id, pad_to_multiple_of=8 if hardware.cuda else None)
        # After the collator: packing checks the model's own attention code, not peft's wrapper.
        if model_args.peft != "none":
            model = apply_lora(model, tokens.tokenizer, model_args, quantized=quantized)
    except ValueError as err:
        raise CannotTrain(str(err)) from None
    order = "length-grouped" if train_args.group_by_length else "random"
    layout = "packed into one row" if train_args.packing else "padded to the longest row"
    log(f"batches: {order} order, {layout}; {model.config._attn_implementation} attention")
    trainable, parameters = count_parameters(model)
    log(f"model {model_args.base_model} ({tokens.model_path}): {parameters / 1e6:.2f}M parameters, {hardware.precision}"
        + (f"; {model_args.peft}: {trainable / 1e6:.3f}M trainable ({trainable / parameters:.2%})"
           if model_args.peft != "none" else "")
        + ("; frozen base weights in 4-bit NF4" if quantized else ""))
    comm_op = None if hardware.cuda or not args.deepspeed or args.process_index != 0 else cpu_comm_op_path()
    if comm_op is not None and not comm_op.is_file():
        # The first CPU run in a Python environment: DeepSpeed compiles this op before the first
        # evaluation, with no output for a minute or two.
        log(f"DeepSpeed compiles its CPU communication op now: once per Python environment, 40-90 s "
            f"on 2 cores, silent until it is done (kept in {comm_op.parent} for later runs)")
    return BuiltModel(model, collator, dtype, trainable, parameters)
