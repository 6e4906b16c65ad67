"""Shared fixtures: a tiny random Llama with a BPE tokenizer built in code, and small data files.

Nothing is downloaded: the tokenizer is trained here on the shipped sample, the model is random.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "training" / "data" / "dolly_sample"

# Under pytest-xdist (addopts: -n 2) two tests train at once on 2 cores. torch's OpenMP threads
# spin while they wait for each other, taking the core the other test's threads need. Measured
# here (6 MLP blocks of SmolLM2's width, 30 steps): one alone 14.5 s; two at once 40.6 s each,
# with OMP_WAIT_POLICY=PASSIVE (waiting threads sleep) 26 s each; one alone PASSIVE 15.8 s. The
# default run took 19 min beside the other worker (6 alone). Set before torch loads (its
# OpenMP reads it then), here and in every flow and trainer the tests start (python_env).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Metaflow refuses to run (and its client to read runs) without a user name; CI may have none.
if not (os.environ.get("USERNAME") or os.environ.get("USER")):
    os.environ["USERNAME"] = "tester"

# The tiers: tests/unit/ and tests/gpu_profile/ test pure logic in-process (about a minute and a
# half on 2 cores: `pytest -m "not e2e"`); the files at tests/ top level and tests/gpu/ run the
# flows, the trainer or other commands end to end, as users do.
UNIT_FOLDERS = (REPO / "tests" / "unit", REPO / "tests" / "gpu_profile")


# Fixtures that run a flow or the trainer once for several tests. pytest-xdist (addopts: -n 2
# --dist loadgroup) runs each worker's session and module fixtures in that worker: the tests that
# read one of these runs go to one worker (an xdist_group named after it), which makes it once.
SHARED_RUNS = ("tiny_run", "all_off_run", "plain_trainer_run", "chat_run", "sweep_run", "first_attempt",
               "zero2_first_runs")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(folder in item.path.parents for folder in UNIT_FOLDERS):
            item.add_marker(pytest.mark.e2e)
        group = next((name for name in SHARED_RUNS if name in item.fixturenames), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))

    # The longest work first, so that no worker starts a long test when the other is nearly done
    # (xdist hands out work in this order, --no-loadscope-reorder): the `slow` runs of the bundled
    # model, the groups of a shared run, the other end-to-end tests, then the unit tier. A stable
    # sort keeps each module's tests in their order; a module-scoped fixture that runs something
    # belongs in SHARED_RUNS, so that all its tests land in one tier (else it would run twice).
    def order(item: pytest.Item) -> int:
        if item.get_closest_marker("slow"):
            return 0
        if item.get_closest_marker("xdist_group"):
            return 1
        return 2 if item.get_closest_marker("e2e") else 3

    items.sort(key=order)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Says so when pytest-xdist's loadgroup did not take the groups above (pytest 9.2's node ids,
    pytest-dev/pytest-xdist#1386): then each worker makes every shared run its tests read."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    ungrouped = [item.nodeid for item in session.items
                 if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if ungrouped:
        warnings.warn(pytest.PytestWarning(
            f"pytest-xdist did not group {len(ungrouped)} tests that share a run (e.g. {ungrouped[0]}): each "
            f"worker makes the shared runs it needs, minutes more. pytest {pytest.__version__} with pytest-xdist's "
            "loadgroup is pytest-dev/pytest-xdist#1386; `pip install -e \".[test]\"` installs a pytest that groups."),
            stacklevel=1)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def build_tiny_model(out_dir: Path, *, vocab_size: int = 400, hidden_size: int = 32, tied: bool = True) -> Path:
    """A 2-layer random Llama and a byte-level BPE tokenizer trained on the shipped sample.

    ``hidden_size`` 64 or more for QLoRA: bitsandbytes' CPU kernels quantize rows in blocks of 64.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = read_jsonl(SAMPLE_DIR / "train.jsonl")
    texts = [f"{r['instruction']} {r['context']} {r['response']}" for r in rows]
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tied,
    )

    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from training.base_model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def small_dataset_dir(tmp_path_factory) -> Path:
    """48 train and 16 eval rows of the shipped sample, as a directory with both splits."""
    out = tmp_path_factory.mktemp("small-data")
    write_jsonl(out / "train.jsonl", read_jsonl(SAMPLE_DIR / "train.jsonl")[:48])
    write_jsonl(out / "eval.jsonl", read_jsonl(SAMPLE_DIR / "eval.jsonl")[:16])
    return out


