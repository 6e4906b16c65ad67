"""What a user's files and an S3 data set can hold, read as an attacker or a careless user would
write them (issue 22, points 6 and 9): every case is an error that names the file or flag and
the fix, before any model loads; nothing is written outside its folder; one huge row costs
nothing before it is dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from training.arguments import check_deepspeed_config
from training.chat import check_chat_template_setting
from training.dataset import DatasetError, load_instruction_data
from training.evaluation import EvalInstructionsError, load_eval_instructions

GOOD = {"instruction": "Name a color.", "context": "", "response": "Blue."}
# Bytes no UTF-8 decoder accepts: the start of a gzip file (what `gzip data.jsonl` leaves behind).
BINARY = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(256))
# One line of JSON nested 100,000 levels deep: json.loads raises RecursionError on it.
DEEP = "[" * 100_000 + "]" * 100_000


# --- S3 data sets -------------------------------------------------------------------------------


def jsonl(rows: list[dict]) -> str:
    return "\n".join(json.dumps(row) for row in rows)


@pytest.mark.parametrize("escape", ["relative", "absolute"])
def test_s3_key_that_would_escape_the_cache_is_refused(tmp_path, s3_bucket, escape):
    cache = tmp_path / "cache"
    s3_bucket.put_object(Bucket="data", Key="data/train.jsonl", Body=jsonl([GOOD] * 3))
    # Below the prefix "data/", "../../escape.jsonl": cache/s3/<folder>/../../escape.jsonl is
    # cache/escape.jsonl; "/<tmp_path>/escape.jsonl": an absolute path, which pathlib's join keeps.
    key = "data/../../escape.jsonl" if escape == "relative" else f"data/{tmp_path}/escape.jsonl"
    s3_bucket.put_object(Bucket="data", Key=key, Body=jsonl([GOOD]))
    with pytest.raises(DatasetError, match=rf"holds the object '{key}', whose name would be written outside.*"
                                           "Rename or remove that object"):
        load_instruction_data("s3://data/data/", cache_dir=cache)
    assert not list(tmp_path.rglob("escape.jsonl"))
    assert not list(cache.rglob("*.jsonl"))  # nothing of the refused listing was downloaded


def test_s3_data_set_is_read_again_when_its_objects_change(tmp_path, s3_bucket):
    s3_bucket.put_object(Bucket="data", Key="dolly/train.jsonl", Body=jsonl([GOOD] * 4))
    s3_bucket.put_object(Bucket="data", Key="dolly/train-extra.jsonl", Body=jsonl([GOOD] * 2))
    assert len(load_instruction_data("s3://data/dolly/", cache_dir=tmp_path).train) == 6

    # A changed object is read again, and a removed one is no longer read.
    changed = {**GOOD, "response": "Green."}
    s3_bucket.put_object(Bucket="data", Key="dolly/train.jsonl", Body=jsonl([changed] * 5))
    s3_bucket.delete_object(Bucket="data", Key="dolly/train-extra.jsonl")
    again = load_instruction_data("s3://data/dolly/", cache_dir=tmp_path)
    assert [row["response"] for row in again.train] == ["Green."] * 5

    # Unchanged objects: the cached folder is read as it is, nothing is downloaded again.
    downloaded = {p: p.stat().st_mtime_ns for p in (tmp_path / "s3").rglob("*.jsonl")}
    assert len(load_instruction_data("s3://data/dolly/", cache_dir=tmp_path).train) == 5
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s3").rglob("*.jsonl")} == downloaded

    # One file by its URL too.
    s3_bucket.put_object(Bucket="data", Key="dolly/train.jsonl", Body=jsonl([GOOD] * 7))
    assert len(load_instruction_data("s3://data/dolly/train.jsonl", cache_dir=tmp_path).train) == 7
    s3_bucket.put_object(Bucket="data", Key="dolly/train.jsonl", Body=jsonl([GOOD] * 2))
    assert len(load_instruction_data("s3://data/dolly/train.jsonl", cache_dir=tmp_path).train) == 2
    # Downloads land in a temporary folder first: none is left behind.
    assert not list((tmp_path / "s3").glob(".download-*"))


# --- Local data files ---------------------------------------------------------------------------


def test_binary_data_file_is_an_error_naming_the_file_even_when_skipping_bad_rows(tmp_path):
    binary = tmp_path / "train.jsonl"
    binary.write_bytes(BINARY)
    for skip in (False, True):
        with pytest.raises(DatasetError, match=rf"{binary}: not UTF-8 text \(byte 0x8b at offset 1: a binary file"
                                               r".*save it as UTF-8 JSON lines"):
            load_instruction_data(str(binary), skip_bad_rows=skip)


def test_latin1_file_among_good_and_bad_files_is_listed_with_every_other_problem(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD, {"instruction": "no response"}])
    (tmp_path / "train-latin1.jsonl").write_bytes(json.dumps({**GOOD, "response": "Café"}, ensure_ascii=False)
                                                  .encode("latin-1"))
    with pytest.raises(DatasetError) as raised:
        load_instruction_data(str(tmp_path))
    message = str(raised.value)
    assert "1 unreadable file(s) and 1 bad row(s)" in message
    assert f"{tmp_path / 'train-latin1.jsonl'}: not UTF-8 text (byte 0xe9" in message
    assert f"{tmp_path / 'train.jsonl'} line 2: no 'response'" in message


def test_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl([GOOD] * 2).encode())
    assert len(load_instruction_data(str(path)).train) == 2


def test_corrupt_parquet_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1" + BINARY)  # the magic, then no parquet
    with pytest.raises(DatasetError, match=rf"{path}: not a readable parquet file \(.*\); write it again"):
        load_instruction_data(str(path))


def test_json_line_nested_100k_deep_is_a_bad_row_naming_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl([GOOD, GOOD]) + "\n" + DEEP + "\n")
    with pytest.raises(DatasetError, match=rf"{path} line 3: JSON nested deeper than Python's recursion limit"):
        load_instruction_data(str(path))
    skipped = load_instruction_data(str(path), skip_bad_rows=True)
    assert (len(skipped.train), skipped.skipped_rows) == (2, 1)
    as_list = tmp_path / "rows.json"
    as_list.write_text("[" + DEEP + "]")
    with pytest.raises(DatasetError, match=rf"{as_list}: JSON nested deeper"):
        load_instruction_data(str(as_list))


# --- Evaluation instructions, chat templates, DeepSpeed configs ----------------------------------


def test_eval_instructions_binary_or_deeply_nested_are_errors_naming_the_file(tmp_path):
    binary = tmp_path / "eval.jsonl"
    binary.write_bytes(BINARY)
    with pytest.raises(EvalInstructionsError, match=rf"--eval_instructions: {binary} is not UTF-8 text.*"
                                                    "save it as UTF-8 JSON lines"):
        load_eval_instructions(binary)
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"instruction": "ok"}\n' + DEEP + "\n")
    with pytest.raises(EvalInstructionsError, match=rf"{nested} line 2: JSON nested deeper"):
        load_eval_instructions(nested)


def test_binary_chat_template_is_a_problem_naming_the_file(tmp_path):
    template = tmp_path / "template.jinja"
    template.write_bytes(BINARY)
    assert check_chat_template_setting("chat", str(template)) == [
        f"--chat_template: {template} is not UTF-8 text (byte 0x8b at offset 1: a binary file, or text in "
        "another encoding); pass a Jinja template saved as UTF-8, or chatml."
    ]


@pytest.mark.parametrize(("config", "expected"), [
    ({"zero_optimization": "stage 3"}, "has zero_optimization 'stage 3', a string; it must be an object"),
    ({"zero_optimization": [2]}, "has zero_optimization [2], a list; it must be an object"),
    ({"zero_optimization": 3}, "has zero_optimization 3, a number; it must be an object"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage True; DeepSpeed knows stages 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}},
     "zero_optimization.offload_optimizer 'cpu', a string; it must be an object such as {\"device\": \"cpu\"}"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
     "zero_optimization.offload_param.device 'gpu'; use one of none, cpu, nvme"),
])
def test_deepspeed_config_with_wrong_types_is_a_problem_not_a_crash(tmp_path, config, expected):
    from training.preflight import read_zero_settings

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    problems = check_deepspeed_config(str(path))
    assert len(problems) == 1 and problems[0].startswith(f"--deepspeed: {path} ") and expected in problems[0], problems
    with pytest.raises(ValueError, match="--deepspeed: "):  # what start's preflight reads (not AttributeError)
        read_zero_settings(str(path))


def test_deepspeed_config_binary_or_deeply_nested_is_a_problem(tmp_path):
    binary = tmp_path / "ds.json"
    binary.write_bytes(BINARY)
    assert check_deepspeed_config(str(binary)) == [
        f"--deepspeed: {binary} is not UTF-8 text (byte 0x8b at offset 1: a binary file, or text in another "
        "encoding); pass a JSON file such as ds_configs/zero2.json."
    ]
    nested = tmp_path / "nested.json"
    nested.write_text(DEEP)
    assert "is JSON nested deeper than Python's recursion limit" in check_deepspeed_config(str(nested))[0]


# --- Sequence length: the model's positions, and rows too long to tokenize -----------------------


def test_max_seq_length_is_capped_by_the_models_positions(tiny_model_dir, tiny_tokenizer, tmp_path):
    from training.arguments import max_seq_length_problem
    from training.base_model import BaseModelError, max_positions
    from training.batching import tokenize_rows

    assert max_positions(tiny_tokenizer) == 1024  # the tiny model's config: max_position_embeddings
    assert max_seq_length_problem(1024, 1024, "m") is None
    assert max_seq_length_problem(10, None, "m") is None  # a model that does not say
    with pytest.raises(BaseModelError) as raised:
        tokenize_rows([GOOD], tiny_tokenizer, max_seq_length=1_000_000_000, cache_dir=tmp_path, split="train")
    assert str(raised.value) == (f"--max_seq_length: 1000000000 is more than {tiny_model_dir} takes (1024 "
                                 "positions); use --max_seq_length 1024 or less.")


@pytest.mark.parametrize("prompt_format", ["dolly", "chat"])
def test_huge_row_is_dropped_before_the_tokenizer_sees_it(tiny_model_dir, tmp_path, monkeypatch, prompt_format):
    from training import chat, prompt
    from training.base_model import load_tokenizer
    from training.batching import tokenize_rows

    tokenizer = load_tokenizer(str(tiny_model_dir), prompt_format=prompt_format, chat_template="chatml"
                               if prompt_format == "chat" else "")
    seen: list[int] = []  # the characters of every text handed to the encoders
    encode_examples, encode_conversations = prompt.encode_examples, chat.encode_conversations

    def spy_examples(tokenizer, instructions, contexts, responses):
        seen.extend(len(i) + len(c) + len(r) for i, c, r in zip(instructions, contexts, responses, strict=True))
        return encode_examples(tokenizer, instructions, contexts, responses)

    def spy_conversations(tokenizer, conversations):
        seen.extend(sum(len(m["content"]) for m in messages) for messages in conversations)
        return encode_conversations(tokenizer, conversations)

    monkeypatch.setattr(prompt, "encode_examples", spy_examples)
    monkeypatch.setattr(chat, "encode_conversations", spy_conversations)
    huge = {**GOOD, "response": "word " * 1_000_000}  # 5 MB: took 2.9 GB before it was dropped
    rows = [GOOD, huge, GOOD]
    tokenized, dropped = tokenize_rows(rows, tokenizer, max_seq_length=256, cache_dir=tmp_path, split="train",
                                       prompt_format=prompt_format)
    assert (len(tokenized), dropped) == (2, 1)
    assert seen and max(seen) < 100  # the huge row never reached the tokenizer


# --- The trainer's command line ------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    files = {"binary": tmp_path / "train.jsonl", "template": tmp_path / "t.jinja", "ds": tmp_path / "ds.json",
             "parquet": tmp_path / "train.parquet", "deep": tmp_path / "deep.jsonl"}
    files["binary"].write_bytes(BINARY)
    files["template"].write_bytes(BINARY)
    files["ds"].write_text(json.dumps({"zero_optimization": "3"}))
    files["parquet"].write_bytes(b"PAR1" + BINARY)
    files["deep"].write_text(json.dumps(GOOD) + "\n" + DEEP + "\n")
    return files


@pytest.mark.parametrize(("flags", "expected"), [
    (["--dataset", "{binary}"], "Cannot train: --dataset: 1 unreadable file(s) in {binary}:\n  {binary}: not UTF-8"),
    (["--dataset", "{parquet}"], "{parquet}: not a readable parquet file"),
    (["--dataset", "{deep}"], "{deep} line 2: JSON nested deeper than Python's recursion limit"),
    (["--eval_instructions", "{binary}"], "Cannot train: --eval_instructions: {binary} is not UTF-8 text"),
    (["--prompt_format", "chat", "--chat_template", "{template}"], "--chat_template: {template} is not UTF-8 text"),
    (["--deepspeed", "{ds}"], "--deepspeed: {ds} has zero_optimization '3', a string; it must be an object"),
    (["--max_seq_length", "1000000000"],
     "Cannot train: --max_seq_length: 1000000000 is more than {model} takes (1024 positions); "
     "use --max_seq_length 1024 or less."),
])
def test_trainer_stops_with_one_line_per_bad_input_before_loading_the_model(
        tiny_model_dir, small_dataset_dir, bad_files, tmp_path, monkeypatch, flags, expected):
    from training import base_model, trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded despite a bad input")

    monkeypatch.setattr(base_model, "load_model", no_model)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "logs"))  # the trainer's setdefault
    names = {**{k: str(v) for k, v in bad_files.items()}, "model": str(tiny_model_dir)}
    argv = ["--base_model", str(tiny_model_dir), "--dataset", str(small_dataset_dir),
            "--eval_instructions", "none", "--output_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache")] + [flag.format(**names) for flag in flags]
    with pytest.raises(SystemExit) as raised:
        trainer.main(argv)
    assert expected.format(**names) in str(raised.value.code), raised.value.code
