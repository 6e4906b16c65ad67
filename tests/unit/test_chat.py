"""The chat prompt format: exact assistant masks on real templates, template checks, stop tokens.

The templates in tests/fixtures/chat_templates are the models' own, copied from their tokenizer
files: SmolLM2-135M-Instruct's ChatML (from the bundled GGUF), Meta-Llama-3-8B-Instruct's, and
Gemma 3's (google/gemma-3-*-it), each with its special tokens added to the tiny test tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.chat import (
    CHATML_TEMPLATE,
    chat_problems,
    encode_conversations,
    end_of_turn,
    row_messages,
    setup_problems,
    template_tokens,
)
from training.prompt import IGNORE_INDEX

TEMPLATES = Path(__file__).resolve().parent.parent / "fixtures" / "chat_templates"
# template file -> (its special tokens, its bos token or None, its end of turn)
REAL_TEMPLATES = {
    "smollm2_chatml.jinja": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "llama3.jinja": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                     "<|begin_of_text|>", "<|eot_id|>"),
    "gemma3.jinja": (["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>"),
}
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris, on the Seine."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def chat_tokenizer(model_dir: Path, template: str, tokens: list[str] = (), bos: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    if bos:
        tokenizer.bos_token = bos
    tokenizer.chat_template = template
    return tokenizer


def real_template_tokenizer(model_dir: Path, name: str):
    tokens, bos, _ = REAL_TEMPLATES[name]
    return chat_tokenizer(model_dir, (TEMPLATES / name).read_text(), tokens, bos)


def learned_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The learned stretches of a row, decoded (special tokens kept)."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("name", sorted(REAL_TEMPLATES))
def test_masks_learn_exactly_each_answer_and_its_end_of_turn(tiny_model_dir, name):
    tokenizer = real_template_tokenizer(tiny_model_dir, name)
    eot = REAL_TEMPLATES[name][2]
    encoded = encode_conversations(tokenizer, [CONVERSATION])
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    # Only the two answers and their end-of-turn tokens: no system or user text, no role
    # header, no newline after the end of turn.
    assert learned_runs(tokenizer, ids, labels) == [f"Paris, on the Seine.{eot}", f"Rome.{eot}"]
    # The ids are what a serving stack feeds the model for the same messages.
    served = tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)
    assert ids == served["input_ids"]
    assert end_of_turn(tokenizer) == eot
    assert eot in template_tokens(tokenizer)
    assert chat_problems(tokenizer, with_system=True, model_name="m") == []


def test_an_answer_that_spells_a_header_is_still_learned_whole(tiny_model_dir):
    tokenizer = real_template_tokenizer(tiny_model_dir, "smollm2_chatml.jinja")
    tricky = [{"role": "user", "content": "Say 'assistant'."}, {"role": "assistant", "content": "assistant\nassistant"}]
    encoded = encode_conversations(tokenizer, [tricky])
    assert learned_runs(tokenizer, encoded["input_ids"][0], encoded["labels"][0]) == ["assistant\nassistant<|im_end|>"]


def test_a_template_that_moves_the_system_prompt_is_refused_with_the_reason(tiny_model_dir):
    # Mistral-v0.3-style: the system prompt goes into the LAST user turn, so what precedes the
    # first answer changes once a second exchange follows: no exact mask exists.
    moving = (
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
        "{%- if loop.last and system is defined %}{{ '[INST] ' + system + '\n\n' + message['content'] + '[/INST]' }}"
        "{%- else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
        "{%- else %}{{ message['content'] + '</s>' }}{%- endif %}{%- endfor %}"
    )
    tokenizer = chat_tokenizer(tiny_model_dir, moving, ["[INST]", "[/INST]"])
    problems = chat_problems(tokenizer, with_system=True, model_name="mistral-like")
    assert len(problems) == 1 and "renders a conversation's earlier turns differently" in problems[0]
    # Without system prompts in the data the same template is exact.
    assert chat_problems(tokenizer, with_system=False, model_name="mistral-like") == []
    no_system = CONVERSATION[1:]
    encoded = encode_conversations(tokenizer, [no_system])
    assert learned_runs(tokenizer, encoded["input_ids"][0], encoded["labels"][0]) == [
        "Paris, on the Seine.</s>", "Rome.</s>"]


def test_missing_or_unusable_templates_are_refused_with_the_fix(tiny_model_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    (problem,) = chat_problems(bare, with_system=False, model_name="tiny")
    assert "tiny has no chat template" in problem and "--chat_template chatml" in problem
    no_end = chat_tokenizer(tiny_model_dir,
                            "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    (problem,) = chat_problems(no_end, with_system=False, model_name="tiny")
    assert "nothing after the answer" in problem
    # Gemma 2's template refuses system turns: fine without them, refused with them.
    gemma2 = chat_tokenizer(tiny_model_dir, "{% if messages[0]['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            + (TEMPLATES / "gemma3.jinja").read_text(), ["<start_of_turn>", "<end_of_turn>"])
    assert chat_problems(gemma2, with_system=False, model_name="gemma-2") == []
    (problem,) = chat_problems(gemma2, with_system=True, model_name="gemma-2")
    assert "cannot render a conversation with a system prompt" in problem and "System role not supported" in problem
    rows = [{"messages": CONVERSATION}]
    assert setup_problems(gemma2, rows, "gemma-2") == [problem]


def test_chatml_setting_adds_its_tokens_and_an_end_of_turn_the_model_can_emit(tiny_model_dir):
    from training.base_model import load_tokenizer, recipe_tokens

    tokenizer = load_tokenizer(str(tiny_model_dir), prompt_format="chat", chat_template="chatml")
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert end_of_turn(tokenizer) == "<|im_end|>"
    assert len(tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]) == 1
    assert recipe_tokens(tokenizer) == ["<|im_end|>", "<|im_start|>"]
    assert tokenizer.convert_tokens_to_ids("### Response:\n") in (None, tokenizer.unk_token_id)  # no Dolly keys
    # A custom template whose end of turn is new text: it becomes one special token.
    custom = tokenizer.chat_template.replace("<|im_end|>", "<|end|>")
    path = tiny_model_dir.parent / "custom.jinja"
    path.write_text(custom)
    custom_tokenizer = load_tokenizer(str(tiny_model_dir), prompt_format="chat", chat_template=str(path))
    assert end_of_turn(custom_tokenizer) == "<|end|>"
    assert len(custom_tokenizer("<|end|>", add_special_tokens=False)["input_ids"]) == 1


def test_dolly_rows_become_one_user_turn_with_the_context():
    row = {"instruction": "Summarize.", "context": "Cats sleep a lot.", "response": "Cats nap.", "category": ""}
    assert row_messages(row) == [{"role": "user", "content": "Summarize.\n\nCats sleep a lot."},
                                 {"role": "assistant", "content": "Cats nap."}]
    assert row_messages({**row, "context": ""})[0]["content"] == "Summarize."


def test_dolly_models_carry_a_chat_template_that_renders_their_own_prompt(tiny_tokenizer):
    from training.prompt import END_KEY, encode_prompt, format_example
    from training.prompt_format import encode_instruction, prompt_format_of, stop_token_ids

    messages = [{"role": "user", "content": "Name a color."}]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
            == encode_prompt(tiny_tokenizer, "Name a color."))
    whole = tiny_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "Blue."}], tokenize=False)
    assert whole == format_example("Name a color.", "Blue.")
    assert prompt_format_of(tiny_tokenizer) == "dolly"
    assert stop_token_ids(tiny_tokenizer) == [tiny_tokenizer.convert_tokens_to_ids(END_KEY),
                                              tiny_tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="--system"):
        encode_instruction(tiny_tokenizer, "Name a color.", system="Be brief.")


@pytest.mark.parametrize("prompt_format", ["dolly", "chat"])
def test_saved_generation_config_stops_at_the_formats_end(tiny_model_dir, tmp_path, prompt_format):
    import torch

    from training.base_model import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir), prompt_format=prompt_format,
                               chat_template="chatml" if prompt_format == "chat" else "")
    model = load_model(str(tiny_model_dir), tokenizer, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    end = "### End" if prompt_format == "dolly" else "<|im_end|>"
    assert saved["eos_token_id"] == [tokenizer.convert_tokens_to_ids(end), tokenizer.eos_token_id]
    assert saved["pad_token_id"] == tokenizer.pad_token_id

    from transformers import AutoTokenizer

    from training.prompt_format import end_marker, prompt_format_of

    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # the format is known from the saved files alone
    assert (prompt_format_of(reloaded), end_marker(reloaded)) == (prompt_format, end)
