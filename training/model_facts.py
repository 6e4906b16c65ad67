"""What `start` reads about a base model without loading it, kept between runs.

`start` checks every run against its model before any GPU is asked for: the positions the model
takes (``--max_seq_length``), its linear layers (``--lora_target_modules``) and its size (the
memory, disk and precision rules). Reading them costs ~3 s on 2 cores, whatever the model's
size: transformers imports torch to read a config, and the size comes from the model built on
the meta device. They depend only on the model's config and tokenizer files and on the
transformers version, so they are kept in ``<cache_dir>/model-facts/<key>-<kind>.json`` and a
later run of the same model reads them back without importing torch:

    facts = ModelFactsCache(cache_dir)                # "" -> ~/.cache/metaflow-dolly
    facts.positions("/models/llama", trust_remote_code=False)   # 131072, or None: not said
    facts.size("/models/llama", trust_remote_code=False)        # model_size_from_config's dict

The key is a SHA-256 of config.json, tokenizer_config.json, the transformers version and this
module's format. Never cached: a model that is not a local directory (a hub name: its files are
not here to hash) and a remote-code model (its code may change under the same config). A cached
file is read as untrusted input: anything but the exact shape written here (a bool for a count,
a negative size, an odd layer name, a file over 1 MiB) is ignored and the facts computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from training.base_model import load_tokenizer, max_positions
from training.dataset import default_cache_dir
from training.memory_estimate import model_size_from_config
from training.plan import LinearLayers

FORMAT = 1  # bump when what is cached, or how it is computed, changes
MAX_FILE_BYTES = 1 << 20  # a cached record is a few KiB; a model's config.json a few dozen
MAX_LAYER_NAMES = 4096
LAYER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # a module's leaf name: q_proj, dense_h_to_4h, 0
SIZE_COUNTS = ("num_parameters", "largest_layer_params")
SIZE_SHAPE = ("hidden_size", "num_layers", "vocab_size")


class ModelFactsCache:
    """The facts of local models, computed once per model and transformers version."""

    def __init__(self, cache_dir: str | os.PathLike = "") -> None:
        self.folder = Path(cache_dir or default_cache_dir()) / "model-facts"

    def positions(self, model_path: str, *, trust_remote_code: bool) -> int | None:
        """The longest sequence the model takes, as the trainer's tokenizer holds it
        (``max_positions(load_tokenizer(...))``); None when neither config nor tokenizer says.
        Raises what loading the tokenizer raises (OSError for a hub model out of reach)."""
        def compute() -> dict[str, Any]:
            return {"positions": max_positions(load_tokenizer(model_path, trust_remote_code=trust_remote_code))}

        return self._cached("positions", model_path, trust_remote_code, compute, _valid_positions)["positions"]

    def size(self, model_path: str, *, trust_remote_code: bool) -> dict[str, Any]:
        """``model_size_from_config`` of the model's config: parameter counts, shape, linear
        layers (for ``plan_from_args(..., **size)``). Raises what reading the config raises."""
        def compute() -> dict[str, Any]:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            size = model_size_from_config(config, trust_remote_code=trust_remote_code)
            layers = size["linear_layers"]
            return {**size, "linear_layers": asdict(layers) if layers is not None else None}

        record = self._cached("size", model_path, trust_remote_code, compute, _valid_size)
        layers = record["linear_layers"]
        return {**record, "linear_layers": LinearLayers(**layers) if layers is not None else None}

    def _cached(self, kind: str, model_path: str, trust_remote_code: bool,
                compute: Callable[[], dict[str, Any]], valid: Callable[[Any], bool]) -> dict[str, Any]:
        key = model_key(model_path, trust_remote_code)
        if key is None:
            return compute()
        path = self.folder / f"{key}-{kind}.json"
        record = _read(path)
        if record is not None and valid(record):
            return record
        record = compute()
        _write(path, record)
        return record


def model_key(model_path: str, trust_remote_code: bool) -> str | None:
    """The cache key of a local model directory's facts; None when they must not be cached."""
    folder = Path(model_path)
    if trust_remote_code or not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256(f"model-facts {FORMAT} transformers {_transformers_version()}".encode())
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = _read_bytes(folder / name)
        except FileNotFoundError:
            data = b""
        except OSError:
            return None
        if data is None:  # larger than any config: read it the slow way each time
            return None
        digest.update(f"\0{name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def _transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def _read_bytes(path: Path) -> bytes | None:
    with open(path, "rb") as handle:
        data = handle.read(MAX_FILE_BYTES * 16 + 1)
    return None if len(data) > MAX_FILE_BYTES * 16 else data


def _read(path: Path) -> Any:
    """A cached record, or None when it is missing, too large, not UTF-8 JSON or not a file."""
    try:
        if not path.is_file() or path.is_symlink():
            return None
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            return None
        return json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _write(path: Path, record: dict[str, Any]) -> None:
    """Written whole (a temporary file renamed over the old one) or not at all: the facts are
    only a shortcut, so a read-only or full cache folder costs a recomputation, not the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(record, out)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def _count(value: Any, *, positive: bool = False) -> bool:
    return type(value) is int and (value > 0 if positive else value >= 0)


def _valid_positions(record: Any) -> bool:
    return (isinstance(record, dict) and set(record) == {"positions"}
            and (record["positions"] is None or _count(record["positions"], positive=True)))


def _valid_size(record: Any) -> bool:
    if not isinstance(record, dict) or set(record) != {*SIZE_COUNTS, *SIZE_SHAPE, "linear_layers"}:
        return False
    if not _count(record["num_parameters"], positive=True) or not _count(record["largest_layer_params"]):
        return False
    if not all(record[name] is None or _count(record[name], positive=True) for name in SIZE_SHAPE):
        return False
    layers = record["linear_layers"]
    return layers is None or _valid_layers(layers)


def _valid_layers(layers: Any) -> bool:
    if not isinstance(layers, dict) or set(layers) != {"in_features", "out_features", "weights", "largest"}:
        return False
    ins, outs = layers["in_features"], layers["out_features"]
    if not (isinstance(ins, dict) and isinstance(outs, dict) and set(ins) == set(outs)
            and len(ins) <= MAX_LAYER_NAMES):
        return False
    names_ok = all(isinstance(name, str) and LAYER_NAME.fullmatch(name) for name in ins)
    return (names_ok and all(_count(v, positive=True) for v in (*ins.values(), *outs.values()))
            and _count(layers["weights"]) and _count(layers["largest"]))
