"""Shared fixtures: a tiny random Llama with a BPE tokenizer built in code, and small data files.

Nothing is downloaded: the tokenizer is trained here on the shipped sample, the model is random.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "training" / "data" / "dolly_sample"

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Metaflow refuses to run (and its client to read runs) without a user name; CI may have none.
if not (os.environ.get("USERNAME") or os.environ.get("USER")):
    os.environ["USERNAME"] = "tester"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def build_tiny_model(out_dir: Path, *, vocab_size: int = 400) -> Path:
    """A 2-layer random Llama and a byte-level BPE tokenizer trained on the shipped sample."""
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
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
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


def python_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: this interpreter's bin first, the repo importable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def metaflow_runner(*args, **kwargs):
    """``metaflow.Runner(*args, **kwargs)``, undoing the typing patch its constructor applies.

    Metaflow 2.19's Runner imports its vendored typing_extensions, which replaces the standard
    ``typing._collect_parameters`` with an older copy; any generic class with TypeVar defaults
    defined after that (torch, transformers) fails to import with "Type parameter ~_T1 without a
    default follows type parameter with a default". Restoring it keeps the test process usable.
    """
    import typing

    from metaflow import Runner

    original = typing._collect_parameters
    try:
        return Runner(*args, **kwargs)
    finally:
        typing._collect_parameters = original


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


@pytest.fixture(scope="session")
def tiny_run(tiny_config, flow_home) -> tuple:
    """One tiny DollyFlow run with the defaults, shared by the tests that only read it: (run, log)."""
    with metaflow_runner(str(REPO / "flows" / "dolly_flow.py"), show_output=False, env=flow_env(flow_home),
                         cwd=str(flow_home), config=[("config", str(tiny_config))]).run() as running:
        assert running.status == "successful", running.stdout[-4000:] + running.stderr[-4000:]
        return running.run, running.stdout


def free_port() -> str:
    """A TCP port free on 127.0.0.1 now: DeepSpeed's rendezvous must not collide between tests."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
