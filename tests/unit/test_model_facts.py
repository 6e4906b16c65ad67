"""`start`'s facts about a model (positions, size, linear layers), kept between runs: equal to
what the slow path reads, keyed by the model's files, never trusted when read back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest

from tests.conftest import REPO
from training import model_facts
from training.model_facts import ModelFactsCache, model_key


def slow_size(model_dir):
    from transformers import AutoConfig

    from training.memory_estimate import model_size_from_config

    return model_size_from_config(AutoConfig.from_pretrained(model_dir))


def slow_positions(model_dir):
    from training.base_model import load_tokenizer, max_positions

    return max_positions(load_tokenizer(str(model_dir)))


def forbid_the_slow_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr("training.model_facts.model_size_from_config", fail)
    monkeypatch.setattr("training.model_facts.load_tokenizer", fail)


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    """A copy of the tiny model this test may change."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_facts_equal_the_slow_path_and_a_second_read_computes_nothing(model_dir, tmp_path, monkeypatch):
    facts = ModelFactsCache(tmp_path / "cache")
    size = facts.size(str(model_dir), trust_remote_code=False)
    assert size == slow_size(model_dir) and size["linear_layers"] is not None
    assert facts.positions(str(model_dir), trust_remote_code=False) == slow_positions(model_dir) == 1024
    assert len(list((tmp_path / "cache" / "model-facts").glob("*.json"))) == 2

    forbid_the_slow_path(monkeypatch)
    again = ModelFactsCache(tmp_path / "cache")
    assert again.size(str(model_dir), trust_remote_code=False) == size
    assert again.positions(str(model_dir), trust_remote_code=False) == 1024


@pytest.mark.parametrize("change", ["config.json", "tokenizer_config.json", "transformers", "remove tokenizer_config"])
def test_the_key_changes_with_the_files_and_the_transformers_version(model_dir, monkeypatch, change):
    before = model_key(str(model_dir), False)
    assert before is not None and before == model_key(str(model_dir), False)
    if change == "transformers":
        monkeypatch.setattr(model_facts, "_transformers_version", lambda: "0.0.1")
    elif change == "remove tokenizer_config":
        (model_dir / "tokenizer_config.json").unlink()
    else:
        data = json.loads((model_dir / change).read_text())
        data["model_max_length"] = 64
        (model_dir / change).write_text(json.dumps(data))
    assert model_key(str(model_dir), False) not in (None, before)


def test_a_changed_config_is_read_again(model_dir, tmp_path):
    facts = ModelFactsCache(tmp_path / "cache")
    assert facts.positions(str(model_dir), trust_remote_code=False) == 1024
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 512
    (model_dir / "config.json").write_text(json.dumps(config))
    assert facts.positions(str(model_dir), trust_remote_code=False) == 512


def test_remote_code_hub_names_and_huge_configs_are_never_cached(model_dir, tmp_path, monkeypatch):
    assert model_key(str(model_dir), True) is None  # its code may change under the same config
    assert model_key("HuggingFaceTB/SmolLM2-135M", False) is None  # not here to hash
    assert model_key(str(tmp_path / "nowhere"), False) is None
    monkeypatch.setattr(model_facts, "MAX_FILE_BYTES", 16)
    assert model_key(str(model_dir), False) is None

    monkeypatch.setattr(model_facts, "MAX_FILE_BYTES", 1 << 20)
    facts = ModelFactsCache(tmp_path / "cache")
    assert facts.positions(str(model_dir), trust_remote_code=True) == 1024
    assert not (tmp_path / "cache" / "model-facts").exists()


def good_size(model_dir):
    size = slow_size(model_dir)
    return {**size, "linear_layers": asdict(size["linear_layers"])}


