"""Reading instruction data sets: Dolly v2 and Alpaca schemas, local files, S3, the hub.

A source is one of:

* ``bundled:dolly-sample``: the sample shipped in ``training/data/dolly_sample`` (train + eval);
* a local ``.jsonl``, ``.json`` (a list of objects, or JSON lines) or ``.parquet`` file;
* a local directory of such files: files named ``train*`` form the train split and files named
  ``eval*``, ``test*``, ``valid*`` the held-out split; with no such names every file is train;
* an ``s3://bucket/key`` file or ``s3://bucket/prefix/`` directory, downloaded then read as above
  (into a cache folder keyed by the objects' ETags: a changed data set is downloaded again; a key
  whose name would land outside that folder, such as ``prefix/../x.jsonl``, is refused);
* a hub data set id such as ``databricks/databricks-dolly-15k`` (``datasets.load_dataset``).

Each row is recognized by its fields:

* Dolly v2: ``instruction``, ``context``, ``response`` (``category``);
* Alpaca: ``instruction``, ``input``, ``output`` (mapped to Dolly's fields);
* messages (OpenAI style): ``messages``, a list of ``{"role": "system"|"user"|"assistant",
  "content": ...}``, multi-turn;
* ShareGPT: ``conversations``, a list of ``{"from": "system"|"human"|"gpt", "value": ...}``
  (mapped to messages).

A conversation is an optional system turn, then user and assistant turns in alternation, ending
with an assistant turn. Under ``prompt_format="dolly"`` a conversation must be one user turn and
one assistant turn (it becomes a Dolly row); ``"chat"`` takes any. A line that is not JSON, or a
row without what its schema needs (an instruction, a response, known roles in order, non-empty
turns), is an error that names the file and line, reported for every bad row at once;
``skip_bad_rows=True`` skips and counts them instead. A file that cannot be read at all (not
UTF-8, a corrupt parquet) is an error even then.

    python -c "from training.dataset import load_instruction_data as l; print(l('bundled:dolly-sample'))"
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUNDLED_DATASET = "bundled:dolly-sample"
BUNDLED_DATASET_DIR = Path(__file__).parent / "data" / "dolly_sample"
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
EVAL_SPLIT_PREFIXES = ("eval", "test", "valid")
MAX_ERRORS_SHOWN = 10


class DatasetError(ValueError):
    """The data set cannot be used as given; the message says what to fix."""


@dataclass
class InstructionData:
    """Normalized rows per split: Dolly rows (instruction, context, response, category) and,
    under the chat prompt format, conversations (messages, category)."""

    source: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] = field(default_factory=list)
    skipped_rows: int = 0
    schema_counts: dict[str, int] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """sha256 of the normalized rows of both splits: the same data gives the same value."""
        digest = hashlib.sha256()
        for split in (self.train, self.eval):
            digest.update(json.dumps(split, sort_keys=True, ensure_ascii=False).encode())
            digest.update(b"\x00")
        return digest.hexdigest()

    def __repr__(self) -> str:
        return (
            f"InstructionData(source={self.source!r}, train={len(self.train)}, "
            f"eval={len(self.eval)}, skipped_rows={self.skipped_rows})"
        )


# ShareGPT's speakers, as roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _normalize_row(row: Any, where: str, prompt_format: str = "dolly") -> tuple[dict[str, Any] | None, str | None, str]:
    """(normalized row, None, schema) or (None, problem, schema) for one raw row."""
    if not isinstance(row, dict):
        return None, f"{where}: expected a JSON object, got {type(row).__name__}", ""
    if "messages" in row or "conversations" in row:
        return _normalize_conversation(row, where, prompt_format)
    if "response" in row:
        schema, context_key, response_key = "dolly", "context", "response"
    elif "output" in row:
        schema, context_key, response_key = "alpaca", "input", "output"
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        return (
            None,
            f"{where}: no 'response' (Dolly schema), 'output' (Alpaca), 'messages' or "
            f"'conversations' (ShareGPT) field (fields: {keys})",
            "",
        )
    problems = []
    for key in ("instruction", response_key):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"missing or empty '{key}'")
    context = row.get(context_key)
    if context is None:
        context = ""
    elif not isinstance(context, str):
        problems.append(f"'{context_key}' must be a string, got {type(context).__name__}")
    if problems:
        return None, f"{where}: {'; '.join(problems)}", schema
    category = row.get("category")
    return (
        {
            "instruction": row["instruction"].strip(),
            "context": context.strip(),
            "response": row[response_key].strip(),
            "category": category if isinstance(category, str) else "",
        },
        None,
        schema,
    )


def _normalize_conversation(row: dict[str, Any], where: str,
                            prompt_format: str) -> tuple[dict[str, Any] | None, str | None, str]:
    if "messages" in row:
        roles = {r: r for r in ("system", "user", "assistant")}
        schema, key, role_key, content_key = "messages", "messages", "role", "content"
    else:
        schema, key, role_key, content_key, roles = "sharegpt", "conversations", "from", "value", SHAREGPT_ROLES
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        return None, f"{where}: '{key}' must be a non-empty list of turns", schema
    messages, problems = [], []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            problems.append(f"turn {number} is not an object")
            continue
        speaker, content = turn.get(role_key), turn.get(content_key)
        if speaker not in roles:
            problems.append(f"turn {number} has unknown {role_key} {speaker!r} (use {', '.join(roles)})")
        elif not isinstance(content, str) or not content.strip():
            problems.append(f"turn {number} ({speaker}) has a missing or empty '{content_key}'")
        else:
            messages.append({"role": roles[speaker], "content": content.strip()})
    if not problems:
        problems += _order_problems([m["role"] for m in messages], {v: k for k, v in roles.items()})
    if problems:
        return None, f"{where}: {'; '.join(problems)}", schema
    category = row.get("category")
    if prompt_format == "dolly":
        if [m["role"] for m in messages] != ["user", "assistant"]:
            return (None, f"{where}: a conversation with {len(messages)} turns; the Dolly prompt format holds "
                    "one user turn and one answer (no system prompt): train it with --prompt_format chat", schema)
        return ({"instruction": messages[0]["content"], "context": "", "response": messages[1]["content"],
                 "category": category if isinstance(category, str) else ""}, None, schema)
    return {"messages": messages, "category": category if isinstance(category, str) else ""}, None, schema


def _order_problems(roles: list[str], names: dict[str, str]) -> list[str]:
    """An optional system turn, then user/assistant alternating from the user, ending with an
    assistant turn (what chat templates such as Gemma's and Mistral's require)."""
    if "assistant" not in roles:
        return [f"no {names['assistant']} turn (nothing to learn)"]
    start = 1 if roles[0] == "system" else 0
    for index in range(start, len(roles)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if roles[index] != expected:
            return [f"turns out of order: turn {index + 1} is {names[roles[index]]}, expected {names[expected]} "
                    f"(an optional {names['system']} turn first, then {names['user']} and "
                    f"{names['assistant']} alternating)"]
    if roles[-1] != "assistant":
        return [f"the last turn is {names['user']} with no {names['assistant']} answer after it"]
    return []


def _read_file_rows(path: Path) -> list[tuple[str, Any]]:
    """(location, raw row) pairs; a line that is not JSON becomes a (location, _BadRow) pair and a
    file that cannot be read at all one (path, _BadFile) pair."""
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pyarrow.ArrowException, OSError) as err:
            return [(str(path), _BadFile(f"not a readable parquet file ({err}); write it again with "
                                         "pyarrow or pandas (DataFrame.to_parquet), or pass JSON lines"))]
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of line 1's JSON.
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return [(str(path), _BadFile(f"{not_utf8(err)}; save it as UTF-8 JSON lines, or pass a .parquet file"))]
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            return [(f"{path} line {err.lineno}", _BadRow(f"not valid JSON ({err})"))]
        except RecursionError:
            return [(str(path), _BadFile(_TOO_DEEP))]
        return [(f"{path} item {i + 1}", row) for i, row in enumerate(rows)]
    pairs: list[tuple[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pairs.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            pairs.append((f"{path} line {number}", _BadRow(f"not valid JSON ({err.msg})")))
        except RecursionError:  # json's C decoder recurses once per nesting level
            pairs.append((f"{path} line {number}", _BadRow(_TOO_DEEP)))
    return pairs


# No row of ours nests more than a few levels (a conversation: list -> turn -> content); a line
# nested past Python's recursion limit (~1000) is garbage or an attack, never data.
_TOO_DEEP = "JSON nested deeper than Python's recursion limit; a row is an object of strings and turns"


def not_utf8(err: UnicodeDecodeError) -> str:
    """What a file that failed to decode is, for the errors about data, instructions and templates."""
    return (f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}: a binary file, or "
            "text in another encoding)")


@dataclass
class _BadRow:
    """A row that cannot be read: skipped and counted under skip_bad_rows, else reported."""

    problem: str


@dataclass
class _BadFile:
    """A whole file that cannot be read: always reported (skip_bad_rows skips rows, not files)."""

    problem: str


def _split_files(directory: Path) -> dict[str, list[Path]]:
    files = sorted(
        p for p in directory.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
    )
    if not files:
        raise DatasetError(
            f"--dataset: directory {directory} holds no {', '.join(SUPPORTED_SUFFIXES)} files."
        )
    splits: dict[str, list[Path]] = {"train": [], "eval": []}
    for path in files:
        is_eval = path.name.lower().startswith(EVAL_SPLIT_PREFIXES)
        splits["eval" if is_eval else "train"].append(path)
    if not splits["train"]:
        raise DatasetError(
            f"--dataset: directory {directory} has only eval/test files; add a train file."
        )
    return splits


def _download_s3(url: str, cache_dir: Path) -> Path:
    """Download an s3:// file or prefix into the cache; returns the local file or directory."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return _download_s3_objects(url, cache_dir)
    except (BotoCoreError, ClientError) as err:
        raise DatasetError(
            f"--dataset: could not read {url}: {err}. Check the URL, the bucket's region and "
            "your AWS credentials."
        ) from err


