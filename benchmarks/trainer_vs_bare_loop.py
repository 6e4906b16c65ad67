"""Training throughput of our trainer path against a bare PyTorch loop, measured in one run.

    python benchmarks/trainer_vs_bare_loop.py               # tiny model (+ablations), then SmolLM2
                                                            # (~2.5 min on 2 idle cores)
    python benchmarks/trainer_vs_bare_loop.py --quick       # tiny model only, one round (~25 s)
    python benchmarks/trainer_vs_bare_loop.py --deepspeed   # adds ZeRO-2 on one CPU rank (+~2 min)

Our path is the HF Trainer with the TrainingArguments ``training/trainer.py`` builds (fused AdamW,
max_grad_norm 1.0, logging every 5 steps to TensorBoard, non-padding token counting), its
callbacks (metrics stream, progress lines, SIGTERM watch), ``PaddingCollator`` and the data from
``tokenize_rows``. Evaluation and checkpoints are switched off: this measures training steps only.
The bare loop loads the same model the same way and runs the same batches in the same order
(one order drawn up front, length-grouped as the trainer's default --group_by_length sampler
draws it, or random with --random-batches, replaces the Trainer's own sampler) through
a plain ``DataLoader`` with the same collator: forward, backward, ``torch.optim.AdamW.step``
(torch's defaults: not fused), ``zero_grad``. With ``--deepspeed`` the Trainer also runs under
``deepspeed --num_gpus 1`` with ``ds_configs/zero2.json`` on one CPU rank, as the flow does on a
machine without a GPU, paired with its own bare loop in that process.

The two run interleaved: before each Trainer step, the bare loop takes its step on the same batch
(timed apart), so a change in the background load of shared cores hits both alike. Throughput
counts real (non-padding) tokens over the measured steps; a Trainer step runs from its batch fetch
to the end of its logging, so everything the Trainer does between steps is in it. Each phase is
timed exclusively (a callback called from the logging code counts as the callback), so the
phases and "other" add up to the step time. The tiny model's ablations change one
TrainingArguments value each and compare the tokens/s ratio to the bare loop with the default's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `training` (and tests.conftest for the tiny model) importable

BUNDLED = "bundled:smollm2-135m-instruct"
# Phases in the order the tables show them.
PHASES = ("dataloader", "forward", "backward", "grad norm + clip", "optimizer step", "lr scheduler",
          "zero_grad", "tokens-seen count", "logging", "callbacks", "other")


class Phases:
    """Exclusive time per phase: a wrapped call nested in another is taken out of the outer one."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.active = False
        self._stack: list[list[float]] = []

    def wrap(self, name: str, fn: Any) -> Any:
        # wraps: keeps markers such as the LR scheduler's _wrapped_by_lr_sched on optimizer.step
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([0.0])
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                inner = self._stack.pop()[0]
                if self.active:
                    self.totals[name] += elapsed - inner
                if self._stack:
                    self._stack[-1][0] += elapsed

        return timed


def build_inputs(model: str, max_seq_length: int, cache_dir: Path, work: Path) -> tuple[str, Any, Any]:
    """(model path, tokenizer, tokenized train set), made as the trainer makes them."""
    from training.base_model import load_tokenizer, resolve_base_model
    from training.batching import tokenize_rows
    from training.dataset import load_instruction_data, sample_and_split

    if model == "tiny":
        # The tests' tiny random Llama (2 layers, hidden 32) and BPE tokenizer, built in code.
        from tests.conftest import build_tiny_model

        model_path = str(work / "tiny-llama")
        if not Path(model_path, "config.json").is_file():
            build_tiny_model(Path(model_path))
    else:
        model_path = resolve_base_model(model, cache_dir)
    tokenizer = load_tokenizer(model_path)
    data = load_instruction_data("bundled:dolly-sample", cache_dir=cache_dir)
    train_rows, _ = sample_and_split(data, sample_fraction=1.0, test_size=0.1, seed=42)
    train_set, _ = tokenize_rows(train_rows, tokenizer, max_seq_length=max_seq_length,
                                 cache_dir=cache_dir / "tokenized", split="train")
    return model_path, tokenizer, train_set