def bad_records(good):
    layers = good["linear_layers"]
    yield "not JSON", b"{"
    yield "not UTF-8", b"\xff\xfe{}"
    yield "too large", b" " * (model_facts.MAX_FILE_BYTES + 1) + b"{}"
    yield "deeply nested", b"[" * 100_000 + b"]" * 100_000
    yield "a list", json.dumps([good]).encode()
    yield "a key missing", json.dumps({k: v for k, v in good.items() if k != "vocab_size"}).encode()
    yield "an extra key", json.dumps({**good, "__class__": "os.system"}).encode()
    yield "a bool count", json.dumps({**good, "num_parameters": True}).encode()
    yield "a zero size", json.dumps({**good, "num_parameters": 0}).encode()
    yield "a negative count", json.dumps({**good, "largest_layer_params": -1}).encode()
    yield "a float", json.dumps({**good, "hidden_size": 32.5}).encode()
    yield "a string count", json.dumps({**good, "num_layers": "2"}).encode()
    yield "a markup layer name", json.dumps(
        {**good, "linear_layers": {**layers, "in_features": {"<script>": 1}, "out_features": {"<script>": 1}}}).encode()
    yield "a path layer name", json.dumps(
        {**good, "linear_layers": {**layers, "in_features": {"../x": 1}, "out_features": {"../x": 1}}}).encode()
    yield "names that differ", json.dumps(
        {**good, "linear_layers": {**layers, "out_features": {"q_proj": 1}}}).encode()
    yield "too many layers", json.dumps({**good, "linear_layers": {
        **layers, "in_features": {f"l{i}": 1 for i in range(5000)},
        "out_features": {f"l{i}": 1 for i in range(5000)}}}).encode()
    yield "layers not a dict", json.dumps({**good, "linear_layers": [1, 2]}).encode()


def test_a_cached_record_that_is_not_exactly_ours_is_ignored_and_replaced(model_dir, tmp_path):
    good = good_size(model_dir)
    key = model_key(str(model_dir), False)
    folder = tmp_path / "cache" / "model-facts"
    folder.mkdir(parents=True)
    for name, content in bad_records(good):
        (folder / f"{key}-size.json").write_bytes(content)
        size = ModelFactsCache(tmp_path / "cache").size(str(model_dir), trust_remote_code=False)
        assert size == slow_size(model_dir), name
        assert json.loads((folder / f"{key}-size.json").read_text()) == good, name
    for bad in ({"positions": 0}, {"positions": True}, {"positions": "1024"}, {"positions": 1024, "x": 1}, {}):
        (folder / f"{key}-positions.json").write_text(json.dumps(bad))
        assert ModelFactsCache(tmp_path / "cache").positions(str(model_dir), trust_remote_code=False) == 1024, bad


def test_a_symlinked_record_is_not_followed(model_dir, tmp_path, monkeypatch):
    key = model_key(str(model_dir), False)
    folder = tmp_path / "cache" / "model-facts"
    folder.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"positions": 7}))
    (folder / f"{key}-positions.json").symlink_to(elsewhere)
    assert ModelFactsCache(tmp_path / "cache").positions(str(model_dir), trust_remote_code=False) == 1024
    assert json.loads(elsewhere.read_text()) == {"positions": 7}  # replaced the link, not written through it


def test_a_cache_folder_that_cannot_be_written_costs_a_recomputation_not_the_run(model_dir, tmp_path):
    # (a file where the folder should be: a read-only folder would not stop root, who runs CI)
    (tmp_path / "cache").write_text("not a folder")
    assert ModelFactsCache(tmp_path / "cache").positions(str(model_dir), trust_remote_code=False) == 1024


def test_starts_model_checks_with_a_warm_cache_do_not_import_torch(model_dir, tmp_path):
    """In a fresh process, as `start` runs them: the size for the preflight, the LoRA targets,
    the positions for --max_seq_length."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO / 'flows')!r})
from preflight_checks import training_plan
from training.adapters import peft_problems
from training.arguments import parse_args
from training.model_facts import ModelFactsCache
model = {str(model_dir)!r}
m, d, t = parse_args(["--base_model", model, "--dataset", "x", "--cache_dir", {str(tmp_path / 'cache')!r},
                      "--peft", "lora", "--lora_target_modules", "q_proj,query_key_value"])
plan, notes = training_plan(m, d, t, model)
problems = peft_problems(m, model, d.cache_dir)
print(plan.num_parameters, len(notes), len(problems),
      ModelFactsCache(d.cache_dir).positions(model, trust_remote_code=False))
print("torch" in sys.modules)
"""
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
            for _ in range(2)]
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
    cold, warm = (result.stdout.split("\n") for result in runs)
    assert cold[0] == warm[0] == f"{slow_size(model_dir)['num_parameters']} 0 1 1024"
    assert cold[1] == "True" and warm[1] == "False"
