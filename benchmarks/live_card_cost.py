"""What the live cards cost the training they show: the default flow with redraws every 5 s
(Metaflow's floor, what the flow did before) against redraws spaced by the CPUs (the default).

    python benchmarks/live_card_cost.py                  # 2 runs of 12 steps on the bundled model (~8 min on 2 cores)
    python benchmarks/live_card_cost.py --max-steps 28   # the whole default run, twice

Each run is ``python flows/dolly_flow.py run --max-steps N`` (the local-cpu preset: SmolLM2-135M,
ZeRO-2 on one CPU rank) in a fresh directory with its own datastore, run one after the other on
the same machine; ``DOLLY_CARD_REFRESH_S`` sets the redraw interval. Printed side by side: wall
time, the trainer's tokens/s in training steps and its train() runtime (metrics.json), and how
many ``card create`` processes the run started (counted from the process table every 0.5 s; each
redraw of each live card is one). The OS file cache and the converted model are warm for both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "flows"))
from gpu_profile.live_card import refresh_interval_s  # noqa: E402


def one_run(work: Path, max_steps: int, refresh: str | None) -> dict[str, float]:
    env = dict(os.environ, METAFLOW_DATASTORE_SYSROOT_LOCAL=str(work), PYTHONUNBUFFERED="1",
               USER=os.environ.get("USER") or "bench")
    env.pop("DOLLY_CARD_REFRESH_S", None)
    if refresh:
        env["DOLLY_CARD_REFRESH_S"] = refresh
    log = (work / "flow.log").open("w")
    started = time.time()
    process = subprocess.Popen([sys.executable, str(REPO / "flows" / "dolly_flow.py"), "run",
                                "--max-steps", str(max_steps)],
                               cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    card_processes: set[int] = set()
    while process.poll() is None:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "card" in cmdline and "create" in cmdline and str(work) in " ".join(cmdline):
                card_processes.add(proc.info["pid"])
        time.sleep(0.5)
    wall = time.time() - started
    log.close()
    if process.returncode != 0:
        raise SystemExit(f"the run failed; its output is in {work / 'flow.log'}")
    (metrics_file,) = (work / "models").glob("DollyFlow/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    return {"wall_s": wall, "tokens_per_second": metrics["tokens_per_second"],
            "train_runtime_s": metrics["train_runtime_s"], "card_processes": len(card_processes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=12, help="Training steps of each run.")
    args = parser.parse_args()
    spaced = refresh_interval_s()
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{args.max_steps} steps of the default preset per run")
    results = {}
    for label, refresh in (("every 5 s (before)", "5"), (f"every {spaced:g} s (default here)", None)):
        with tempfile.TemporaryDirectory(prefix="live-card-cost-") as work:
            results[label] = one_run(Path(work), args.max_steps, refresh)
        print(f"  {label}: done", flush=True)
    print(f"\n{'live-card redraws':<28} {'wall':>8} {'tokens/s':>9} {'train()':>9} {'card processes':>15}")
    for label, r in results.items():
        print(f"{label:<28} {r['wall_s']:>7.0f}s {r['tokens_per_second']:>9.1f} {r['train_runtime_s']:>8.0f}s "
              f"{r['card_processes']:>15}")
    before, after = results.values()
    print(f"\nspaced redraws: {before['wall_s'] / after['wall_s']:.2f}x faster wall time, "
          f"{after['tokens_per_second'] / before['tokens_per_second']:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