def fixed_order(train_set: Any, batch: int, steps: int, grouped: bool, seed: int = 42) -> list[int]:
    """The row order every path uses, drawn once: length-grouped as the trainer's default sampler
    draws it (transformers' LengthGroupedSampler on the stored lengths), or a plain permutation;
    repeated if the steps need more rows than there are."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from training.batching import LENGTH_COLUMN

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < batch * steps:
        if grouped:
            order += list(LengthGroupedSampler(batch, lengths=train_set[LENGTH_COLUMN], generator=generator))
        else:
            order += torch.randperm(len(train_set), generator=generator).tolist()
    return order[: batch * steps]


def training_arguments(output_dir: Path, *, batch: int, max_steps: int, deepspeed: str | None,
                       precision: str = "fp32", cuda: bool = False, **overrides: Any) -> Any:
    """training/trainer.py's own TrainingArguments (``hf_training_arguments``) with the trainer's
    default arguments, for ``batch`` sequences a step and ``max_steps`` steps, without evaluation
    and checkpoints (not training steps); ``overrides`` are the ablations."""
    from training.arguments import ModelArguments, TrainArguments
    from training.trainer import hf_training_arguments

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(output_dir / "logs")  # each run its own
    train_args = TrainArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch,
                                per_device_eval_batch_size=batch, deepspeed=deepspeed or "")
    return hf_training_arguments(ModelArguments(), train_args, precision=precision, cuda=cuda,
                                 **{"eval_on_start": False, "eval_strategy": "no", "save_strategy": "no", **overrides})


def summarize(path: str, step_s: list[float], tokens: list[int], warmup: int, phases: dict[str, float],
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Throughput and the mean per-step phase split over the measured steps (after ``warmup``)."""
    measured = step_s[warmup:]
    seconds = sum(measured)
    callbacks = {name: value / len(measured) for name, value in phases.items() if name.startswith("callback")}
    phases = {**phases, "callbacks": sum(callbacks.values()) * len(measured)}
    per_step = {name: phases.get(name, 0.0) / len(measured) for name in PHASES if name != "other"}
    per_step["other"] = seconds / len(measured) - sum(per_step.values())
    return {"path": path, "tokens": sum(tokens[warmup:]), "seconds": seconds,
            "tokens_per_s": sum(tokens[warmup:]) / seconds, "step_s": measured,
            "step_tokens": tokens[warmup:], "phases": per_step, "callbacks": callbacks, **(extra or {})}


class BareLoop:
    """A plain PyTorch loop over the same batches, one step per call, so it can run interleaved.

    Grad-norm clipping is timed on its gradients (the Trainer's extra pass) but is not part of
    its step time.
    """

    def __init__(self, model_path: str, tokenizer: Any, train_set: Any, order: list[int], batch: int) -> None:
        import torch
        from torch.utils.data import DataLoader

        from training.base_model import load_model
        from training.batching import PaddingCollator

        self.torch = torch
        self.model = load_model(model_path, tokenizer, dtype=torch.float32)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-5, weight_decay=0.0)
        loader = DataLoader(train_set, batch_size=batch, sampler=order,
                            collate_fn=PaddingCollator(tokenizer.pad_token_id))
        self.batches = iter(loader)
        self.step_s: list[float] = []
        self.tokens: list[int] = []
        self.phases: dict[str, float] = defaultdict(float)
        self.clip_s = 0.0

    def step(self, measured: bool) -> None:
        clock = time.perf_counter
        started = clock()
        inputs = next(self.batches)
        fetched = clock()
        self.tokens.append(int(inputs["attention_mask"].sum()))
        counted = clock()
        loss = self.model(**inputs).loss
        forward = clock()
        loss.backward()
        backward = clock()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        clipped = clock()
        self.optimizer.step()
        stepped = clock()
        self.optimizer.zero_grad(set_to_none=True)
        done = clock()
        self.step_s.append(done - started - (clipped - backward) - (counted - fetched))
        if measured:
            self.phases["dataloader"] += fetched - started
            self.phases["forward"] += forward - counted
            self.phases["backward"] += backward - forward
            self.phases["optimizer step"] += stepped - clipped
            self.phases["zero_grad"] += done - stepped
            self.clip_s += clipped - backward

    def result(self, warmup: int) -> dict[str, Any]:
        measured = len(self.step_s) - warmup
        return summarize("bare loop", self.step_s, self.tokens, warmup, self.phases,
                         {"optimizer": "AdamW (torch defaults)", "clip_s_per_step": self.clip_s / measured,
                          "parameters": sum(p.numel() for p in self.model.parameters())})