def _download_s3_objects(url: str, cache_dir: Path) -> Path:
    """The objects ``url`` names, in a cache folder keyed by their ETags and sizes: an unchanged
    data set is not downloaded again, a changed one (or one with files added or removed) gets a
    fresh folder. Each folder is downloaded into a temporary folder and renamed into place when
    complete, so an interrupted download is never read."""
    import boto3
    from botocore.exceptions import ClientError

    bucket, _, key = url[len("s3://") :].partition("/")
    client = boto3.client("s3")
    one_file = bool(key) and not key.endswith("/")
    # (key, local name inside the folder, ETag, size) of every object to read.
    if one_file:
        head = client.head_object(Bucket=bucket, Key=key)
        objects = [(key, _local_name(url, key, key.rpartition("/")[2]), head["ETag"], head["ContentLength"])]
    else:
        objects = [
            (obj["Key"], _local_name(url, obj["Key"], obj["Key"][len(key) :]), obj["ETag"], obj["Size"])
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for obj in page.get("Contents", [])
            if obj["Key"].endswith(SUPPORTED_SUFFIXES)
        ]
        if not objects:
            raise DatasetError(f"--dataset: {url} holds no {', '.join(SUPPORTED_SUFFIXES)} files.")
    listing = json.dumps([url, sorted(objects)])
    target = cache_dir / "s3" / hashlib.sha256(listing.encode()).hexdigest()[:16]
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as work:
            folder = Path(work) / "objects"
            for object_key, name, etag, _ in objects:
                local = folder / name
                local.parent.mkdir(parents=True, exist_ok=True)
                # IfMatch: an object replaced since the listing fails the download instead of
                # landing, under the old ETag's folder, with the new content.
                try:
                    body = client.get_object(Bucket=bucket, Key=object_key, IfMatch=etag)["Body"]
                except ClientError as err:
                    if err.response.get("Error", {}).get("Code") != "PreconditionFailed":
                        raise
                    raise DatasetError(f"--dataset: s3://{bucket}/{object_key} changed while {url} was "
                                       "being downloaded; run again once it is written.") from err
                with body, open(local, "wb") as out:
                    shutil.copyfileobj(body, out, length=8 * 1024 * 1024)
            try:
                os.replace(folder, target)
            except OSError:
                if not target.is_dir():  # another rank or step put the same objects there first
                    raise
    return target / objects[0][1] if one_file else target


