"""Training tokens/s per GPU and MFU against the GPU's dense bf16 peak, on one GPU, our trainer path.

    python benchmarks/gpu_mfu.py                          # SmolLM2-135M and a ~1B Llama, ZeRO-2 (~3 min on an H200)
    python benchmarks/gpu_mfu.py --models 1b --batch 16 --seq 4096
    python benchmarks/gpu_mfu.py --deepspeed ""           # the plain Trainer, no DeepSpeed

Without a CUDA GPU it says so and exits (status 1) before loading anything.

The path is the one training/trainer.py runs on a GPU: the HF Trainer with its TrainingArguments
(bf16 on compute capability 8.0+, fp16 on older GPUs, as --precision auto picks), DeepSpeed ZeRO-2
from ds_configs/zero2.json, PaddingCollator padding to a multiple of 8, the metrics-stream and
progress callbacks. The script sets up a one-rank world itself, so `deepspeed --num_gpus 1` is
not needed. Nothing is downloaded: both models are random-weight Llamas built from a config in
code (SmolLM2-135M-Instruct's shape, and TinyLlama-1.1B's), and the rows are random token ids of
exactly --seq tokens, so no token is padding and every token counts.

    MFU = 6 * N * tokens/s / peak FLOP/s

N counts the parameters that do matrix work: all of them, less the input embedding when it is not
tied to the output layer (a lookup, no FLOPs). The 6 is forward (2) + backward (4) per parameter
per token. A second column adds attention's score and value products, 12 * layers * hidden * seq
per token (PaLM's formula, the full square although causal kernels skip half). Peak: the dense
bf16 (fp16 on V100) tensor-core figure per GPU from NVIDIA's data sheets, matched by device name;
--peak-tflops overrides it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOP/s; V100 has no bf16: its fp16 peak.
# The first name found in torch.cuda.get_device_name() wins, so the more specific come first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,  # SXM
    "A100": 312.0,
    "A10G": 70.0,  # AWS g5: the A10's chip at lower clocks
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
}
MODELS = {
    # SmolLM2-135M-Instruct's shape (the bundled model): 134.5M parameters, tied embeddings.
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # TinyLlama-1.1B's shape: 1.10B parameters, untied embeddings.
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False),
}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def matmul_parameters(model: Any) -> int:
    """Parameters that take part in matrix products (the N of 6N)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    return total if tied else total - embedding.numel()