def run_pair(model_path: str, tokenizer: Any, train_set: Any, order: list[int], *, batch: int,
             warmup: int, steps: int, work: Path, deepspeed: str | None = None,
             label: str = "HF Trainer", **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer, bare loop) results: our trainer path for warmup + steps optimizer steps with a
    bare-loop step on the same batch run just before each of its steps (timed apart), so that a
    change in background load hits both alike."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback

    from training.base_model import load_model
    from training.batching import PaddingCollator
    from training.preemption import PreemptionWatch
    from training.progress import PROGRESS_FILE, progress_callback
    from training.train_loop import progress_printer

    output_dir = Path(tempfile.mkdtemp(dir=work, prefix="trainer-"))
    total = warmup + steps
    bare = BareLoop(model_path, tokenizer, train_set, order, batch)
    args = training_arguments(output_dir, batch=batch, max_steps=total, deepspeed=deepspeed, **overrides)
    model = load_model(model_path, tokenizer, dtype=torch.float32)
    phases = Phases()
    step_s: list[float] = []
    tokens: list[int] = []
    started: list[float] = []  # the current step's start
    found: dict[str, Any] = {}

    class Hooks(TrainerCallback):
        """Wraps what train() creates (optimizer, scheduler) once it exists; no per-step work."""

        def on_train_begin(self, args, state, control, **kwargs):
            optimizer = trainer.optimizer
            inner = getattr(optimizer, "optimizer", optimizer)
            found["optimizer"] = (type(inner).__name__
                                  + (" (fused)" if getattr(inner, "defaults", {}).get("fused") else ""))
            optimizer.step = phases.wrap("optimizer step", optimizer.step)
            trainer.lr_scheduler.step = phases.wrap("lr scheduler", trainer.lr_scheduler.step)
            trainer.model_wrapped.zero_grad = phases.wrap("zero_grad", trainer.model_wrapped.zero_grad)
            if trainer.is_deepspeed_enabled:  # optimizer.step is a no-op there: the engine steps
                engine = trainer.model_wrapped
                engine.step = phases.wrap("optimizer step", engine.step)

    stream = progress_callback(output_dir / PROGRESS_FILE)
    callbacks = [stream, progress_printer(), PreemptionWatch(25.0).callback()]
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      data_collator=PaddingCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                      callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer._get_train_sampler = lambda train_dataset=None: order  # the same rows, same order

    events = [name for name in dir(TrainerCallback) if name.startswith("on_")]
    for callback in trainer.callback_handler.callbacks:  # ours and HF's (TensorBoard, flow control)
        for event in events:
            setattr(callback, event, phases.wrap(f"callback {type(callback).__name__}", getattr(callback, event)))
    trainer.add_callback(Hooks())
    handler = trainer.callback_handler
    handler.call_event = phases.wrap("callback dispatch", handler.call_event)  # the handler's own loop
    fetch = phases.wrap("dataloader", trainer.get_batch_samples)

    def end_step() -> None:
        if started:
            step_s.append(time.perf_counter() - started.pop())

    def get_batch_samples(*args: Any, **kwargs: Any) -> Any:
        end_step()
        bare.step(measured=len(step_s) >= warmup)  # outside the trainer's clock and phases
        phases.active = len(step_s) >= warmup
        started.append(time.perf_counter())
        batches, items = fetch(*args, **kwargs)
        counting = time.perf_counter()
        tokens.append(sum(int(b["attention_mask"].sum()) for b in batches))
        started[-1] += time.perf_counter() - counting  # our counting is not the trainer's time
        return batches, items

    log = phases.wrap("logging", trainer._maybe_log_save_evaluate)

    def maybe_log_save_evaluate(*args: Any, **kwargs: Any) -> Any:
        result = log(*args, **kwargs)
        if trainer.state.global_step == total and started:
            end_step()
            phases.active = False
        return result

    trainer.get_batch_samples = get_batch_samples
    trainer._maybe_log_save_evaluate = maybe_log_save_evaluate
    # training_step less the backward inside it: the forward pass and the loss.
    trainer.training_step = phases.wrap("forward", trainer.training_step)
    # Under DeepSpeed this also runs the engine's step, which the hooks time as the optimizer's.
    trainer.accelerator.backward = phases.wrap("backward", trainer.accelerator.backward)
    trainer._clip_grad_norm = phases.wrap("grad norm + clip", trainer._clip_grad_norm)
    trainer._track_num_input_tokens = phases.wrap("tokens-seen count", trainer._track_num_input_tokens)
    with contextlib.redirect_stdout(io.StringIO()):  # PrintProgress lines: the flow pipes them
        trainer.train()
    stream.end(trainer.state.global_step, "done")
    result = summarize(label, step_s, tokens, warmup, phases.totals, {"optimizer": found["optimizer"]})
    shutil.rmtree(output_dir, ignore_errors=True)
    return result, bare.result(warmup)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_deepspeed(spec: dict[str, Any], work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer path under `deepspeed --num_gpus 1` (ZeRO-2, one CPU rank), in a child process."""
    spec_path = work / "ds-spec.json"
    out = work / "ds-result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(out)}))
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    command = [launcher, "--num_gpus", "1", "--master_port", str(free_port()), str(Path(__file__).resolve()),
               "--ds-worker", str(spec_path)]
    started = time.perf_counter()
    # accelerate sets torch's threads to the physical cores in a distributed CPU run unless
    # OMP_NUM_THREADS is set: set it, so both paths in the child use the threads asked for.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(spec["threads"])}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"DeepSpeed worker failed ({done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    trainer, bare = json.loads(out.read_text())
    trainer["process_s"] = time.perf_counter() - started
    return trainer, bare


def ds_worker(spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    model_path, tokenizer, train_set = build_inputs(spec["model"], spec["max_seq_length"],
                                                    Path(spec["cache_dir"]), work)
    pair = run_pair(model_path, tokenizer, train_set, spec["order"], batch=spec["batch"], warmup=spec["warmup"],
                    steps=spec["steps"], work=work, deepspeed=spec["ds_config"], label=spec["label"])
    Path(spec["result"]).write_text(json.dumps(pair))


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds of one path as one result: tokens over seconds, phases averaged per step."""
    combined = dict(runs[0])
    combined["tokens"] = sum(r["tokens"] for r in runs)
    combined["seconds"] = sum(r["seconds"] for r in runs)
    combined["tokens_per_s"] = combined["tokens"] / combined["seconds"]
    combined["step_s"] = [s for r in runs for s in r["step_s"]]
    combined["step_tokens"] = [t for r in runs for t in r["step_tokens"]]
    combined["phases"] = {name: statistics.mean(r["phases"][name] for r in runs) for name in PHASES}
    combined["callbacks"] = {name: statistics.mean(r["callbacks"][name] for r in runs) for name in runs[0]["callbacks"]}
    if "clip_s_per_step" in combined:
        combined["clip_s_per_step"] = statistics.mean(r["clip_s_per_step"] for r in runs)
    return combined


def paired_ratio(trainer: dict[str, Any], bare: dict[str, Any]) -> float:
    """Median over steps of bare / trainer step time (the same batch, run back to back)."""
    return statistics.median(b / t for b, t in zip(bare["step_s"], trainer["step_s"], strict=True))


def print_results(title: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    print(f"\n== {title}")
    print(f"{'path':<30}{'tokens/s':>10}{'median ms/step':>16}{'ratio':>8}{'paired':>8}   optimizer")
    for trainer, bare in pairs:
        for r in (bare, trainer):
            ratio = r["tokens_per_s"] / bare["tokens_per_s"]
            name = r["path"] if r is trainer else f"  bare loop, with {trainer['path']}"
            print(f"{name:<30}{r['tokens_per_s']:>10.0f}{statistics.median(r['step_s']) * 1e3:>16.1f}"
                  f"{ratio:>8.3f}{paired_ratio(r, bare):>8.3f}   {r['optimizer']}")
    same = all(t["step_tokens"] == b["step_tokens"] for t, b in pairs)
    print("ratio: tokens/s over its interleaved bare loop's (target >= 0.95); paired: median over steps of "
          f"bare/this step time on the same batch; tokens: non-padding; same batches in every path: {same}")
    columns = [r for pair in pairs for r in (pair[1], pair[0])]
    print(f"\nms per step, mean over the measured steps{'':<4}"
          + "".join(f"{('bare' if r['path'] == 'bare loop' else r['path'])[:16]:>17}" for r in columns))
    for name in PHASES:
        print(f"  {name:<42}" + "".join(f"{r['phases'][name] * 1e3:>17.2f}" for r in columns))
    print(f"  {'step (sum)':<42}" + "".join(f"{sum(r['phases'].values()) * 1e3:>17.2f}" for r in columns))
    for trainer, bare in pairs:
        step_t, step_b = sum(trainer["phases"].values()), sum(bare["phases"].values())
        swapped = step_b - bare["phases"]["optimizer step"] + trainer["phases"]["optimizer step"]
        print(f"{trainer['path']}: step time ratio bare/trainer {step_b / step_t:.3f}; with the bare loop's "
              f"optimizer step replaced by the trainer's ({bare['phases']['optimizer step'] * 1e3:.1f} -> "
              f"{trainer['phases']['optimizer step'] * 1e3:.1f} ms): {swapped / step_t:.3f}")
    for trainer, _ in pairs:
        print(f"callbacks of {trainer['path']}, ms per step: "
              + ", ".join(f"{name.removeprefix('callback ')} {value * 1e3:.3f}"
                          for name, value in sorted(trainer["callbacks"].items(), key=lambda kv: -kv[1])))
    clip = statistics.mean(bare["clip_s_per_step"] for _, bare in pairs)
    print("grad norm + clip timed in the bare loop on the same gradients (not in its step time): "
          f"{clip * 1e3:.2f} ms/step")


def measure_model(model: str, *, threads: int, grouped: bool, batch: int, warmup: int, steps: int,
                  rounds: int, max_seq_length: int, cache_dir: Path, work: Path, deepspeed: str,
                  ablations: bool) -> None:
    """Print the tables for one model; ``deepspeed``: a DeepSpeed config to run as well, or ""."""
    import torch

    torch.set_num_threads(threads)
    loaded = time.perf_counter()
    model_path, tokenizer, train_set = build_inputs(model, max_seq_length, cache_dir, work)
    order = fixed_order(train_set, batch, warmup + steps, grouped)
    setup_s = time.perf_counter() - loaded
    common = dict(batch=batch, warmup=warmup, steps=steps)
    rounds_run = [run_pair(model_path, tokenizer, train_set, order, work=work, **common) for _ in range(rounds)]
    pairs = [(combine([t for t, _ in rounds_run]), combine([b for _, b in rounds_run]))]
    if deepspeed:
        label = "Trainer + ZeRO-2" if Path(deepspeed).name == "zero2.json" else f"Trainer + {Path(deepspeed).name}"
        ds_trainer, ds_bare = run_deepspeed({"model": model, "threads": threads, "max_seq_length": max_seq_length,
                                             "cache_dir": str(cache_dir), "work": str(work), "order": order,
                                             "ds_config": deepspeed, "label": label, **common}, work)
        pairs.append((ds_trainer, ds_bare))
    title = (f"{model}: {pairs[0][1]['parameters'] / 1e6:.2f}M parameters, fp32, batch {batch} x <= {max_seq_length} "
             f"tokens, {'length-grouped' if grouped else 'random'} batches, {warmup} warm-up + {steps} measured "
             f"steps x {rounds} round(s), {threads} torch thread(s); "
             f"data and model setup {setup_s:.0f} s")
    print_results(title, pairs)
    if rounds > 1:
        print("tokens/s ratio trainer / bare, each round: "
              + ", ".join(f"{t['tokens_per_s'] / b['tokens_per_s']:.3f}" for t, b in rounds_run))
    if deepspeed:
        print(f"(ZeRO-2 child process, launcher start to exit: {pairs[-1][0]['process_s']:.0f} s)")
    if ablations:
        print("\nablations of the trainer path, one setting changed each (tokens/s ratio to the interleaved bare "
              "loop, median of the rounds; change vs the default's ratio):")
        variants = {
            "default (as training/trainer.py)": {},
            "max_grad_norm=0 (no clip, no norm)": {"max_grad_norm": 0.0},
            "include_num_input_tokens_seen='no'": {"include_num_input_tokens_seen": "no"},
            "logging_steps=1 (log every step)": {"logging_steps": 1},
            "report_to=[] (no TensorBoard)": {"report_to": []},
            "dataloader_num_workers=1": {"dataloader_num_workers": 1},
        }
        ratios: dict[str, list[float]] = defaultdict(list)
        for _ in range(rounds):  # variants alternate within each round
            for name, overrides in variants.items():
                trainer, bare = run_pair(model_path, tokenizer, train_set, order, work=work, **common, **overrides)
                ratios[name].append(trainer["tokens_per_s"] / bare["tokens_per_s"])
        base = statistics.median(ratios["default (as training/trainer.py)"])
        for name, values in ratios.items():
            value = statistics.median(values)
            print(f"  {name:<40}{value:>8.3f}  {value - base:>+7.3f}   rounds: "
                  + ", ".join(f"{v:.3f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Only the tiny model, one round, no ablations (~30 s).")
    parser.add_argument("--deepspeed", action="store_true",
                        help="Also the ZeRO-2 path on one CPU rank (child process).")
    parser.add_argument("--ds-config", default="ds_configs/zero2.json", help="The DeepSpeed config of --deepspeed.")
    parser.add_argument("--batch", type=int, default=4, help="SmolLM2 sequences per step.")
    parser.add_argument("--warmup", type=int, default=3, help="SmolLM2 warm-up steps (not measured).")
    parser.add_argument("--steps", type=int, default=8, help="SmolLM2 measured steps.")
    parser.add_argument("--tiny-steps", type=int, default=60, help="Tiny model measured steps (10 warm-up).")
    parser.add_argument("--tiny-rounds", type=int, default=3, help="Tiny model rounds (each ablation too).")
    parser.add_argument("--threads", type=int, default=0,
                        help="SmolLM2 torch threads (0: torch's default, one per core).")
    parser.add_argument("--tiny-threads", type=int, default=1,
                        help="Tiny model torch threads. 1: its ~20 ms steps are too small to split, and two "
                        "threads on shared cores spin in OpenMP barriers (measured 5x noisier).")
    parser.add_argument("--random-batches", action="store_true",
                        help="Random batches (the trainer's --group_by_length false) instead of length-grouped.")
    parser.add_argument("--cache-dir", default="", help="Model/tokenized-data cache (default: the trainer's).")
    parser.add_argument("--ds-worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.ds_worker:
        ds_worker(args.ds_worker)
        return

    import datasets
    import torch
    import transformers

    from training.dataset import default_cache_dir
    from training.paths import resolve_repo_path

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    threads = args.threads or torch.get_num_threads()  # before the tiny model sets its own
    deepspeed = str(resolve_repo_path(args.ds_config).resolve()) if args.deepspeed else ""
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          "(other jobs on these cores slow both sides of a comparison alike, not absolute times)")
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        work = Path(tmp)
        grouped = not args.random_batches
        measure_model("tiny", threads=args.tiny_threads, grouped=grouped, batch=4, warmup=10,
                      steps=args.tiny_steps, rounds=1 if args.quick else args.tiny_rounds, max_seq_length=256,
                      cache_dir=cache_dir, work=work, deepspeed=deepspeed, ablations=not args.quick)
        if not args.quick:
            measure_model(BUNDLED, threads=threads, grouped=grouped, batch=args.batch, warmup=args.warmup,
                          steps=args.steps, rounds=1, max_seq_length=256, cache_dir=cache_dir, work=work,
                          deepspeed=deepspeed, ablations=False)


if __name__ == "__main__":
    main()