def _local_name(url: str, key: str, name: str) -> str:
    """``name`` (an object's key below the prefix) as a relative path that stays inside the cache
    folder; a key that would write elsewhere is refused."""
    # split("/") of "", "/x" or "a//b" holds an empty segment, of "a/../b" a ".." one.
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise DatasetError(
            f"--dataset: {url} holds the object {key!r}, whose name would be written outside the "
            "download folder (an empty, '.' or '..' path segment, or a leading '/'). Rename or "
            "remove that object, or point --dataset at a prefix without it."
        )
    return name


def _hub_rows(name: str) -> dict[str, list[tuple[str, Any]]]:
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # the hub client raises many types; all mean "cannot load"
        raise DatasetError(
            f"--dataset: {name!r} is not a local file or directory, and loading it from the "
            f"hub failed: {type(err).__name__}: {err}. Pass a path to a .jsonl/.json/.parquet "
            "file or directory, an s3:// URL, or a hub data set id."
        ) from err
    splits: dict[str, list[tuple[str, Any]]] = {"train": [], "eval": []}
    for split_name, split in loaded.items():
        target = "eval" if split_name.lower().startswith(EVAL_SPLIT_PREFIXES) else "train"
        splits[target] += [(f"{name} [{split_name}] row {i + 1}", row) for i, row in enumerate(split)]
    return splits