sys.path.insert(0, str(REPO / "flows"))  # the flow's own modules, as the flow imports them
from trainer_launch import extensions_dir  # noqa: E402

NO_CUDA = REPO / "tests" / "no_cuda"  # its sitecustomize.py hides CUDA devices from every Python process


def python_env(*, cuda: bool = False, **extra: str) -> dict[str, str]:
    """The environment for subprocesses: this interpreter's bin first, the repo importable, and
    no CUDA device (unless ``cuda``), so a test takes the CPU path on a GPU machine too."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    path = [str(REPO), env.get("PYTHONPATH")]
    if not cuda:
        # CUDA_VISIBLE_DEVICES="" alone reaches only the first process: DeepSpeed's launcher sets
        # CUDA_VISIBLE_DEVICES=0,1,... for its ranks even on its CPU accelerator.
        env["CUDA_VISIBLE_DEVICES"] = ""
        path.insert(0, str(NO_CUDA))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    # DeepSpeed's JIT-built CPU ops where the flow's train step keeps them (one folder per venv):
    # trainers started here directly would otherwise build them a second time (30-90 s).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    env.update(extra)
    return env


def nvml_gpu_count() -> int:
    """GPUs the NVIDIA driver shows on this machine (0 without one): what @gpu_profile samples,
    since NVML ignores CUDA_VISIBLE_DEVICES."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def kill_process_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (a flow's tasks, the DeepSpeed launcher, its ranks).

    Descendants are listed before anything dies: an orphan is no longer anyone's child. The root
    is not reaped here (its Popen does that, and would read exit code 0 if psutil had)."""
    import psutil

    try:
        root = psutil.Process(pid)
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for proc in [root, *descendants]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(descendants, timeout=30)


def tail(text: str, chars: int = 4000) -> str:
    return text[-chars:]


def run_bounded(command: list[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, **kwargs)`` that fails the test
    after ``timeout`` seconds with the output's tail, and leaves no process of the tree behind.

    subprocess.run's own timeout kills only the child, then waits for the pipes to close: a
    grandchild holding them (a DeepSpeed rank, a flow's task) keeps it waiting.
    """
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(proc.pid)  # not reaped yet: the pid is still this child's
            stdout, stderr = proc.communicate(timeout=60)
            pytest.fail(f"{' '.join(map(str, command[:4]))} ... did not finish in {timeout:.0f} s; killed it and "
                        f"its descendants. Its last output:\n{tail(stdout)}\n{tail(stderr)}")
        except BaseException:  # pytest-timeout's failure, Ctrl-C: no process may outlive the test
            if proc.poll() is None:
                kill_process_tree(proc.pid)
            raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@contextlib.contextmanager
def started(command: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen]:
    """``Popen(command)`` with stdout and stderr going to ``log`` (read it while it runs with
    ``wait_for_output``): when the block ends, however it ends, the process and its descendants
    are gone. Reading a pipe instead would block for as long as the process stays silent."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, **kwargs)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                kill_process_tree(proc.pid)
            proc.wait(timeout=60)


def wait_for_output(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    """The first match of ``pattern`` in ``log`` that ``proc`` writes; fails the test if ``proc``
    exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        exited = proc.poll() is not None  # asked first: all it printed before exiting is read below
        text = log.read_text(errors="replace")
        found = re.search(pattern, text)
        if found:
            return found
        if exited:
            pytest.fail(f"exited with code {proc.returncode} before printing {pattern!r}. "
                        f"Its last output:\n{tail(text)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{pattern!r} not printed within {timeout:.0f} s. Its last output:\n{tail(text)}")
        time.sleep(0.2)


