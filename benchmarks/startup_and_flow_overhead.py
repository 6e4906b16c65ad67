"""How long the trainer takes to reach its first step, and what the flow adds around it.

    python benchmarks/startup_and_flow_overhead.py            # tiny model, SmolLM2, the flow (~1.5 min on 2 idle cores)
    python benchmarks/startup_and_flow_overhead.py --quick    # tiny model and the flow only (~1 min)
    python benchmarks/startup_and_flow_overhead.py --quick --before 669db25   # that revision's flow beside today's
    python benchmarks/startup_and_flow_overhead.py --quick --repeat 5         # medians of 5 later runs

(a) Start-up. Launches the trainer as ``python -m training.trainer ... --max_steps 1
--logging_steps 1`` does (through runpy, after a line that timestamps the end of the imports),
timestamps every output line as it arrives (the trainer flushes each line), then reads the
``begin`` and ``step`` events of its metrics stream (``<output_dir>/logs/progress.jsonl``, which
carry their own timestamps and the step's duration) and kills the process once step 1 is logged.
The phases, in the order train() runs them:

    interpreter + imports   launch -> the imports train() does before it reads data are done
                            (Python start, torch, transformers, datasets, accelerate, ...)
    arguments + data        -> "[trainer] data ..." line: argument parsing,
                            the data set read, validated and split
    tokenizer + tokenize    -> "dropped rows ..." line: tokenizer load, Dolly keys added, both
                            splits tokenized (cold) or read from the Arrow cache (warm)
    model load              -> "model ..." line: from_pretrained and the new-token embeddings
    Trainer set-up          -> the stream's "begin" event: callbacks, Trainer(), train()'s own
                            set-up (optimizer, scheduler, data loader)
    eval before training    -> the start of step 1: eval_on_start's held-out loss
    first step              the step event's own step_s

"cold" runs with a fresh ``--cache_dir`` (the tokenized-data cache is empty; the converted
SmolLM2 is linked in, so the one-time GGUF conversion, ~30 s, is not counted); "warm" repeats the
same command with that cache filled. The OS file cache is warm in both.

(b) Flow overhead. Runs ``python flows/dolly_flow.py --config config tiny.json run`` (the tests'
tiny config: the 2-layer random Llama, 48 train / 16 eval rows, 4 steps, ZeRO-2 on one CPU rank)
in a fresh directory with its own local datastore, timestamps the lines Metaflow relays, and
subtracts the trainer subprocess's wall time: from the train task's ``Launching:`` line to its
"The trainer exited with code 0" line (both printed around the subprocess). metrics.json's
``total_runtime_s`` (train() from after its imports to metrics written) is shown beside it. The
bare ``import torch, transformers, metaflow`` is timed in the same run: the flow's wall time over it
is the figure to compare across machines. The flow runs twice in one directory: "1st run" is a
user's first run of this model, "again" every later one (`start` then reads the model's
positions, size and linear layers from the cache folder, ``training/model_facts.py``, instead of
importing torch to build the model on the meta device). ``--before REV`` runs that revision's flow
too (a git worktree, this venv) and prints its column beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.conftest: the tiny model and the small data set

BUNDLED = "bundled:smollm2-135m-instruct"
# `python -m training.trainer`, with a timestamp printed once the imports that train() does before
# it reads the data are done (training.trainer's own imports included); the trainer then finds them
# imported. runpy.run_module(alter_sys=True) is what `python -m` does.
BOOT = """
import time, runpy
import training.trainer, training.base_model, training.batching, training.dataset
import datasets, torch, transformers
from transformers import HfArgumentParser, PrinterCallback, Trainer, TrainingArguments, set_seed
print(f"[bench] imports done {time.time()}", flush=True)
runpy.run_module("training.trainer", run_name="__main__", alter_sys=True)
"""
# Metaflow's relayed task lines: "2026-11-29 12:00:00.123 [run/step/task (pid 1)] text".
TASK_LINE = re.compile(r"^\S+ \S+ \[(?P<run>[^/\]]+)/(?P<step>[^/\]]+)/(?P<task>\d+) \(pid \d+\)\] (?P<text>.*)$")


def env_for(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: this interpreter's bin first, the repository importable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def wall(command: list[str], repeats: int = 3) -> float:
    """Median wall time of a short command, launch to exit."""
    times = []
    for _ in range(repeats):
        started = time.time()
        subprocess.run(command, check=True, env=env_for(), cwd=REPO, capture_output=True)
        times.append(time.time() - started)
    return statistics.median(times)


def lines_with_times(process: subprocess.Popen, stop: Any = None) -> list[tuple[float, str]]:
    """Every output line with its arrival time; ``stop(line)`` true ends the reading early."""
    seen = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append((time.time(), line.rstrip("\n")))
        if stop is not None and stop(line):
            break
    return seen


def first(lines: list[tuple[float, str]], needle: str) -> float:
    for arrived, text in lines:
        if needle in text:
            return arrived
    raise RuntimeError(f"no line with {needle!r} in the output:\n" + "\n".join(t for _, t in lines[-30:]))


def startup(model: str, dataset: str, cache_dir: Path, output_dir: Path, extra: list[str]) -> dict[str, float]:
    """Phase durations from launching the trainer to the end of its first step."""
    command = [sys.executable, "-c", BOOT, "--base_model", model, "--dataset", dataset,
               "--output_dir", str(output_dir), "--cache_dir", str(cache_dir), "--max_steps", "1",
               "--logging_steps", "1", "--eval_instructions", "none", *extra]
    launched = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env_for(), cwd=REPO)
    try:
        lines = lines_with_times(process, stop=lambda line: "[trainer] step 1/" in line)
    finally:
        process.kill()  # step 1 is all we time: skip the final evaluation and save
        process.wait()
    events = [json.loads(line) for line in (output_dir / "logs" / "progress.jsonl").read_text().splitlines()]
    begin = next(e for e in events if e["event"] == "begin")
    step = next(e for e in events if e["event"] == "step" and e["step"] == 1)
    imported = float(next(t for _, t in lines if t.startswith("[bench] imports done ")).split()[-1])
    data, tokenized, loaded = (first(lines, n)
                               for n in ("[trainer] data ", "[trainer] dropped rows", "[trainer] model "))
    step_started = step["time"] - step["step_s"]
    return {
        "interpreter + imports": imported - launched,
        "arguments + data": data - imported,
        "tokenizer + tokenize": tokenized - data,
        "model load": loaded - tokenized,
        "Trainer set-up": begin["time"] - loaded,
        "eval before training": step_started - begin["time"],
        "first step": step["step_s"],
        "launch -> end of step 1": step["time"] - launched,
    }


def print_startup(results: dict[str, dict[str, float]]) -> None:
    names = list(next(iter(results.values())))
    print(f"\n{'phase (seconds)':<28}" + "".join(f"{label:>22}" for label in results))
    for name in names:
        if name == names[-1]:
            print(f"{'':<28}" + "".join(f"{'-' * 8:>22}" for _ in results))
        print(f"{name:<28}" + "".join(f"{r[name]:>22.2f}" for r in results.values()))


def tiny_inputs(work: Path) -> tuple[Path, Path]:
    """The tests' tiny model and small data set (48 train / 16 eval rows of the shipped sample)."""
    from tests.conftest import SAMPLE_DIR, build_tiny_model, read_jsonl, write_jsonl

    model = build_tiny_model(work / "tiny-llama")
    data = work / "small-data"
    write_jsonl(data / "train.jsonl", read_jsonl(SAMPLE_DIR / "train.jsonl")[:48])
    write_jsonl(data / "eval.jsonl", read_jsonl(SAMPLE_DIR / "eval.jsonl")[:16])
    return model, data


