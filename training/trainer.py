"""Fine-tune a causal LM on instruction data with the Dolly v2 recipe (HF Trainer + DeepSpeed).

Runs on its own, without Metaflow:

    # the bundled default: SmolLM2-135M-Instruct on the shipped sample, CPU, ~3 minutes
    python -m training.trainer --output_dir outputs/dolly

    # one CPU rank under DeepSpeed ZeRO-2 (what the flow does on a machine without a GPU)
    deepspeed --num_gpus 1 --module training.trainer --deepspeed ds_configs/zero2.json

    # LoRA on the bundled default; QLoRA (4-bit NF4 base) for an 8B model on one 24 GB GPU
    python -m training.trainer --peft lora --learning_rate 1e-3 --output_dir outputs/lora
    python -m training.trainer --peft qlora --base_model Qwen/Qwen3-8B-Base --precision bf16 \\
        --gradient_checkpointing true --merge_adapter false --dataset databricks/databricks-dolly-15k

    # conversations (messages/ShareGPT rows, Dolly rows too) in the model's own chat template
    python -m training.trainer --prompt_format chat --output_dir outputs/chat
    python -m training.trainer --prompt_format chat --chat_template chatml --base_model EleutherAI/pythia-410m

    # Dolly v2 itself on 4 GPUs (hub access needed)
    deepspeed --num_gpus 4 --module training.trainer \\
        --base_model EleutherAI/pythia-2.8b --dataset databricks/databricks-dolly-15k \\
        --deepspeed ds_configs/a100x4.json --per_device_train_batch_size 6 --max_seq_length 1024

Writes to ``--output_dir``: the final model (safetensors + tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained``), ``metrics.json``, ``checkpoints/`` and TensorBoard
``logs/``. ``python -m training.trainer --help`` lists every argument.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from training.adapters import (
    ADAPTER_DIR,
    apply_lora,
    count_parameters,
    quantization_config,
    quiet_missing_cpu_kernel_warning,
    save_merged,
)
from training.arguments import (
    DataArguments,
    ModelArguments,
    TrainArguments,
    check_attention,
    find_problems,
    flash_attn_version,
    parse_args,
    resolve_precision,
    resolve_repo_path,
)
from training.chat import setup_problems
from training.checkpoint_store import CheckpointStoreError, S3CheckpointStore
from training.evaluation import (
    DEFAULT_EVAL_INSTRUCTIONS,
    EvalInstructionsError,
    evaluation_callback,
    load_eval_instructions,
)
from training.generate import end_marker, stop_token_ids
from training.preemption import PreemptionWatch
from training.progress import PROGRESS_FILE, progress_callback
from training.run_history import eval_losses, missed_epoch_end, whole_train_loss
from training.s3_uploads import STAGING, BackgroundUploader, resolve_resume, upload_callback
from training.safe_loading import TRAINING_ARGS, unsafe_pickles, weights_only_loads
from training.shared_memory import cpu_comm_op_path, remove_deepspeed_segments

METRICS_FILE = "metrics.json"
UPLOADS_FILE = "s3_uploads.json"  # what went to S3, with manifests (files, sizes, sha256)
# What the published model holds, in --output_dir and (a merged LoRA run) its adapter/ folder:
# weights as safetensors, configs, tokenizer files, metrics. An allowlist, because the folder may
# hold anything (`--output_dir .`: a .env, symlinks): never training_args.bin (a pickle of
# TrainingArguments), never a symlink, nothing else.
PUBLISHED = (
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "adapter_model.safetensors", "adapter_config.json",
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    METRICS_FILE,
)


def _log(message: str) -> None:
    # flush: the flow streams this process's output into the task log line by line.
    print(f"[trainer] {message}", flush=True)


def _progress_callback() -> Any:
    from transformers import TrainerCallback

    class PrintProgress(TrainerCallback):
        """One plain line per log event (tqdm bars are unreadable in a streamed task log)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items()}
            fields = " ".join(f"{k}={v}" for k, v in shown.items())
            _log(f"step {state.global_step}/{state.max_steps} {fields}")

    return PrintProgress()


def _hardware() -> tuple[bool, tuple[int, int] | None]:
    import torch

    if not torch.cuda.is_available():
        return False, None
    return True, torch.cuda.get_device_capability(0)


