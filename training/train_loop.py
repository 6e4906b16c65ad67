"""The phases of ``train()`` that run the Trainer: its callbacks, the fit, the final evaluation
and the save. The Trainer class and the collator come from the caller's earlier phases, so that
another training method can reuse these with its own.

    watch = make_callbacks(train_args, rows, tokens, args, output_dir, node=0, nodes=1)
    run = fit(Trainer, built, tokens, args, watch, resume_path, output_dir)
    final = final_evaluation(run.trainer, watch)
    adapter_dir = save(run.trainer, model_args, output_dir)
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.adapters import ADAPTER_DIR
from training.arguments import ModelArguments, TrainArguments
from training.checkpoint_store import S3CheckpointStore
from training.evaluation import evaluation_callback
from training.preemption import PreemptionWatch
from training.progress import PROGRESS_FILE, progress_callback
from training.run_history import eval_losses, missed_epoch_end
from training.s3_uploads import STAGING, BackgroundUploader, upload_callback
from training.safe_loading import TRAINING_ARGS, weights_only_loads
from training.train_inputs import BuiltModel, Rows, Tokens, log
from training.trainer_errors import CannotResume, Preempted


@dataclass(frozen=True)
class Watchers:
    """The callbacks that watch a fit, and the objects behind them the later phases read."""

    callbacks: list[Any]
    stream: Any  # training.progress: the metrics stream the live card reads
    preemption: PreemptionWatch
    generation: Any  # the evaluation answers' callback, None with --eval_instructions none
    uploader: BackgroundUploader | None  # checkpoints to S3 (one per node), None without --s3_uri


@dataclass(frozen=True)
class Fit:
    trainer: Any
    result: Any  # transformers' TrainOutput of this attempt
    start_step: int  # the step resumed from (0 for a fresh start)


@dataclass(frozen=True)
class FinalEvaluation:
    history: list[tuple[int, float]]  # (step, eval loss) since step 0
    answers: list[dict[str, Any]]  # evaluation points: answers before, during and after training
    generation_s: float  # seconds spent answering, kept out of the training throughput


def progress_printer() -> Any:
    """A callback printing one plain line per log event (tqdm bars are unreadable in a streamed
    task log); replaces transformers' PrinterCallback."""
    from transformers import TrainerCallback

    class PrintProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items()}
            fields = " ".join(f"{k}={v}" for k, v in shown.items())
            log(f"step {state.global_step}/{state.max_steps} {fields}")

    return PrintProgress()


def make_callbacks(train_args: TrainArguments, rows: Rows, tokens: Tokens, args: Any, output_dir: Path,
                   node: int, nodes: int) -> Watchers:
    """The metrics stream, the printed lines, SIGTERM handling, evaluation answers, S3 uploads."""
    preemption = PreemptionWatch(train_args.preemption_grace_s)
    # The metrics stream the flow's live card reads (rank 0 writes it); it comes first so that
    # the base model's evaluation point lands after its "begin" event.
    stream = progress_callback(output_dir / PROGRESS_FILE)
    callbacks = [stream, progress_printer(), preemption.callback()]
    generation = None
    if rows.instructions:
        # Every rank answers its share; under ZeRO-3 the ranks generate together (sharded weights).
        # In batches of --per_device_eval_batch_size, no flag of its own: it is already sized to
        # the device for the eval loss's forward passes (max_seq_length tokens, logits at every
        # position), which bound generation's (short prompts plus eval_max_new_tokens, logits
        # at the last position only), and the flow's eval_batch_size sets it on every config.
        generation = evaluation_callback(rows.instructions, tokens.tokenizer, train_args.eval_max_new_tokens,
                                         on_point=stream.evaluation_point,
                                         batch_size=train_args.per_device_eval_batch_size)
        callbacks.append(generation)
    uploader = None
    if train_args.s3_uri and args.local_process_index == 0:  # reachable: check_settings listed it
        # One uploader per node: each node's ranks wrote their ZeRO shards to that node's disk.
        store = S3CheckpointStore(f"{train_args.s3_uri.rstrip('/')}/checkpoints", node=node, nodes=nodes)
        uploader = BackgroundUploader(store, keep=train_args.save_total_limit, staging_root=output_dir / STAGING)
        callbacks.append(upload_callback(uploader))
    return Watchers(callbacks, stream, preemption, generation, uploader)