def fresh_cache(work: Path, name: str, link_models_from: Path | None = None) -> Path:
    cache = work / name
    cache.mkdir()
    if link_models_from is not None and (link_models_from / "models").is_dir():
        (cache / "models").symlink_to(link_models_from / "models")  # no GGUF conversion
    return cache


def flow_overhead(work: Path, model: Path, data: Path, code: Path, label: str, log: str = "",
                  home_of: str = "") -> dict[str, float]:
    """Wall time of the tiny flow run with the code in ``code`` (this checkout or a worktree of an
    older revision), the trainer subprocess inside it, and the rest by step. ``home_of``: run in
    that earlier run's directory (its datastore and cache folder), as a user's next run does."""
    home = work / f"flow-home-{home_of or label}"
    home.mkdir(exist_ok=bool(home_of))
    config = json.loads((code / "flows" / "configs" / "local-cpu.json").read_text())
    config.update(name="tiny-bench", base_model=str(model), dataset=str(data), model_root=str(home / "models"))
    config["training"].update(max_steps=4, batch_size=4, eval_batch_size=4, learning_rate=1e-3, logging_steps=1,
                              sample_fraction=1.0, max_seq_length=1024, cache_dir=str(home / "cache"),
                              eval_max_new_tokens=8)  # as the tests' tiny config
    config_path = home / "tiny.json"
    config_path.write_text(json.dumps(config))
    command = [sys.executable, str(code / "flows" / "dolly_flow.py"), "--config", "config", str(config_path), "run"]
    env = env_for(USERNAME="bench", METAFLOW_DATASTORE_SYSROOT_LOCAL=str(home))
    env["PYTHONPATH"] = os.pathsep.join([str(code), env["PYTHONPATH"]])  # that revision's packages first
    launched = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=home, env=env)
    lines = lines_with_times(process)
    exit_code = process.wait()
    ended = time.time()
    if log:
        Path(f"{log}.{label}").write_text("".join(f"{arrived - launched:8.2f}  {text}\n" for arrived, text in lines))
    if exit_code != 0:
        raise RuntimeError(f"the flow ({label}) failed:\n" + "\n".join(t for _, t in lines[-40:]))

    by_step: dict[str, list[tuple[float, str]]] = {}
    for arrived, text in lines:
        match = TASK_LINE.match(text)
        if match:
            by_step.setdefault(match["step"], []).append((arrived, match["text"]))
    span = {name: (rows[0][0], rows[-1][0]) for name, rows in by_step.items()}  # first to last line
    train = by_step["train"]
    launch = first(train, "Launching: ")
    # The train step's own line after the trainer (since the one-rank launch without DeepSpeed's
    # launcher), or that launcher's last line (older revisions).
    trainer_end = next(t for t, text in train if "The trainer exited with code" in text or "exits successfully" in text)
    step1 = first(train, "[trainer] step 1/")
    newest = max((home / "models").rglob("metrics.json"), key=lambda path: path.stat().st_mtime)
    metrics = json.loads(newest.read_text())
    trainer_s = trainer_end - launch
    total = ended - launched
    return {
        "flow run, launch to exit": total,
        "  trainer subprocess (Launching: -> it exits)": trainer_s,
        "    of which train() after imports (metrics total_runtime_s)": metrics["total_runtime_s"],
        "    of which launch + interpreter + imports + exit (the rest)": trainer_s - metrics["total_runtime_s"],
        "    trainer launch -> step 1 logged": step1 - launch,
        "  flow overhead (run minus trainer subprocess)": total - trainer_s,
        "    Metaflow start-up -> start task's first line": span["start"][0] - launched,
        "    start task (first to last line)": span["start"][1] - span["start"][0],
        "    start -> train task": span["train"][0] - span["start"][1],
        "    train task before Launching:": launch - span["train"][0],
        "    train task after the trainer exits": span["train"][1] - trainer_end,
        "    train -> end task": span["end"][0] - span["train"][1],
        "    end task (first to last line)": span["end"][1] - span["end"][0],
        "    after the end task -> exit": ended - span["end"][1],
    }