def node_layout(process_index: int, world_size: int) -> tuple[int, int]:
    """(this process's node index, number of nodes). Launchers number ranks node by node; the
    ranks per node come from torchrun's LOCAL_WORLD_SIZE or the deepspeed launcher's LOCAL_SIZE."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size or 1)
    return process_index // per_node, max(1, world_size // per_node)


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
        raise SystemExit(
            f"Cannot resume: the ranks found different checkpoints ({found}); see the [checkpoints] "
            "lines of each node. Pass one checkpoint explicitly with --resume_from s3://.../checkpoint-N."
        )


def hf_training_arguments(model_args: ModelArguments, train_args: TrainArguments, *, precision: str,
                          cuda: bool, **overrides: Any) -> Any:
    """The transformers ``TrainingArguments`` that ``train()`` runs with, from our arguments.

    Shared with the benchmarks (``benchmarks/trainer_vs_bare_loop.py``, ``benchmarks/gpu_mfu.py``),
    so that they measure this trainer's settings; ``overrides`` replace single values there.
    """
    from transformers import TrainingArguments

    from training.batching import LENGTH_COLUMN

    output_dir = Path(train_args.output_dir)
    values: dict[str, Any] = dict(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=train_args.epochs,
        max_steps=train_args.max_steps,
        per_device_train_batch_size=train_args.per_device_train_batch_size,
        per_device_eval_batch_size=train_args.per_device_eval_batch_size,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        learning_rate=train_args.learning_rate,
        warmup_steps=train_args.warmup_steps,
        weight_decay=train_args.weight_decay,
        seed=train_args.seed,
        logging_steps=train_args.logging_steps,
        save_total_limit=train_args.save_total_limit,
        deepspeed=str(resolve_repo_path(train_args.deepspeed)) if train_args.deepspeed else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        activation_checkpointing=model_args.gradient_checkpointing,
        # eval_on_start gives the loss before training; a plain evaluate() before train() is
        # refused by the DeepSpeed integration for ZeRO stages below 3.
        eval_on_start=True,
        eval_strategy="steps" if train_args.eval_steps else "epoch",
        eval_steps=train_args.eval_steps or None,
        save_strategy="steps" if train_args.save_steps else "epoch",
        save_steps=train_args.save_steps or 500,  # transformers' default; unused by "epoch"
        # Packed batches have no padding (and no attention_mask to count by): count every id.
        include_num_input_tokens_seen="all" if train_args.packing else "non_padding",
        # Length-grouped batches read the lengths tokenize_rows stored instead of every row's ids.
        train_sampling_strategy="group_by_length" if train_args.group_by_length else "random",
        length_column_name=LENGTH_COLUMN,
        remove_unused_columns=False,
        report_to=["tensorboard"],
        disable_tqdm=True,
        local_rank=train_args.local_rank,
        # Several nodes: each keeps (and rotates) complete checkpoint folders of its own, beside
        # its ranks' ZeRO shards; node k uploads its folder under checkpoint-N/node-k/.
        save_on_each_node=node_layout(0, int(os.environ.get("WORLD_SIZE", "1")))[1] > 1,
    )
    values.update(overrides)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "logs"))
    return TrainingArguments(**values)


def train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> dict[str, Any]:
    """Fine-tune and save; returns the metrics also written to ``output_dir/metrics.json``."""
    problems = find_problems(model_args, data_args, train_args)
    cuda, capability = _hardware()
    try:
        precision = resolve_precision(train_args.precision, cuda=cuda, compute_capability=capability)
    except ValueError as err:
        problems.append(str(err))
    else:
        problems += check_attention(model_args.attn_implementation, cuda=cuda, compute_capability=capability,
                                    precision=precision, flash_attn_version=flash_attn_version())
    problems += _s3_access_problems(train_args)
    if problems:
        raise SystemExit("Cannot train:\n  " + "\n  ".join(problems))

    quiet_missing_cpu_kernel_warning()  # before transformers' Trainer imports peft, which imports bitsandbytes
    import datasets
    import torch
    import transformers
    from transformers import PrinterCallback, Trainer, set_seed

    from training.base_model import load_model, load_tokenizer, resolve_base_model
    from training.batching import PaddingCollator, packing_collator, tokenize_rows
    from training.dataset import default_cache_dir, load_instruction_data, sample_and_split

    # Progress bars are unreadable in a streamed task log; PrintProgress logs plain lines.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    started = time.time()
    set_seed(train_args.seed)
    output_dir = Path(train_args.output_dir)
    cache_dir = Path(data_args.cache_dir) if data_args.cache_dir else default_cache_dir()

    eval_rows_for_generation = []
    if train_args.eval_instructions != "none":
        eval_rows_for_generation = load_eval_instructions(train_args.eval_instructions or DEFAULT_EVAL_INSTRUCTIONS)
    data = load_instruction_data(data_args.dataset, skip_bad_rows=data_args.skip_bad_rows, cache_dir=cache_dir,
                                 prompt_format=data_args.prompt_format)
    train_rows, eval_rows = sample_and_split(
        data, sample_fraction=data_args.sample_fraction, test_size=data_args.test_size, seed=train_args.seed
    )
    _log(
        f"data {data.source}: {len(train_rows)} train / {len(eval_rows)} eval rows, "
        f"{data.skipped_rows} bad rows skipped, fingerprint {data.fingerprint[:12]}"
    )

    # TrainingArguments comes before the model: with ZeRO-3 it switches on deepspeed.zero.Init so
    # from_pretrained loads each rank's shard instead of a full copy per rank.
    args = hf_training_arguments(model_args, train_args, precision=precision, cuda=cuda)

    if args.deepspeed and args.world_size > 1 and not cuda:
        # On CPU ranks accelerate sets up torch.distributed (gloo) but not DeepSpeed's own comm
        # layer; ZeRO-3's zero.Init would then count a world of 1 and fail its batch-size check.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")

    node, nodes = node_layout(args.process_index, args.world_size)
    resume_path = None
    if train_args.resume_from:
        # One download per node; the other local ranks read which folder it chose.
        chosen = output_dir / "resume" / "CHOSEN"
        with args.main_process_first(local=True, desc="checkpoint download"):
            if args.local_process_index == 0:
                found = resolve_resume(train_args.resume_from, train_args.s3_uri, output_dir / "resume",
                                       node=node, nodes=nodes)
                chosen.parent.mkdir(parents=True, exist_ok=True)
                chosen.write_text(str(found or ""))
            resume_path = chosen.read_text() or None
        _same_checkpoint_everywhere(resume_path, args.world_size)
    if resume_path:
        # Every rank checks the folder it will load, before the model loads: a pickle that could
        # run code stops the run here (weights_only_loads below refuses it again at load time).
        refused = unsafe_pickles(Path(resume_path))
        if refused:
            from_s3 = train_args.resume_from == "latest" or train_args.resume_from.startswith("s3://")
            where = (f" (downloaded from the {Path(resume_path).name} that --resume_from {train_args.resume_from} "
                     "picked: delete it in S3 or pass an older one, --resume_from s3://.../checkpoint-N)") if from_s3 else ""
            raise SystemExit("Cannot resume" + where + ":\n  " + "\n  ".join(refused))

    with args.main_process_first(desc="base model conversion and tokenization"):
        model_path = resolve_base_model(model_args.base_model, cache_dir)
        tokenizer = load_tokenizer(model_path, trust_remote_code=model_args.trust_remote_code,
                                   prompt_format=data_args.prompt_format, chat_template=data_args.chat_template)
        if data_args.prompt_format == "chat":
            problem = setup_problems(tokenizer, train_rows + eval_rows, model_args.base_model)
            if problem:
                raise SystemExit("Cannot train:\n  " + "\n  ".join(problem))
        tokenized = {
            split: tokenize_rows(rows, tokenizer, max_seq_length=data_args.max_seq_length, cache_dir=cache_dir / "tokenized",
                                 split=split, prompt_format=data_args.prompt_format)
            for split, rows in (("train", train_rows), ("eval", eval_rows))
        }
        (train_set, dropped_train), (eval_set, dropped_eval) = tokenized["train"], tokenized["eval"]
    marker = end_marker(tokenizer)
    _log(f"prompt format {data_args.prompt_format}: answers end at {marker} (ids {stop_token_ids(tokenizer)})")
    _log(
        f"dropped {'conversations' if data_args.prompt_format == 'chat' else 'rows'} longer than "
        f"{data_args.max_seq_length} tokens: {dropped_train} train, {dropped_eval} eval"
    )
    if len(train_set) == 0 or len(eval_set) == 0:
        raise SystemExit(
            f"Cannot train: every {'train' if len(train_set) == 0 else 'eval'} row is longer than "
            f"--max_seq_length {data_args.max_seq_length} tokens; raise --max_seq_length."
        )

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # fp16: fp32 master weights
    quantized = model_args.peft == "qlora"
    model = load_model(model_path, tokenizer, dtype=dtype, trust_remote_code=model_args.trust_remote_code,
                       attn_implementation=model_args.attn_implementation,
                       quantization=quantization_config(torch.float16 if precision == "fp16" else dtype) if quantized else None,
                       device=args.local_process_index if cuda else None)
    if model_args.gradient_checkpointing:
        model.config.use_cache = False
    if train_args.packing:
        try:
            collator = packing_collator(model)  # refuses attention that would mix the sequences
        except ValueError as err:
            raise SystemExit(f"Cannot train: {err}") from None
    else:
        collator = PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if cuda else None)
    # After the collator: packing checks the model's own attention code, not peft's wrapper.
    if model_args.peft != "none":
        try:
            model = apply_lora(model, tokenizer, model_args, quantized=quantized)
        except ValueError as err:
            raise SystemExit(f"Cannot train: {err}") from None
    order = "length-grouped" if train_args.group_by_length else "random"
    layout = "packed into one row" if train_args.packing else "padded to the longest row"
    _log(f"batches: {order} order, {layout}; {model.config._attn_implementation} attention")
    trainable, parameters = count_parameters(model)
    _log(f"model {model_args.base_model} ({model_path}): {parameters / 1e6:.2f}M parameters, {precision}"
         + (f"; {model_args.peft}: {trainable / 1e6:.3f}M trainable ({trainable / parameters:.2%})"
            if model_args.peft != "none" else "")
         + ("; frozen base weights in 4-bit NF4" if quantized else ""))
    comm_op = None if cuda or not args.deepspeed or args.process_index != 0 else cpu_comm_op_path()
    if comm_op is not None and not comm_op.is_file():
        # The first CPU run in a Python environment: DeepSpeed compiles this op before the first
        # evaluation, with no output for a minute or two.
        _log(f"DeepSpeed compiles its CPU communication op now: once per Python environment, 40-90 s "
             f"on 2 cores, silent until it is done (kept in {comm_op.parent} for later runs)")

    preemption = PreemptionWatch(train_args.preemption_grace_s)
    # The metrics stream the flow's live card reads (rank 0 writes it); it comes first so that
    # the base model's evaluation point lands after its "begin" event.
    stream = progress_callback(output_dir / PROGRESS_FILE)
    callbacks = [stream, _progress_callback(), preemption.callback()]
    generation_eval = None
    if eval_rows_for_generation:
        # Every rank answers its share; under ZeRO-3 the ranks generate together (sharded weights).
        # In batches of --per_device_eval_batch_size, no flag of its own: it is already sized to
        # the device for the eval loss's forward passes (max_seq_length tokens, logits at every
        # position), which bound generation's (short prompts plus eval_max_new_tokens, logits
        # at the last position only), and the flow's eval_batch_size sets it on every config.
        generation_eval = evaluation_callback(eval_rows_for_generation, tokenizer, train_args.eval_max_new_tokens,
                                              on_point=stream.evaluation_point,
                                              batch_size=train_args.per_device_eval_batch_size)
        callbacks.append(generation_eval)
    uploader = None
    if train_args.s3_uri:  # reachable and readable: _s3_access_problems listed it before the data loaded
        store = S3CheckpointStore(f"{train_args.s3_uri.rstrip('/')}/checkpoints", node=node, nodes=nodes)
        # One uploader per node: each node's ranks wrote their ZeRO shards to that node's disk.
        if args.local_process_index == 0:
            uploader = BackgroundUploader(store, keep=train_args.save_total_limit, staging_root=output_dir / STAGING)
            callbacks.append(upload_callback(uploader))
    start_step = 0
    if resume_path:
        # The checkpoint's log history already holds the base model's eval loss (step 0) and every
        # evaluation since: evaluating again at its step would only add a point an uninterrupted
        # run does not have, unless the save came before that step's end-of-epoch evaluation.
        saved_state = json.loads((Path(resume_path) / "trainer_state.json").read_text())
        args.eval_on_start = not train_args.eval_steps and missed_epoch_end(saved_state)
        start_step = int(saved_state["global_step"])

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # PrintProgress prints one readable line instead
    # Resuming, every torch.load is weights_only with the allowlist (DeepSpeed asks for
    # weights_only=False): a checkpoint file swapped after unsafe_pickles read it still cannot run code.
    with weights_only_loads(deepspeed=bool(args.deepspeed)) if resume_path else contextlib.nullcontext():
        try:
            result = trainer.train(resume_from_checkpoint=resume_path)
        except pickle.UnpicklingError as err:
            # torch's message spans a dozen lines; what it refused is "GLOBAL <module.name>", or
            # else its last line before the pointer to its documentation.
            found = re.search(r"GLOBAL (\S+)", str(err))
            lines = [line for line in str(err).splitlines() if line.strip() and not line.startswith("Check the doc")]
            reason = f"it references {found.group(1)}" if found else lines[-1]
            raise SystemExit(
                f"Cannot resume: a file in {resume_path} changed after it was checked and holds a pickle that "
                f"weights_only loading refuses ({reason}): it was not written by this trainer. Delete the "
                "checkpoint or resume from another one."
            ) from None
    if preemption.requested:
        step = trainer.state.global_step
        stream.end(step, "preempted")
        if uploader is not None:
            uploader.close(timeout=preemption.remaining_s())
            where = f"uploaded to {uploader.store.uri}" if any(m["name"] == f"checkpoint-{step}" for m in uploader.uploaded) else "upload not finished within the grace period"
        else:
            where = f"kept in {output_dir / 'checkpoints'}"
        raise SystemExit(f"Preempted (SIGTERM) at step {step}: checkpoint-{step} {where}.")
    # The epoch/step schedule usually evaluated at the last step already: do not pay for it twice.
    # The log history goes back to step 0 on a resumed run too (the checkpoint carries it).
    eval_history = eval_losses(trainer.state.log_history)
    if not eval_history or eval_history[-1][0] != trainer.state.global_step:
        trainer.evaluate()
        eval_history = eval_losses(trainer.state.log_history)
    eval_after = eval_history[-1][1]
    evaluation = []
    # Generation ran inside trainer.train(): keep it out of the training throughput (since step 0).
    generation_s = generation_eval.seconds if generation_eval is not None else 0.0
    if generation_eval is not None:
        # All ranks know the last answered step (each took part), so all agree on this.
        answered_steps = generation_eval.last_step
        if answered_steps != trainer.state.global_step:
            generation_eval.answer(trainer.state, trainer.model, "final")
        evaluation = generation_eval.points
    # Gathers ZeRO-3 shards into one safetensors model (under LoRA: the adapter alone).
    adapter_dir = output_dir / ADAPTER_DIR if model_args.peft != "none" and model_args.merge_adapter else output_dir
    trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        # save_model pickles the TrainingArguments beside the weights: no part of a model (PUBLISHED).
        (adapter_dir / TRAINING_ARGS).unlink(missing_ok=True)
    state = trainer.state

    eval_before = eval_history[0][1]  # eval_on_start at step 0: the loss of the untrained model
    # Since step 0: earlier attempts up to the resumed checkpoint, then this one.
    runtime = stream.restored_train_seconds + float(result.metrics["train_runtime"])
    tokens = int(state.num_input_tokens_seen)
    metrics = {
        "base_model": model_args.base_model,
        "dataset": data_args.dataset,
        "dataset_fingerprint": data.fingerprint,
        "precision": precision,
        "world_size": args.world_size,
        "train_rows": len(train_set),
        "eval_rows": len(eval_set),
        "dropped_long_rows": dropped_train + dropped_eval,
        "skipped_bad_rows": data.skipped_rows,
        "prompt_format": data_args.prompt_format,
        "end_marker": marker,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_loss_history": eval_history,
        "perplexity_before": math.exp(min(eval_before, 50.0)),
        "perplexity_after": math.exp(min(eval_after, 50.0)),
        "ended_share_base": evaluation[0]["ended_share"] if evaluation else None,
        "ended_share_final": evaluation[-1]["ended_share"] if evaluation else None,
        "evaluation": evaluation,
        "train_loss": whole_train_loss(state.log_history, start_step=start_step,
                                       attempt_loss=float(result.training_loss), global_step=int(state.global_step)),
        "train_runtime_s": runtime,
        "train_samples": round(len(train_set) * (state.epoch or 0.0)),  # sequences trained on
        "tokens": tokens,
        "evaluation_generation_s": generation_s,
        # Training throughput: tokens over the seconds spent inside optimizer steps (forward,
        # backward, update), as the card plots it. "overall" also pays for evaluation,
        # checkpoints and data loading (not for the answer generation).
        "tokens_per_second": tokens / stream.step_seconds if stream.step_seconds > 0 else 0.0,
        "tokens_per_second_overall": tokens / (runtime - generation_s) if runtime > generation_s else 0.0,
        "global_step": int(state.global_step),
        "epochs": float(state.epoch or 0.0),
        "total_runtime_s": time.time() - started,  # this attempt, start-up included
        "resumed_from_step": start_step,
        "peft": model_args.peft,
        "lora": ({"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": model_args.lora_dropout,
                  "target_modules": model_args.lora_target_modules, "merged": model_args.merge_adapter}
                 if model_args.peft != "none" else None),
        "trainable_parameters": trainable,
        "parameters": parameters,
        # The newest checkpoint on this node's disk (model or adapter, optimizer and trainer state).
        "checkpoint_bytes": _newest_checkpoint_bytes(output_dir / "checkpoints"),
        # This rank's peak so far: GPU memory the tensors took, else (CPU) the process's resident set.
        "peak_memory_bytes": _peak_memory_bytes(cuda),
    }
    not_uploaded = []
    if uploader is not None:
        uploader.close()
        metrics["checkpoints_uploaded"] = [m["name"] for m in uploader.uploaded]
        not_uploaded += uploader.failures
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(adapter_dir))
        merged = adapter_dir != output_dir
        if merged:
            metrics["adapter_bytes"] = _bytes_in(adapter_dir)
            _log(f"merging the adapter ({metrics['adapter_bytes'] / 1e6:.1f} MB) into the base model")
            save_merged(adapter_dir, output_dir, dtype=dtype, trust_remote_code=model_args.trust_remote_code,
                        cache_dir=cache_dir)
        elif model_args.peft != "none":
            metrics["adapter_bytes"] = sum((output_dir / f).stat().st_size for f in published_files(output_dir, merged_adapter=False)
                                           if f.name != METRICS_FILE)
        if train_args.s3_uri:
            metrics["model_location"] = f"{train_args.s3_uri.rstrip('/')}/model"
        (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        stream.end(metrics["global_step"], "done")  # training is done, whatever the uploads below do
        if train_args.s3_uri:
            run_store = S3CheckpointStore(train_args.s3_uri)
            try:
                model_manifest = publish_model(output_dir, published_files(output_dir, merged_adapter=merged), run_store)
                if events := tensorboard_files(output_dir):  # tensorboard --logdir s3://.../logs
                    publish_model(output_dir, events, run_store, name="logs", folder="logs")
                kept = set(S3CheckpointStore(f"{run_store.uri}/checkpoints").names())
            except CheckpointStoreError as err:
                not_uploaded.append(f"the model ({metrics['model_location']}): {err}")
            else:
                uploads = {
                    "model_location": metrics["model_location"],
                    "model": model_manifest,
                    "checkpoints": {
                        f"{run_store.uri}/checkpoints/{m['name']}": m for m in uploader.uploaded if m["name"] in kept
                    },
                }
                # Written after the model upload, so it is not part of it: the flow reads it.
                (output_dir / UPLOADS_FILE).write_text(json.dumps(uploads, indent=1))
                _log(f"final model uploaded to {metrics['model_location']}")
        _log(
            f"done: eval loss {eval_before:.4f} -> {metrics['eval_loss_after']:.4f}, "
            f"{metrics['global_step']} steps, {metrics['tokens_per_second']:.0f} tokens/s; model in {output_dir}"
        )
    if not_uploaded:
        raise SystemExit(
            f"Training finished: the model is in {output_dir}, the checkpoints in {output_dir / 'checkpoints'}; "
            "these did not upload:\n  " + "\n  ".join(not_uploaded)
        )
    return metrics


def _bytes_in(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def published_files(output_dir: Path, *, merged_adapter: bool) -> list[Path]:
    """What of ``output_dir`` is the model (paths relative to it): the names PUBLISHED allows, at
    its top and, when the adapter was merged, in its adapter/ folder; regular files, never a symlink."""
    folders = [output_dir, output_dir / ADAPTER_DIR] if merged_adapter else [output_dir]
    return [path.relative_to(output_dir) for folder in folders if folder.is_dir() and not folder.is_symlink()
            for path in sorted(folder.iterdir())
            if not path.is_symlink() and path.is_file() and any(fnmatch(path.name, p) for p in PUBLISHED)]


def publish_model(output_dir: Path, files: list[Path], store: S3CheckpointStore, *, name: str = "model",
                  folder: str = "") -> dict[str, Any]:
    """Upload ``files`` of ``output_dir / folder`` (published_files, tensorboard_files) as
    ``<store uri>/<name>``; returns the manifest. The store uploads whole folders: the files are
    hard-linked into a staging folder that holds nothing else, and that folder is uploaded."""
    source = output_dir / folder
    staged = output_dir / STAGING / name
    shutil.rmtree(staged, ignore_errors=True)
    try:
        for relative in files:
            (staged / relative).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / relative, staged / relative)
            except OSError:  # a file system without hard links: a copy, for the upload's duration
                shutil.copy2(source / relative, staged / relative)
        return store.upload(staged, name=name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def tensorboard_files(output_dir: Path) -> list[Path]:
    """TensorBoard's event files under ``output_dir/logs`` (relative to it), regular files only:
    with ``--output_dir .`` a user's own ``logs/`` folder is not uploaded with them."""
    logs = output_dir / "logs"
    return sorted(path.relative_to(logs) for path in logs.rglob("events.out.tfevents.*")
                  if path.is_file() and not path.is_symlink()) if logs.is_dir() else []


