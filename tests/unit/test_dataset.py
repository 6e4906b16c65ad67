"""Reading and validating instruction data: schemas, bad rows, splits, sampling."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SAMPLE_DIR, read_jsonl, write_jsonl
from training.dataset import BUNDLED_DATASET, DatasetError, load_instruction_data, sample_and_split

GOOD = {"instruction": "Name a color.", "context": "", "response": "Blue.", "category": "open_qa"}


def test_bundled_sample_covers_all_eight_dolly_categories():
    data = load_instruction_data(BUNDLED_DATASET)
    categories = {row["category"] for row in data.train}
    assert categories == {
        "open_qa", "closed_qa", "information_extraction", "summarization",
        "classification", "brainstorming", "creative_writing", "general_qa",
    }
    assert len(data.train) >= 200 and len(data.eval) >= 40
    held_out = {r["instruction"] for r in data.eval}
    assert not held_out & {r["instruction"] for r in data.train}
    assert data.schema_counts == {"dolly": len(data.train) + len(data.eval)}


def test_alpaca_rows_are_mapped_to_dolly(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate.", "input": "Hola", "output": "Hello"},
        {"instruction": "Count to two.", "input": "", "output": "One, two."},
    ])
    data = load_instruction_data(str(path))
    assert data.train[0] == {"instruction": "Translate.", "context": "Hola", "response": "Hello", "category": ""}
    assert data.train[1]["context"] == ""
    assert data.schema_counts == {"alpaca": 2}


def test_json_list_and_parquet_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rows.json").write_text(json.dumps([GOOD, GOOD]))
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD, GOOD]), tmp_path / "rows.parquet")
    assert len(load_instruction_data(str(tmp_path / "rows.json")).train) == 2
    assert len(load_instruction_data(str(tmp_path / "rows.parquet")).train) == 3


def test_directory_splits_by_file_name(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD] * 5)
    write_jsonl(tmp_path / "test.jsonl", [GOOD] * 2)
    data = load_instruction_data(str(tmp_path))
    assert (len(data.train), len(data.eval)) == (5, 2)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"instruction": "Hi", "response": "Yo"', "line 2: not valid JSON"),
        ('{"instruction": "Hi", "context": ""}',
         "line 2: no 'response' (Dolly schema), 'output' (Alpaca), 'messages' or 'conversations' (ShareGPT)"),
        ('{"instruction": "Hi", "response": "  "}', "line 2: missing or empty 'response'"),
        ('{"instruction": "", "response": "Yo"}', "line 2: missing or empty 'instruction'"),
        ('{"response": "Yo"}', "line 2: missing or empty 'instruction'"),
        ('{"instruction": "Hi", "response": "Yo", "context": 5}', "line 2: 'context' must be a string"),
        ('["not", "an", "object"]', "line 2: expected a JSON object"),
        ('{"instruction": "Hi", "output": ""}', "line 2: missing or empty 'output'"),
    ],
)
def test_each_bad_row_names_file_and_line(tmp_path, line, expected):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DatasetError) as err:
        load_instruction_data(str(path))
    message = str(err.value)
    assert f"{path} {expected}" in message
    assert "--skip_bad_rows" in message  # the fix is named


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Bye."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " Hello. "}]}


def turns(*pairs: tuple) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in pairs]})


def test_messages_and_sharegpt_rows_are_conversations_under_the_chat_format(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, SHAREGPT, GOOD])
    data = load_instruction_data(str(path), prompt_format="chat")
    assert data.train[0] == {"messages": CHAT["messages"], "category": ""}
    assert data.train[1]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert data.train[2] == GOOD  # Dolly rows stay Dolly rows: the chat template renders them as one exchange
    assert data.schema_counts == {"messages": 1, "sharegpt": 1, "dolly": 1}


def test_the_dolly_format_takes_single_exchanges_and_refuses_conversations(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [SHAREGPT, CHAT])
    with pytest.raises(DatasetError) as err:
        load_instruction_data(str(path))
    assert f"{path} line 2: a conversation with 5 turns; the Dolly prompt format holds one user turn" in str(err.value)
    assert "--prompt_format chat" in str(err.value)
    data = load_instruction_data(str(path), skip_bad_rows=True)
    assert data.train == [{"instruction": "Hi", "context": "", "response": "Hello.", "category": ""}]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (turns(("user", "Hi"), ("bot", "Yo")), "turn 2 has unknown role 'bot' (use system, user, assistant)"),
        (turns(("user", "Hi"), ("assistant", " ")), "turn 2 (assistant) has a missing or empty 'content'"),
        (turns(("user", "Hi")), "no assistant turn (nothing to learn)"),
        (turns(("user", "Hi"), ("user", "Again"), ("assistant", "Yo")),
         "turns out of order: turn 2 is user, expected assistant"),
        (turns(("assistant", "Yo"), ("user", "Hi"), ("assistant", "Yo")),
         "turns out of order: turn 1 is assistant, expected user"),
        (turns(("user", "Hi"), ("assistant", "Yo"), ("system", "Late")),
         "turns out of order: turn 3 is system, expected user"),
        (turns(("user", "Hi"), ("assistant", "Yo"), ("user", "And?")),
         "the last turn is user with no assistant answer"),
        ('{"messages": []}', "'messages' must be a non-empty list of turns"),
        ('{"messages": ["Hi"]}', "turn 1 is not an object"),
        (json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "chatgpt", "value": "Yo"}]}),
         "turn 2 has unknown from 'chatgpt' (use system, human, gpt)"),
        (json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]}),
         "turn 2 (gpt) has a missing or empty 'value'"),
        (json.dumps({"conversations": [{"from": "gpt", "value": "Yo"}]}),
         "turns out of order: turn 1 is gpt, expected human"),
    ],
)
def test_each_bad_conversation_names_file_line_and_turn(tmp_path, line, expected):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + line + "\n")
    with pytest.raises(DatasetError) as err:
        load_instruction_data(str(path), prompt_format="chat")
    assert f"{path} line 2: {expected}" in str(err.value)
    assert "1 bad row(s)" in str(err.value)


def test_every_bad_row_is_reported_at_once(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(["{oops", json.dumps(GOOD), '{"instruction": "x"}', "[]"]) + "\n")
    with pytest.raises(DatasetError) as err:
        load_instruction_data(str(path))
    assert "3 bad row(s)" in str(err.value)
    for line in (1, 3, 4):
        assert f"line {line}:" in str(err.value)


def test_skip_bad_rows_skips_and_counts(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(["{oops", json.dumps(GOOD), '{"instruction": "x"}']) + "\n")
    data = load_instruction_data(str(path), skip_bad_rows=True)
    assert len(data.train) == 1 and data.skipped_rows == 2


@pytest.mark.parametrize("source", ["missing.jsonl", "./nowhere/", "/definitely/not/here.parquet"])
def test_missing_path_is_a_clear_error(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_instruction_data(source)


def test_unsupported_suffix_and_empty_directory(tmp_path):
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="suffix '.csv'"):
        load_instruction_data(str(tmp_path / "rows.csv"))
    with pytest.raises(DatasetError, match="holds no"):
        load_instruction_data(str(tmp_path))


def test_hub_id_is_tried_on_the_hub_with_a_clear_error_offline():
    with pytest.raises(DatasetError, match="loading it from the hub failed"):
        load_instruction_data("no-such-org/no-such-dataset-xyz")


def test_fingerprint_tracks_content(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    b = write_jsonl(tmp_path / "b.jsonl", [dict(GOOD, response="Red.")])
    same = write_jsonl(tmp_path / "same.jsonl", [GOOD])
    fp = load_instruction_data(str(a)).fingerprint
    assert fp == load_instruction_data(str(same)).fingerprint
    assert fp != load_instruction_data(str(b)).fingerprint


def test_split_and_sample_are_deterministic_and_disjoint():
    rows = read_jsonl(SAMPLE_DIR / "train.jsonl")
    from training.dataset import InstructionData

    data = InstructionData(source="x", train=rows)
    train, held = sample_and_split(data, sample_fraction=0.5, test_size=0.1, seed=1)
    again = sample_and_split(data, sample_fraction=0.5, test_size=0.1, seed=1)
    assert (train, held) == again
    assert len(train) + len(held) == round(len(rows) * 0.5)
    assert len(held) == round(len(rows) * 0.5 * 0.1)
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in train}
    _, counted = sample_and_split(data, sample_fraction=1.0, test_size=25, seed=1)
    assert len(counted) == 25
    with pytest.raises(DatasetError, match="--test_size"):
        sample_and_split(data, sample_fraction=1.0, test_size=10_000, seed=1)


def test_s3_file_and_prefix_are_downloaded_and_read(tmp_path, s3_bucket):
    s3_bucket.put_object(Bucket="data", Key="dolly/train.jsonl", Body="\n".join([json.dumps(GOOD)] * 4))
    s3_bucket.put_object(Bucket="data", Key="dolly/eval.jsonl", Body=json.dumps(GOOD))
    s3_bucket.put_object(Bucket="data", Key="dolly/README.md", Body="not data")
    one_file = load_instruction_data("s3://data/dolly/train.jsonl", cache_dir=tmp_path)
    assert (len(one_file.train), len(one_file.eval)) == (4, 0)
    prefix = load_instruction_data("s3://data/dolly/", cache_dir=tmp_path)
    assert (len(prefix.train), len(prefix.eval)) == (4, 1)
    with pytest.raises(DatasetError, match="holds no"):
        load_instruction_data("s3://data/empty/", cache_dir=tmp_path)


def test_s3_missing_key_is_a_clear_error(tmp_path, s3_bucket):
    with pytest.raises(DatasetError, match="could not read s3://data/missing.jsonl"):
        load_instruction_data("s3://data/missing.jsonl", cache_dir=tmp_path)
