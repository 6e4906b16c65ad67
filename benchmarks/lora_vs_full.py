"""Full fine-tuning against LoRA (and QLoRA), side by side in one run, on the same model and data.

    python benchmarks/lora_vs_full.py                       # bundled SmolLM2-135M, the default schedule
    python benchmarks/lora_vs_full.py --methods none lora qlora
    python benchmarks/lora_vs_full.py --base_model Qwen/Qwen3-8B-Base --deepspeed "" --precision bf16 \\
        --max_seq_length 1024 --sample_fraction 1 --methods lora qlora   # on a GPU

Each method is one run of the trainer's CLI with the default local schedule (flows/configs/
local-cpu.json: half the shipped sample, 1 epoch of batches of 8, max length 256), one after
the other on the same machine, so that their figures compare (the VMs here differ up to 3x
between them, never inside one run). Printed per method: trainable parameters, peak memory
(GPU memory of the tensors on a GPU, the process's resident set on CPU), training tokens/s,
the bytes of one checkpoint and of the saved model or adapter, eval loss before and after,
the share of evaluation answers that end at ``### End`` (base model -> tuned), and wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCAL_CPU = json.loads((REPO / "flows" / "configs" / "local-cpu.json").read_text())


def schedule_arguments(args: argparse.Namespace) -> list[str]:
    """The default local schedule, as the flow passes it to the trainer."""
    training = LOCAL_CPU["training"]
    return [
        "--base_model", args.base_model, "--dataset", args.dataset,
        "--epochs", str(training["epochs"]), "--per_device_train_batch_size", str(training["batch_size"]),
        "--per_device_eval_batch_size", str(training["eval_batch_size"]),
        "--max_seq_length", str(args.max_seq_length), "--sample_fraction", str(args.sample_fraction),
        "--save_total_limit", "1", "--logging_steps", str(training["logging_steps"]),
        "--seed", str(training["seed"]), "--precision", args.precision,
    ]


def run_method(method: str, args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / method
    command = [sys.executable, "-m", "training.trainer", *schedule_arguments(args), "--output_dir", str(out),
               "--peft", method, "--learning_rate",
               str(args.lora_learning_rate if method != "none" else args.learning_rate)]
    if args.deepspeed and method != "qlora":  # QLoRA runs without ZeRO (see training/arguments.py)
        command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--module",
                   *command[2:], "--deepspeed", args.deepspeed]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"--peft {method} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    saved = out / "adapter" if (out / "adapter").is_dir() else out
    metrics["saved_bytes"] = sum(f.stat().st_size for f in saved.iterdir() if f.is_file())
    metrics["wall_s"] = time.time() - started
    return metrics


def table(results: dict[str, dict]) -> str:
    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    rows = {
        "trainable parameters": lambda m: (f"{m['trainable_parameters'] / 1e6:.2f}M "
                                           f"({m['trainable_parameters'] / m['parameters']:.1%})"),
        "peak memory": lambda m: f"{m['peak_memory_bytes'] / 2**30:.2f} GiB",
        "tokens/s (training)": lambda m: f"{m['tokens_per_second']:.0f}",
        "checkpoint": lambda m: f"{(m['checkpoint_bytes'] or 0) / 1e6:.1f} MB",
        "saved model / adapter": lambda m: f"{m['saved_bytes'] / 1e6:.1f} MB",
        "eval loss before -> after": lambda m: f"{m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f}",
        "### End share base -> tuned": lambda m: f"{share(m['ended_share_base'])} -> {share(m['ended_share_final'])}",
        "steps": lambda m: str(m["global_step"]),
        "wall time": lambda m: f"{m['wall_s']:.0f} s",
    }
    names = {"none": "full", "lora": "LoRA", "qlora": "QLoRA"}
    header = "| | " + " | ".join(names[m] for m in results) + " |"
    lines = [header, "|" + "---|" * (len(results) + 1)]
    for label, cell in rows.items():
        lines.append(f"| {label} | " + " | ".join(cell(m) for m in results.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["none", "lora"], choices=["none", "lora", "qlora"])
    parser.add_argument("--base_model", default=LOCAL_CPU["base_model"])
    parser.add_argument("--dataset", default=LOCAL_CPU["dataset"])
    parser.add_argument("--deepspeed", default=LOCAL_CPU["deepspeed_config"], help="'' for none.")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--max_seq_length", type=int, default=LOCAL_CPU["training"]["max_seq_length"])
    parser.add_argument("--sample_fraction", type=float, default=LOCAL_CPU["training"]["sample_fraction"])
    parser.add_argument("--learning_rate", type=float, default=LOCAL_CPU["training"]["learning_rate"],
                        help="Full fine-tuning's (the preset's).")
    parser.add_argument("--lora_learning_rate", type=float, default=LOCAL_CPU["training"]["learning_rate"],
                        help="LoRA's and QLoRA's; default: the same as full fine-tuning.")
    parser.add_argument("--require-gpu", action="store_true",
                        help="Stop at once without a CUDA GPU (benchmarks/gpu_check.sh measures the GPU).")
    args = parser.parse_args(argv)
    if args.require_gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--require-gpu: no CUDA GPU here (torch.cuda.is_available() is False). "
                             "Nothing was measured; run without --require-gpu for the CPU figures.")
    with tempfile.TemporaryDirectory(prefix="lora-vs-full-") as tmp:
        results = {}
        for method in args.methods:
            print(f"--peft {method} ...", flush=True)
            results[method] = run_method(method, args, Path(tmp))
    print(f"\n{args.base_model} on {args.dataset}, one epoch of the default schedule, one run each:\n")
    print(table(results))


if __name__ == "__main__":
    main()
