"""Running the trainer (its command line: ``flows/trainer_argv.py``) as a live-streamed subprocess.

The train step runs ``deepspeed --num_gpus N --module training.trainer ...`` with one process per
visible GPU; with one GPU, or on a machine with none (one CPU rank: DeepSpeed's CPU accelerator,
gloo backend), ``python -m training.trainer ...`` itself (``launch_command``).
The trainer's output goes to the task log line by line while it runs; when it fails, the step
fails with the trainer's own last lines.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaflow.exception import MetaflowException

import training
from training.shared_memory import remove_deepspeed_segments

# Where the `training` package lives: on a laptop the repository, on Kubernetes the unpacked
# code package. The trainer subprocess imports it from there.
CODE_ROOT = Path(training.__file__).resolve().parent.parent


class TrainerFailed(MetaflowException):
    """The trainer subprocess exited non-zero; the message holds its last output lines."""

    headline = "The trainer failed"


@dataclass(frozen=True)
class Nodes:
    """This node's place in a multi-node gang (Metaflow ``@parallel``); one node by default."""

    count: int = 1
    rank: int = 0
    main_addr: str = "127.0.0.1"
    port: int = 0

    @classmethod
    def from_parallel(cls, parallel: Any, run_id: str) -> Nodes:
        """From ``current.parallel``: every node derives the same rendezvous port from the run."""
        return cls(count=int(parallel.num_nodes), rank=int(parallel.node_index), main_addr=parallel.main_ip,
                   port=rendezvous_port(run_id))

    def describe(self) -> str:
        return f" on node {self.rank} of {self.count} (main {self.main_addr}:{self.port})" if self.count > 1 else ""


def rendezvous_port(run_id: str) -> int:
    """A port in 20000-29999 that every node of a run computes alike (no message to agree on
    it); different runs on one host (local multi-node runs, tests) rarely collide."""
    return 20000 + int(hashlib.sha256(str(run_id).encode()).hexdigest(), 16) % 10000


@dataclass(frozen=True)
class Launch:
    """How to start the trainer on this node: the command, the environment it adds, and the
    rendezvous port (DeepSpeed names its /dev/shm segments after it)."""

    command: list[str]
    env: dict[str, str]
    port: str


def launch_command(trainer_argv: list[str], num_processes: int, nodes: Nodes | None = None) -> Launch:
    """The trainer's launch on this node.

    - One rank on one node (a CPU run, or one GPU): ``python -m training.trainer ...`` itself,
      with the rendezvous variables DeepSpeed's launcher would set. The launcher chain
      (``deepspeed`` -> ``deepspeed.launcher.launch`` -> the rank) imports torch twice more and
      polls its rank once a second: ~5 s of a tiny run (benchmarks/startup_and_flow_overhead.py).
    - Several ranks on one node: ``deepspeed --num_gpus N --module training.trainer ...`` with the
      venv's own launcher, one process per GPU.
    - Several nodes: ``torch.distributed.run`` with this node's rank. Why torchrun: DeepSpeed's
      launcher, even with ``--no_ssh --node_rank``, wants a hostfile listing every node (measured
      with 0.19.8: "Num nodes is >1 but no extra nodes available via hostfile"). torchrun needs
      only the main node's address, which Metaflow's @parallel provides; the HF Trainer then
      starts the same DeepSpeed engine from the ``--deepspeed`` config.
    """
    if nodes is not None and nodes.count > 1:
        port = str(nodes.port)
        return Launch([
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(nodes.count), "--node_rank", str(nodes.rank), "--nproc_per_node", str(num_processes),
            "--master_addr", nodes.main_addr, "--master_port", port,
            "-m", "training.trainer", *trainer_argv,
        ], {}, port)
    # A free port: two local runs (or tests) at once must not collide on DeepSpeed's default 29500.
    port = str(_free_port())
    if num_processes == 1:
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        return Launch([sys.executable, "-m", "training.trainer", *trainer_argv], env, port)
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    if launcher is None:
        raise TrainerFailed("The `deepspeed` launcher is not on PATH; install the project with `pip install -e .`.")
    return Launch([launcher, "--num_gpus", str(num_processes), "--master_port", port, "--module", "training.trainer",
                   *trainer_argv], {}, port)


def release_shared_memory(launch: Launch) -> list[str]:
    """Remove the /dev/shm segments DeepSpeed's CPU comm op made for ``launch``'s ranks (found by
    its rendezvous port); returns their names. Each rank removes its own when it exits; one that
    was killed (OOM, SIGKILL, a launcher tearing it down) cannot (training/shared_memory.py)."""
    return remove_deepspeed_segments(launch.port)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops go: one folder per Python environment.

    torch's default (~/.cache/torch_extensions/py311_cpu) is shared by every venv of the same
    Python; two venvs with different torch builds then rebuild the ops in turn at every start
    (measured: DeepSpeed's CPU comm op, 89 s under load instead of 0.37 s from the cache).
    """
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "torch_extensions" / f"{Path(sys.prefix).name}-{key}"


def run_streaming(command: list[str], tail_lines: int = 40, env: dict[str, str] | None = None) -> None:
    """Run, copying output to our stdout line by line; raise TrainerFailed with the tail on error.

    SIGTERM or SIGINT to this process (a preempted pod, Ctrl-C) is passed to every process of the
    trainer (the launcher and all ranks): they checkpoint, upload and exit, then this raises.
    """
    env = dict(env if env is not None else os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    print("Launching: " + " ".join(command), flush=True)
    launched = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    received: list[int] = []
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=env,
        start_new_session=True,  # its own process group, so one killpg reaches every rank
    ) as process:

        def forward(signum: int, frame: Any) -> None:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            assert process.stdout is not None
            for line in process.stdout:
                print(line, end="", flush=True)
                tail.append(line.rstrip())
            code = process.wait()
            print(f"The trainer exited with code {code} after {time.monotonic() - launched:.1f} s.", flush=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if received:
        raise TrainerFailed(
            f"Stopped by {signal.Signals(received[0]).name}; the trainer checkpointed and exited with "
            f"code {code}. A retry resumes from the newest valid checkpoint. Its last lines:\n" + "\n".join(tail)
        )
    if code != 0:
        # The launcher's own last lines ("exits with return code") say little; the trainer's
        # error (SystemExit message or traceback) comes just before them.
        raise TrainerFailed(f"The trainer exited with code {code}. Its last lines:\n" + "\n".join(tail))