def one_rank_world() -> None:
    """What `deepspeed --num_gpus 1` would set, unless a launcher already did."""
    from trainer_vs_bare_loop import free_port

    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def measure(name: str, *, batch: int, seq: int, warmup: int, steps: int, precision: str, deepspeed: str,
            attention: str, work: Path) -> dict[str, Any]:
    # training_arguments: the TrainingArguments of training/trainer.py, shared with the CPU benchmark.
    import torch
    from trainer_vs_bare_loop import training_arguments
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PrinterCallback,
        Trainer,
        TrainerCallback,
    )

    from training.batching import PaddingCollator
    from training.progress import PROGRESS_FILE, progress_callback
    from training.train_loop import progress_printer

    output_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"{name}-"))
    total = warmup + steps
    # TrainingArguments first: it sets up the DeepSpeed world the model is then handed to.
    args = training_arguments(output_dir, batch=batch, max_steps=total, deepspeed=deepspeed or None,
                              precision=precision, cuda=True)
    config = LlamaConfig(max_position_embeddings=max(seq, 2048), attn_implementation=attention, **MODELS[name])
    torch.manual_seed(0)
    built = time.perf_counter()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # fp16: fp32 master weights
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(dtype)
    build_s = time.perf_counter() - built
    params = sum(p.numel() for p in model.parameters())
    n_matmul = matmul_parameters(model)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch * total):
        ids = torch.randint(0, config.vocab_size, (seq,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    marks: list[float] = []

    class Window(TrainerCallback):
        """Times steps warmup+1 .. total, synchronizing the GPU at the two ends only."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, total):
                torch.cuda.synchronize()
                marks.append(time.perf_counter())

    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=PaddingCollator(0, pad_to_multiple_of=8),
                      callbacks=[progress_callback(output_dir / PROGRESS_FILE), progress_printer(), Window()])
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    seconds = marks[1] - marks[0]
    tokens_per_s = batch * seq * steps / seconds
    result = {
        "model": name, "params": params, "n_matmul": n_matmul, "layers": config.num_hidden_layers,
        "hidden": config.hidden_size, "batch": batch, "seq": seq, "step_s": seconds / steps,
        "tokens_per_s": tokens_per_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "build_s": build_s, "train_s": train_s,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
    }
    del trainer, model, rows
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,1b", help=f"Comma-separated, from: {', '.join(MODELS)}.")
    parser.add_argument("--batch", type=int, default=8, help="Sequences per step (per GPU).")
    parser.add_argument("--seq", type=int, default=2048, help="Tokens per sequence (every one real).")
    parser.add_argument("--warmup", type=int, default=5, help="Steps before timing.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps.")
    parser.add_argument("--deepspeed", default="ds_configs/zero2.json", help='DeepSpeed config; "" for none.')
    parser.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                        help="Attention kernel, as the trainer's --attn_implementation.")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="Peak dense FLOP/s per GPU, if the table lacks it.")
    args = parser.parse_args()
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}.")

    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_mfu.py: no CUDA GPU here (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}). It measures GPU training throughput and MFU; run it on a GPU "
            "machine. Nothing was measured."
        )
    from training.arguments import check_attention, flash_attn_version, resolve_precision
    from training.paths import resolve_repo_path

    device = torch.cuda.get_device_name(0)
    capability = torch.cuda.get_device_capability(0)
    precision = resolve_precision("auto", cuda=True, compute_capability=capability)
    # The trainer's own check: flash-attn installed, compute capability 8.0+, bf16/fp16.
    problems = check_attention(args.attn_implementation, cuda=True, compute_capability=capability,
                               precision=precision, flash_attn_version=flash_attn_version())
    if problems:
        raise SystemExit("--attn-implementation: " + " ".join(problems))
    peak = args.peak_tflops or peak_tflops(device)
    if peak is None:
        raise SystemExit(f"--peak-tflops: no peak known for {device!r}; pass its dense {precision} TFLOP/s.")
    deepspeed = str(resolve_repo_path(args.deepspeed)) if args.deepspeed else ""
    if deepspeed:
        one_rank_world()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="bench-mfu-") as tmp:
        results = [measure(name, batch=args.batch, seq=args.seq, warmup=args.warmup, steps=args.steps,
                           precision=precision, deepspeed=deepspeed, attention=args.attn_implementation,
                           work=Path(tmp))
                   for name in args.models.split(",")]
    print(f"\n{device} (capability {capability[0]}.{capability[1]}), {precision}, peak {peak:.0f} TFLOP/s dense; "
          f"{'DeepSpeed ' + Path(deepspeed).name if deepspeed else 'no DeepSpeed'}, "
          f"{args.attn_implementation} attention, "
          f"one GPU, torch {torch.__version__}; "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'model':<9}{'params':>9}{'N (6N)':>9}{'batch x seq':>13}{'ms/step':>9}{'tokens/s/GPU':>14}"
          f"{'MFU 6N':>8}{'+attn':>8}{'peak GiB':>10}   optimizer")
    for r in results:
        flops_6n = 6 * r["n_matmul"] * r["tokens_per_s"]
        attention = 12 * r["layers"] * r["hidden"] * r["seq"] * r["tokens_per_s"]
        print(f"{r['model']:<9}{r['params'] / 1e6:>8.1f}M{r['n_matmul'] / 1e6:>8.1f}M{r['batch']:>6} x {r['seq']:<5}"
              f"{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>14.0f}{flops_6n / (peak * 1e12):>8.1%}"
              f"{(flops_6n + attention) / (peak * 1e12):>8.1%}{r['peak_gib']:>10.1f}   {r['optimizer']}")
    print("MFU 6N: 6 * N * tokens/s / peak; +attn adds 12 * layers * hidden * seq per token. "
          "Model build and train() wall time: "
          + ", ".join(f"{r['model']} {r['build_s']:.0f} s + {r['train_s']:.0f} s" for r in results))


if __name__ == "__main__":
    main()