def wait_for_exit(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    """``proc``'s exit code; fails the test (with the log's tail) if it runs ``timeout`` s more."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout:.0f} s later. Its last output:\n{tail(log.read_text(errors='replace'))}")


FLOW_TIMEOUT_S = 720  # one tiny flow run takes 1-3 min on 2 cores: room for a machine 3x slower


class BoundedRunner:
    """A ``metaflow.Runner`` whose ``run()`` and ``resume()`` wait at most ``timeout`` seconds:
    then the flow's whole process tree is killed and the test fails with the output's tail.
    Runner's own ``run()`` waits without limit, and ``ExecutingRun.wait(timeout)`` kills only
    the flow process's children, not the trainer ranks below them."""

    def __init__(self, runner: Any, timeout: float):
        self.runner, self.timeout = runner, timeout

    def run(self, **kwargs: Any) -> Any:
        return self._bounded("run", kwargs)

    def resume(self, **kwargs: Any) -> Any:
        return self._bounded("resume", kwargs)

    def _kill_all(self) -> None:
        for command in list(self.runner.spm.commands.values()):
            if command.process is not None and command.process.poll() is None:  # a reaped pid may be reused
                kill_process_tree(command.process.pid)

    def _bounded(self, method: str, kwargs: dict) -> Any:
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            self._kill_all()

        watchdog = threading.Timer(self.timeout, on_timeout)
        watchdog.start()
        try:
            executing = getattr(self.runner, method)(**kwargs)
        except BaseException as err:  # pytest-timeout's failure, Ctrl-C, or the killed flow
            watchdog.cancel()
            self._kill_all()
            if timed_out.is_set():
                pytest.fail(f"flow {method} did not finish in {self.timeout:.0f} s; killed its process tree.\n"
                            f"{tail(str(err))}")
            raise
        watchdog.cancel()
        if timed_out.is_set():
            output = tail(executing.stdout) + "\n" + tail(executing.stderr)
            executing.runner.cleanup()
            pytest.fail(f"flow {method} did not finish in {self.timeout:.0f} s; killed its process tree. "
                        f"Its last output:\n{output}")
        return executing


def metaflow_runner(*args, timeout: float = FLOW_TIMEOUT_S, **kwargs) -> BoundedRunner:
    """``metaflow.Runner(*args, **kwargs)`` with ``run()`` and ``resume()`` bounded by ``timeout``
    seconds (BoundedRunner), undoing the typing patch Runner's constructor applies.

    Metaflow 2.19's Runner imports its vendored typing_extensions, which replaces the standard
    ``typing._collect_parameters`` with an older copy; any generic class with TypeVar defaults
    defined after that (torch, transformers) fails to import with "Type parameter ~_T1 without a
    default follows type parameter with a default". Restoring it keeps the test process usable.
    """
    import typing

    from metaflow import Runner

    original = typing._collect_parameters
    try:
        return BoundedRunner(Runner(*args, **kwargs), timeout)
    finally:
        typing._collect_parameters = original


@pytest.fixture(scope="session")
def plain_trainer_run(tiny_model_dir, small_dataset_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python -m training.trainer` on the tiny model without DeepSpeed, as a user runs it: 2
    epochs of 12 steps, the evaluation instructions answered (8 tokens at most) before training
    and after each epoch, no DeepSpeed op built in its TORCH_EXTENSIONS_DIR. (the output
    directory, the result). tests/test_trainer_cli.py and tests/test_evaluation.py read it."""
    home = tmp_path_factory.mktemp("plain-trainer")
    out = home / "out"
    result = run_bounded([
        sys.executable, "-m", "training.trainer", "--base_model", str(tiny_model_dir), "--dataset",
        str(small_dataset_dir), "--output_dir", str(out), "--epochs", "2", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--logging_steps", "2", "--max_seq_length", "1024", "--eval_max_new_tokens", "8",
        "--cache_dir", str(home / "cache"),
    ], cwd=REPO, env=python_env(TORCH_EXTENSIONS_DIR=str(home / "no-ops-built")), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="session")
def flow_home(tmp_path_factory) -> Path:
    """A working directory for the flow's local datastore and models."""
    return tmp_path_factory.mktemp("flow-home")


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir, small_dataset_dir, flow_home) -> Path:
    """local-cpu.json with the tiny model, the small data and a handful of steps."""
    config = json.loads((REPO / "flows" / "configs" / "local-cpu.json").read_text())
    config["name"] = "tiny-test"
    config["base_model"] = str(tiny_model_dir)
    config["dataset"] = str(small_dataset_dir)
    config["model_root"] = str(flow_home / "models")
    config["training"].update(
        max_steps=4, batch_size=4, eval_batch_size=4, learning_rate=1e-3, logging_steps=1,
        sample_fraction=1.0, max_seq_length=1024, cache_dir=str(flow_home / "cache"),
        eval_max_new_tokens=8,  # a random model never stops: 8 tokens say as much as 64
    )
    path = flow_home / "tiny.json"
    path.write_text(json.dumps(config))
    return path


def write_config(tiny_config: Path, directory: Path, **training) -> str:
    """``directory/config.json``: the tiny config with ``training`` values changed (``retries``
    goes to the top level)."""
    config = json.loads(tiny_config.read_text())
    config["retries"] = training.pop("retries", 0)
    config["training"].update(training)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def flow_env(flow_home: Path) -> dict[str, str]:
    return python_env(METAFLOW_DATASTORE_SYSROOT_LOCAL=str(flow_home))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server on 127.0.0.1 and the environment that points boto3 at it."""
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 -- closed below
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # bounded: 30 s for the server to answer
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}") from None
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    yield env
    server.terminate()
    server.wait(timeout=10)
    log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This test's process talks to the moto server."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_bucket_name(s3_env, request) -> str:
    """A fresh bucket on the moto server, named after the test."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "bucket"
    boto3.client("s3").create_bucket(Bucket=name)  # test names are unique within a session
    return name


def card_components(html: str) -> list[dict]:
    """The components a Metaflow card HTML carries (base64 JSON the card's own JS renders)."""
    encoded = re.search(r'window\.__MF_DATA__\["[^"]+"\] = "([A-Za-z0-9+/=]+)"', html).group(1)
    return json.loads(base64.b64decode(encoded))["components"]


def walk_components(node: Any):
    """Every component dict in a card's component tree (pages, sections, tables...)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk_components(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_components(value)


def component_types(components: list) -> Counter:
    return Counter(node.get("type") for node in walk_components(components))


def of_type(components: list, kind: str) -> list[dict]:
    """Every component of ``kind`` ("table", "markdown", "image", ...) in a card."""
    return [node for node in walk_components(components) if node.get("type") == kind]


OFF = {"max_steps": 2, "eval_instructions": "none"}  # Runner arguments: the flow's parameters
NVML_SHIM = REPO / "tests" / "gpu_profile" / "nvml_shim"  # `import pynvml` answered by a simulated 4-GPU node


def all_off_config(tiny_config: Path, directory: Path, **top: object) -> Path:
    """The tiny config with LoRA and no merge (and ``top`` level keys such as num_nodes)."""
    path = Path(write_config(tiny_config, directory, peft="lora", merge_adapter=False))
    config = json.loads(path.read_text())
    config.update(top)
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def all_off_run(tiny_config, small_dataset_dir, flow_home, tmp_path_factory) -> tuple:
    """DollyFlow with every optional output off (tests/test_optional_outputs_off.py: no answers,
    LoRA without merge, no S3, no DeepSpeed, 2 steps), on data in a directory named like an
    attack, and on a simulated 4-GPU node: NVML answered by tests/gpu_profile/nvml_shim (torch
    still sees no GPU), whose profile tests/test_gpu_profile_flow.py reads. (run, log)."""
    from tests.unit.test_card_escaping import IMG

    home = tmp_path_factory.mktemp("all-off")
    data = home / f"data{IMG}"
    shutil.copytree(small_dataset_dir, data)
    env = flow_env(flow_home)
    env["PYTHONPATH"] = os.pathsep.join([str(NVML_SHIM), str(NVML_SHIM.parent), env["PYTHONPATH"]])
    with metaflow_runner(str(REPO / "flows" / "dolly_flow.py"), show_output=False, env=env, cwd=str(flow_home),
                         config=[("config", str(all_off_config(tiny_config, home)))]).run(
            **OFF, dataset=str(data), deepspeed_config="") as running:
        assert running.status == "successful", running.stdout[-4000:] + running.stderr[-4000:]
        return running.run, running.stdout


@pytest.fixture(scope="session")
def tiny_run(tiny_config, flow_home) -> tuple:
    """One tiny DollyFlow run with the defaults, shared by the tests that only read it: (run, log)."""
    with metaflow_runner(str(REPO / "flows" / "dolly_flow.py"), show_output=False, env=flow_env(flow_home),
                         cwd=str(flow_home), config=[("config", str(tiny_config))]).run() as running:
        assert running.status == "successful", running.stdout[-4000:] + running.stderr[-4000:]
        return running.run, running.stdout


def _card_pictures():
    """benchmarks/card_pictures.py, whose headless-Chromium settings the browser tests share."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("card_pictures", REPO / "benchmarks" / "card_pictures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CARD_PICTURES = _card_pictures()
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")


def chromium_flags(profile_dir: Path, window: tuple[int, int]) -> list[str]:
    """The headless, offline Chromium command (without the page) that benchmarks/card_pictures.py uses."""
    return CARD_PICTURES.chromium_flags(CHROMIUM, profile_dir, window)


def free_port() -> str:
    """A TCP port free on 127.0.0.1 now: DeepSpeed's rendezvous must not collide between tests."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