def _s3_access_problems(train_args: TrainArguments) -> list[str]:
    """Each S3 prefix the run reads or writes, listed now: missing credentials or an unreachable
    endpoint show in seconds, not after the data is tokenized and the model loaded."""
    flags = [("--s3_uri", f"{train_args.s3_uri.rstrip('/')}/checkpoints" if train_args.s3_uri.startswith("s3://") else ""),
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


def _peak_memory_bytes(cuda: bool) -> int:
    import resource

    import torch

    if cuda:
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _newest_checkpoint_bytes(checkpoints: Path) -> int | None:
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    return _bytes_in(found[-1]) if found else None


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m training.trainer`` and ``deepspeed --module training.trainer``."""
    model_args, data_args, train_args = parse_args(argv)
    from training.base_model import BaseModelError
    from training.dataset import DatasetError

    try:
        train(model_args, data_args, train_args)
    except (DatasetError, BaseModelError, CheckpointStoreError, EvalInstructionsError) as err:
        raise SystemExit(f"Cannot train: {err}") from None
    finally:
        _release_deepspeed_shared_memory()


def _release_deepspeed_shared_memory() -> None:
    """Remove this rank's DeepSpeed CPU all-reduce segment (training/shared_memory.py): by the
    end every rank has long mapped the others' segments."""
    remove_deepspeed_segments(os.environ.get("MASTER_PORT", ""), rank=os.environ.get("RANK", "0"),
                              addr=os.environ.get("MASTER_ADDR", ""))


def _exit_without_teardown() -> None:
    """End the process here once train() returned, without the interpreter's teardown.

    Everything is written and closed by then (model, metrics, logs; uploads finished in train()),
    and the atexit handlers still run; what is skipped is Py_Finalize, for two reasons:
    - time: 2-3 s of every run on 2 cores after the last line is printed (torch's and DeepSpeed's
      modules and threads torn down one by one; measured with the tiny model, where the whole
      train() takes about as long);
    - on several CPU (gloo) ranks, crashes: left to Py_Finalize, 6 of 33 runs of two ZeRO-3 CPU
      ranks aborted after finishing ("terminate called without an active exception", exit -6),
      and the launcher then failed the job although the model was saved. A core dump showed why:
      a gloo worker thread completing an async all-gather whose handle Python had already
      dropped (ZeRO-3 gathers weights this way) frees its tensors, which needs the GIL; during
      finalization Python ends such a thread with pthread_exit, whose unwinding through torch's
      noexcept destructor calls std::terminate. destroy_process_group() did not help (the groups
      live on in DeepSpeed's globals). With this exit, 30 of 30 runs passed.
    """
    import atexit

    atexit._run_exitfuncs()  # logging.shutdown, weakref finalizers: what a normal exit would run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    import atexit
    import gc

    # A run that stops with an error still exits through the interpreter's teardown: with the
    # objects frozen, the collector does not walk torch's and transformers' again (~2 s).
    atexit.register(gc.freeze)
    main(sys.argv[1:])
    _exit_without_teardown()  # here, not in main(): a test calling main() keeps its process