def resolve_dataset_path(source: str) -> Path | None:
    """The local path a source names (bundled or a path), or None for s3:// and hub ids."""
    if source == BUNDLED_DATASET:
        return BUNDLED_DATASET_DIR
    if source.startswith("s3://"):
        return None
    path = Path(source).expanduser()
    # "org/name" is both a hub id and a relative path: an existing path wins, and anything that
    # can only be a path (a file suffix, ./, /, ~) is a path even when it is missing.
    if path.exists() or source.endswith(SUPPORTED_SUFFIXES) or source.startswith((".", "/", "~")):
        return path
    return None


def load_instruction_data(
    source: str,
    *,
    skip_bad_rows: bool = False,
    cache_dir: str | os.PathLike | None = None,
    prompt_format: str = "dolly",
) -> InstructionData:
    """Read, validate and normalize a data set; raises DatasetError listing every bad row."""
    cache = Path(cache_dir or default_cache_dir())
    if source.startswith("s3://"):
        path: Path | None = _download_s3(source, cache)
    else:
        path = resolve_dataset_path(source)
    if path is not None and not path.exists():
        raise DatasetError(
            f"--dataset: {path} does not exist. Pass an existing .jsonl/.json/.parquet file or "
            f"directory, an s3:// URL, a hub id, or {BUNDLED_DATASET!r}."
        )
    if path is None:
        raw = _hub_rows(source)
    elif path.is_dir():
        raw = {
            split: [pair for p in files for pair in _read_file_rows(p)]
            for split, files in _split_files(path).items()
        }
    else:
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise DatasetError(
                f"--dataset: {path} has suffix {path.suffix!r}; use one of "
                f"{', '.join(SUPPORTED_SUFFIXES)}."
            )
        raw = {"train": _read_file_rows(path), "eval": []}

    problems: list[str] = []
    file_problems: list[str] = []
    schema_counts: dict[str, int] = {}
    normalized: dict[str, list[dict[str, Any]]] = {}
    for split, pairs in raw.items():
        rows = []
        for where, row in pairs:
            if isinstance(row, _BadFile):
                file_problems.append(f"{where}: {row.problem}")
                continue
            if isinstance(row, _BadRow):
                problems.append(f"{where}: {row.problem}")
                continue
            clean, problem, schema = _normalize_row(row, where, prompt_format)
            if problem:
                problems.append(problem)
            else:
                rows.append(clean)
                schema_counts[schema] = schema_counts.get(schema, 0) + 1
        normalized[split] = rows
    bad_rows = [] if skip_bad_rows else problems
    if file_problems or bad_rows:
        counts = [f"{len(file_problems)} unreadable file(s)"] if file_problems else []
        counts += [f"{len(bad_rows)} bad row(s)"] if bad_rows else []
        shown = "\n  ".join(file_problems + bad_rows[:MAX_ERRORS_SHOWN])
        more = len(bad_rows) - MAX_ERRORS_SHOWN
        raise DatasetError(
            f"--dataset: {' and '.join(counts)} in {source}:\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + ("\nFix these rows, or set --skip_bad_rows to skip and count them." if bad_rows else "")
        )
    if not normalized["train"]:
        raise DatasetError(f"--dataset: {source} has no usable training rows.")
    return InstructionData(
        source=source,
        train=normalized["train"],
        eval=normalized["eval"],
        skipped_rows=len(problems),
        schema_counts=schema_counts,
    )


def sample_and_split(
    data: InstructionData, *, sample_fraction: float, test_size: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval) rows: a deterministic sample, and a held-out split if the source has none.

    ``test_size`` below 1 is a fraction of the rows, 1 or more a row count (Dolly used 1000).
    """
    rng = random.Random(seed)

    def sample(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        if sample_fraction >= 1.0 or not rows:
            return rows
        keep = max(1, round(len(rows) * sample_fraction))
        return [rows[i] for i in sorted(rng.sample(range(len(rows)), keep))]

    train, held_out = sample(data.train), sample(data.eval)
    if held_out:
        return train, held_out
    count = int(test_size) if test_size >= 1 else round(len(train) * test_size)
    count = max(1, count)
    if count >= len(train):
        raise DatasetError(
            f"--test_size: {test_size} leaves no training rows out of {len(train)}; "
            "pass a smaller --test_size or ship an eval split."
        )
    order = list(range(len(train)))
    rng.shuffle(order)
    held = set(order[:count])
    return (
        [row for i, row in enumerate(train) if i not in held],
        [row for i, row in enumerate(train) if i in held],
    )


def default_cache_dir() -> Path:
    """Where downloads, converted models and tokenized data are cached."""
    root = os.environ.get("DOLLY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "metaflow-dolly"
    )
    return Path(root)