def worktree(revision: str, work: Path) -> Path:
    """A checkout of ``revision`` of this repository (git worktree), for the "before" column."""
    path = work / f"rev-{revision[:12]}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(path), revision],
                   check=True, capture_output=True)
    return path


def print_flow(results: dict[str, dict[str, float]], bare_s: float) -> None:
    names = list(next(iter(results.values())))
    print("\n(b) flow overhead: the tests' tiny config (2-layer random Llama, 48 train / 16 eval rows, 4 steps, "
          "ZeRO-2 on one CPU rank)")
    print(f"{'phase (seconds)':<66}" + "".join(f"{label:>14}" for label in results))
    for name in names:
        print(f"{name:<66}" + "".join(f"{r[name]:>14.2f}" for r in results.values()))
    print(f"{'bare `import torch, transformers, metaflow` (median)':<66}" + f"{bare_s:>14.2f}" * len(results))
    print(f"{'flow run / bare imports':<66}" + "".join(f"{r['flow run, launch to exit'] / bare_s:>13.1f}x"
                                                       for r in results.values()))
    print("(task lines are timed on arrival here; 'first to last line' is Metaflow's 'Task is starting.' "
          "to 'Task finished successfully.')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny model and the flow only.")
    parser.add_argument("--no-flow", action="store_true", help="Start-up only.")
    parser.add_argument("--flow-log", default="", help="Write each flow's output to <this>.<now|before>, each line "
                        "with its arrival time.")
    parser.add_argument("--before", default="", metavar="REVISION", help="Also run the flow of this git revision "
                        "(a worktree of it, same venv) and print its phases beside today's.")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="Run the flow 'again' N times and print "
                        "each phase's median (these machines are noisy: one run can be off by 20%%).")
    args = parser.parse_args()

    from training.dataset import default_cache_dir

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        model, data = tiny_inputs(work)
        print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
              "(other jobs on these cores slow both sides of a comparison alike, not absolute times)")
        python_s = wall([sys.executable, "-c", "pass"])
        print(f"(a) start-up: launch of `python -m training.trainer ... --max_steps 1` to its first step "
              f"(a bare `python -c pass` takes {python_s:.2f} s)")
        results = {}
        tiny_cache = fresh_cache(work, "cache-tiny")
        small = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_seq_length", "1024"]
        results["tiny, cold cache"] = startup(str(model), str(data), tiny_cache, work / "out-tiny-cold", small)
        results["tiny, warm cache"] = startup(str(model), str(data), tiny_cache, work / "out-tiny-warm", small)
        if not args.quick:
            # The flow's default: batch 8, half of the bundled sample (220 train / 40 eval rows).
            local = ["--sample_fraction", "0.5", "--per_device_train_batch_size", "8"]
            cache = fresh_cache(work, "cache-smollm2", link_models_from=default_cache_dir())
            results["SmolLM2, cold cache"] = startup(BUNDLED, "bundled:dolly-sample", cache, work / "out-s-cold",
                                                     local)
            results["SmolLM2, warm cache"] = startup(BUNDLED, "bundled:dolly-sample", cache, work / "out-s-warm",
                                                     local)
        print_startup(results)
        if not args.no_flow:
            flows = {}
            if args.before:
                flows[f"before {args.before[:10]}"] = flow_overhead(work, model, data, worktree(args.before, work),
                                                                    "before", args.flow_log)
            flows["now, 1st run"] = flow_overhead(work, model, data, REPO, "now", args.flow_log)
            # The same flow again in the same directory: what a user's next run of this model pays
            # (start reads the model's facts from the cache folder instead of importing torch).
            again = [flow_overhead(work, model, data, REPO, "again", args.flow_log, home_of="now")
                     for _ in range(args.repeat)]
            flows["now, again"] = {name: statistics.median(run[name] for run in again) for name in again[0]}
            bare_s = wall([sys.executable, "-c", "import torch, transformers, metaflow"], repeats=max(3, args.repeat))
            print_flow(flows, bare_s)
            if args.before:
                subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=False)


if __name__ == "__main__":
    main()
