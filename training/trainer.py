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

import os
import sys
import time
from pathlib import Path
from typing import Any

from training.adapters import quiet_missing_cpu_kernel_warning
from training.arguments import DataArguments, ModelArguments, TrainArguments, parse_args
from training.base_model import BaseModelError
from training.batching import LENGTH_COLUMN
from training.checkpoint_store import CheckpointStoreError
from training.dataset import DatasetError, default_cache_dir
from training.evaluation import EvalInstructionsError
from training.paths import resolve_repo_path
from training.shared_memory import remove_deepspeed_segments
from training.train_inputs import build_model, check_settings, choose_resume, load_rows, tokenize
from training.train_loop import final_evaluation, fit, make_callbacks, save
from training.train_outputs import RunInputs, collect_metrics, publish
from training.trainer_errors import TrainerError


def train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> dict[str, Any]:
    """Fine-tune and save; returns the metrics also written to ``output_dir/metrics.json``.

    Raises ``training.trainer_errors.TrainerError`` (and the data, model and storage errors) for
    what stops a run; ``main`` prints them in one message."""
    hardware = check_settings(model_args, data_args, train_args)
    quiet_missing_cpu_kernel_warning()  # before transformers' Trainer imports peft, which imports bitsandbytes
    from transformers import Trainer

    started = _quiet_and_seeded(train_args.seed)
    output_dir = Path(train_args.output_dir)
    cache_dir = Path(data_args.cache_dir) if data_args.cache_dir else default_cache_dir()
    rows = load_rows(data_args, train_args, cache_dir)
    # TrainingArguments comes before the model: with ZeRO-3 it switches on deepspeed.zero.Init so
    # from_pretrained loads each rank's shard instead of a full copy per rank.
    args = hf_training_arguments(model_args, train_args, precision=hardware.precision, cuda=hardware.cuda)
    _cpu_deepspeed_comm(args, cuda=hardware.cuda)
    node, nodes = node_layout(args.process_index, args.world_size)
    resume_path = choose_resume(train_args, args, output_dir, node, nodes)
    tokens = tokenize(model_args, data_args, rows, args, cache_dir)
    built = build_model(model_args, train_args, tokens, hardware, args)
    watch = make_callbacks(train_args, rows, tokens, args, output_dir, node, nodes)
    run = fit(Trainer, built, tokens, args, watch, resume_path, output_dir)
    final = final_evaluation(run.trainer, watch)
    adapter_dir = save(run.trainer, model_args, output_dir)
    inputs = RunInputs(model_args, data_args, hardware, rows, tokens)
    metrics = collect_metrics(inputs, built, run, final, watch, args, started=started, output_dir=output_dir)
    publish(metrics, run, inputs, train_args, watch, output_dir=output_dir, adapter_dir=adapter_dir,
            dtype=built.dtype, cache_dir=cache_dir)
    return metrics


def _quiet_and_seeded(seed: int) -> float:
    """Progress bars off (unreadable in a streamed task log; progress_printer logs plain lines),
    the seed set; returns the time train() counts its runtime from."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    started = time.time()
    transformers.set_seed(seed)
    return started


def _cpu_deepspeed_comm(args: Any, *, cuda: bool) -> None:
    if args.deepspeed and args.world_size > 1 and not cuda:
        # On CPU ranks accelerate sets up torch.distributed (gloo) but not DeepSpeed's own comm
        # layer; ZeRO-3's zero.Init would then count a world of 1 and fail its batch-size check.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def node_layout(process_index: int, world_size: int) -> tuple[int, int]:
    """(this process's node index, number of nodes). Launchers number ranks node by node; the
    ranks per node come from torchrun's LOCAL_WORLD_SIZE or the deepspeed launcher's LOCAL_SIZE."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size or 1)
    return process_index // per_node, max(1, world_size // per_node)


def hf_training_arguments(model_args: ModelArguments, train_args: TrainArguments, *, precision: str,
                          cuda: bool, **overrides: Any) -> Any:
    """The transformers ``TrainingArguments`` that ``train()`` runs with, from our arguments.

    Shared with the benchmarks (``benchmarks/trainer_vs_bare_loop.py``, ``benchmarks/gpu_mfu.py``),
    so that they measure this trainer's settings; ``overrides`` replace single values there.
    """
    from transformers import TrainingArguments

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


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m training.trainer`` and ``deepspeed --module training.trainer``."""
    model_args, data_args, train_args = parse_args(argv)
    try:
        train(model_args, data_args, train_args)
    except TrainerError as err:
        raise SystemExit(err.report()) from None
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
