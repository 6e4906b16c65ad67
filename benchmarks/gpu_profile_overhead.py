"""Cost of @gpu_profile's sampler on training step time, measured side by side in one run.

    python benchmarks/gpu_profile_overhead.py                # CPU: a small MLP training step
    python benchmarks/gpu_profile_overhead.py --steps 400    # longer, steadier

Runs the same training steps in alternating blocks with the sampler off and on (interval 1 s,
the decorator's default) and prints the median step time of each and their ratio. On a GPU
node the sampler queries NVML for every GPU; on a CPU machine NVML is absent and it samples the
host (psutil) only, so run it on the GPU node to measure the NVML path.
"""

from __future__ import annotations

import argparse
import statistics
import time


def make_step(size: int):
    import torch

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Sequential(
        torch.nn.Linear(size, 4 * size), torch.nn.GELU(), torch.nn.Linear(4 * size, size)
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randn(64, size, device=device)

    def step() -> float:
        started = time.perf_counter()
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return step, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240, help="Timed steps per mode.")
    parser.add_argument("--block", type=int, default=20, help="Steps per block; modes alternate by block.")
    parser.add_argument("--size", type=int, default=1024, help="Hidden size of the MLP.")
    parser.add_argument("--interval", type=float, default=1.0, help="Sampler interval in seconds.")
    args = parser.parse_args()

    from gpu_profile.sampler import GpuSampler

    step, device = make_step(args.size)
    for _ in range(10):  # warm up allocator and kernels
        step()
    times: dict[str, list[float]] = {"off": [], "on": []}
    samples = 0
    while len(times["on"]) < args.steps:
        for mode in ("off", "on"):
            sampler = GpuSampler(interval=args.interval) if mode == "on" else None
            if sampler:
                sampler.start()
            times[mode] += [step() for _ in range(args.block)]
            if sampler:
                sampler.stop()
                samples += len(sampler.snapshot()["host"]["t"])
    # The direct cost: what one sample takes, as a share of the interval it recurs in.
    probe = GpuSampler(interval=args.interval)
    started = time.perf_counter()
    for _ in range(200):
        probe.sample_once()
    per_sample = (time.perf_counter() - started) / 200
    probe.stop()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    total_on = sum(times["on"])
    print(f"device {device}, {len(times['on'])} steps per mode, sampler interval {args.interval} s, "
          f"{samples} samples taken")
    print(f"median step time  sampler off {off * 1e3:8.2f} ms   on {on * 1e3:8.2f} ms")
    print(f"mean step time    sampler off {statistics.mean(times['off']) * 1e3:8.2f} ms   "
          f"on {total_on / len(times['on']) * 1e3:8.2f} ms")
    print(f"overhead ratio (median on / off): {on / off:.4f}  (target <= 1.01)")
    print(f"one sample costs {per_sample * 1e3:.3f} ms of one core: {per_sample / args.interval:.5%} of each interval")


if __name__ == "__main__":
    main()