def fit(trainer_class: Any, built: BuiltModel, tokens: Tokens, args: Any, watch: Watchers,
        resume_path: str | None, output_dir: Path) -> Fit:
    """``trainer_class(...).train()``, resumed from ``resume_path`` under weights-only loading;
    raises Preempted after a SIGTERM (its checkpoint saved, and uploaded within the grace period)."""
    from transformers import PrinterCallback

    start_step = 0
    if resume_path:
        # The checkpoint's log history already holds the base model's eval loss (step 0) and every
        # evaluation since: evaluating again at its step would only add a point an uninterrupted
        # run does not have, unless the save came before that step's end-of-epoch evaluation.
        saved_state = json.loads((Path(resume_path) / "trainer_state.json").read_text())
        args.eval_on_start = not args.eval_steps and missed_epoch_end(saved_state)
        start_step = int(saved_state["global_step"])
    trainer = trainer_class(model=built.model, args=args, train_dataset=tokens.train_set, eval_dataset=tokens.eval_set,
                            data_collator=built.collator, processing_class=tokens.tokenizer, callbacks=watch.callbacks)
    trainer.remove_callback(PrinterCallback)  # progress_printer prints one readable line instead
    # Resuming, every torch.load is weights_only with the allowlist (DeepSpeed asks for
    # weights_only=False): a checkpoint file swapped after unsafe_pickles read it still cannot run code.
    with weights_only_loads(deepspeed=bool(args.deepspeed)) if resume_path else contextlib.nullcontext():
        try:
            result = trainer.train(resume_from_checkpoint=resume_path)
        except pickle.UnpicklingError as err:
            raise CannotResume(_refused_pickle(err, resume_path)) from None
    if watch.preemption.requested:
        step = trainer.state.global_step
        watch.stream.end(step, "preempted")
        if watch.uploader is not None:
            watch.uploader.close(timeout=watch.preemption.remaining_s())
            uploaded = any(m["name"] == f"checkpoint-{step}" for m in watch.uploader.uploaded)
            where = (f"uploaded to {watch.uploader.store.uri}" if uploaded
                     else "upload not finished within the grace period")
        else:
            where = f"kept in {output_dir / 'checkpoints'}"
        raise Preempted(f"Preempted (SIGTERM) at step {step}: checkpoint-{step} {where}.")
    return Fit(trainer, result, start_step)


def _refused_pickle(err: pickle.UnpicklingError, resume_path: str | None) -> str:
    # torch's message spans a dozen lines; what it refused is "GLOBAL <module.name>", or
    # else its last line before the pointer to its documentation.
    found = re.search(r"GLOBAL (\S+)", str(err))
    lines = [line for line in str(err).splitlines() if line.strip() and not line.startswith("Check the doc")]
    reason = f"it references {found.group(1)}" if found else lines[-1]
    return (f"Cannot resume: a file in {resume_path} changed after it was checked and holds a pickle that "
            f"weights_only loading refuses ({reason}): it was not written by this trainer. Delete the "
            "checkpoint or resume from another one.")


def final_evaluation(trainer: Any, watch: Watchers) -> FinalEvaluation:
    """The eval loss and the answers at the last step, unless the schedule already took them."""
    # The log history goes back to step 0 on a resumed run too (the checkpoint carries it).
    history = eval_losses(trainer.state.log_history)
    if not history or history[-1][0] != trainer.state.global_step:
        trainer.evaluate()
        history = eval_losses(trainer.state.log_history)
    answers: list[dict[str, Any]] = []
    # Generation ran inside trainer.train(): keep it out of the training throughput (since step 0).
    generation_s = watch.generation.seconds if watch.generation is not None else 0.0
    if watch.generation is not None:
        # All ranks know the last answered step (each took part), so all agree on this.
        if watch.generation.last_step != trainer.state.global_step:
            watch.generation.answer(trainer.state, trainer.model, "final")
        answers = watch.generation.points
    return FinalEvaluation(history, answers, generation_s)


def save(trainer: Any, model_args: ModelArguments, output_dir: Path) -> Path:
    """The trained weights in one safetensors model, ZeRO-3 shards gathered (under LoRA with a
    merge to come: the adapter alone, in ``adapter/``); returns the folder."""
    adapter_dir = output_dir / ADAPTER_DIR if model_args.peft != "none" and model_args.merge_adapter else output_dir
    trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        # save_model pickles the TrainingArguments beside the weights: no part of a model (PUBLISHED).
        (adapter_dir / TRAINING_ARGS).unlink(missing_ok=True)
    return adapter_dir
