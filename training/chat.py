"""The chat prompt format: conversations rendered with the tokenizer's own chat template.

``--prompt_format chat`` trains on what a served model sees: every row (a conversation, or a
Dolly/Alpaca row as one user turn and one assistant turn) is rendered by the tokenizer's chat
template, the string a serving stack (transformers' pipeline, vLLM, TGI) renders for the same
messages, and tokenized whole, as they tokenize it.

The loss covers each assistant turn's content and its end-of-turn token, nothing else: system
and user turns and the template's scaffolding are masked. Few templates mark assistant text for
transformers' ``return_assistant_tokens_mask``, so the mask is computed for any template by
rendering turn by turn:

* the conversation up to an assistant turn, with the generation prompt, is the prefix ``P``;
* the conversation up to and including that turn is ``R``; both are prefixes of the whole
  rendering, so the turn is the text between ``len(P)`` and ``len(R)``;
* of that text, what the model must produce is everything up to the last non-space character
  (the content and the end-of-turn token, ``<|im_end|>``); the newline that some templates put
  after it (ChatML, Gemma) is scaffolding the next turn's header follows;
* a token is learned when its characters overlap that span (offsets from the fast tokenizer).

A template that renders earlier turns differently once later turns follow (for example one that
moves the system prompt into the last user turn) has no such prefixes; it is refused with that
reason before training.

    from training.chat import encode_conversations
    encode_conversations(tokenizer, [[{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello!"}]])
"""

from __future__ import annotations

from typing import Any

from training.prompt import IGNORE_INDEX

PROMPT_FORMATS = ("dolly", "chat")
ROLES = ("system", "user", "assistant")

# The ChatML template as SmolLM2 and Qwen write it, without a default system prompt.
CHATML = "chatml"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]

# What the checks render: a system prompt (when the data has one) and two exchanges.
PROBE_ANSWER = "Sure: the probe answer."
PROBE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer."},
    {"role": "user", "content": "Second question?"},
    {"role": "assistant", "content": PROBE_ANSWER},
]


class ChatTemplateError(ValueError):
    """The chat template cannot give exact assistant masks; the message says why and the fix."""


def read_chat_template(value: str) -> str:
    """The Jinja text ``--chat_template`` names: ``chatml``, or a path to a ``.jinja`` file."""
    if value == CHATML:
        return CHATML_TEMPLATE
    from training.dataset import not_utf8
    from training.paths import resolve_repo_path

    path = resolve_repo_path(value)
    if not path.is_file():
        raise ChatTemplateError(
            f"--chat_template: {value} is neither 'chatml' nor an existing Jinja file. Pass "
            "chatml, or the path to a chat template (.jinja), e.g. one saved as chat_template.jinja "
            "beside a model."
        )
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ChatTemplateError(
            f"--chat_template: {value} is {not_utf8(err)}; pass a Jinja template saved as UTF-8, or chatml."
        ) from None


def check_chat_template_setting(prompt_format: str, chat_template: str) -> list[str]:
    """Problems with --prompt_format and --chat_template visible without the tokenizer."""
    if prompt_format not in PROMPT_FORMATS:
        return [f"--prompt_format: {prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}."]
    if not chat_template:
        return []
    if prompt_format != "chat":
        return [f"--chat_template {chat_template}: applies to --prompt_format chat only (this run: "
                f"{prompt_format}); drop it, or set --prompt_format chat."]
    try:
        read_chat_template(chat_template)
    except ChatTemplateError as err:
        return [str(err)]
    return []


def row_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation of a normalized row: its messages, or a Dolly/Alpaca row as one user
    turn (the instruction, then the context) and one assistant turn."""
    if "messages" in row:
        return row["messages"]
    user = row["instruction"] + (f"\n\n{row['context']}" if row.get("context") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}]


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character span learned in each assistant turn).

    Raises ChatTemplateError when the template renders a turn differently once later turns
    follow (no exact mask exists then).
    """
    text = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], add_generation_prompt=True)
        through = render(tokenizer, messages[: index + 1])
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise ChatTemplateError(
                "the chat template renders a conversation's earlier turns differently once later "
                f"turns follow (turn {index + 1}, {message['role']}): the text before an answer is not "
                "a prefix of the whole conversation, so the answer's tokens cannot be located exactly. "
                "Use another --chat_template (chatml), or conversations without the turns the "
                "template moves (e.g. a system prompt placed into the last user turn)."
            )
        turn = text[len(before) : len(through)]
        spans.append((len(before), len(before) + len(turn.rstrip())))
    return text, spans


def encode_conversations(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> dict[str, list[list[int]]]:
    """``input_ids`` and ``labels`` of whole conversations; labels are -100 outside the
    assistant turns' content and end-of-turn token."""
    input_ids, labels = [], []
    for messages in conversations:
        text, spans = assistant_spans(tokenizer, messages)
        # add_special_tokens=False: the template writes bos itself where the model wants one
        # (what apply_chat_template(tokenize=True) and serving stacks do too).
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        learned = [any(start < span_end and stop > span_start for span_start, span_end in spans)
                   for start, stop in encoded["offset_mapping"]]
        input_ids.append(ids)
        labels.append([token if keep else IGNORE_INDEX for token, keep in zip(ids, learned, strict=True)])
    return {"input_ids": input_ids, "labels": labels}


def encode_chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation so far with the generation prompt (what generation continues)."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def instruction_messages(instruction: str, context: str = "", system: str = "") -> list[dict[str, str]]:
    """One instruction (and its context) as the user turn a chat model answers, as in training."""
    user = instruction + (f"\n\n{context}" if context else "")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def end_of_turn(tokenizer: Any) -> str:
    """The text a template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``): what follows the answer, up to the next whitespace."""
    text, spans = assistant_spans(tokenizer, PROBE[1:])  # without the system turn some templates refuse
    start, stop = spans[-1]
    turn = text[start:stop]
    at = turn.rfind(PROBE_ANSWER)
    closing = turn[at + len(PROBE_ANSWER):].strip() if at >= 0 else ""
    return closing.split()[0] if closing.split() else ""


def template_tokens(tokenizer: Any) -> list[str]:
    """The special tokens a rendered conversation uses (headers, end of turn, bos): under LoRA
    their embedding rows train, since base models often leave them untrained."""
    text = render(tokenizer, PROBE[1:])
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, added in tokenizer.added_tokens_decoder.items() if added.special
    }
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return sorted({tokenizer.convert_ids_to_tokens(i) for i in ids if i in special})


def chat_problems(tokenizer: Any, *, with_system: bool, model_name: str) -> list[str]:
    """Why ``tokenizer`` cannot train --prompt_format chat; empty when it can.

    ``with_system``: the data has system prompts, so the template must render them.
    """
    import jinja2

    if not tokenizer.chat_template:
        return [f"--prompt_format chat: {model_name} has no chat template. Set one with --chat_template "
                "chatml (adds <|im_start|>/<|im_end|>) or --chat_template path/to/template.jinja, or "
                "train with --prompt_format dolly."]
    probe = PROBE if with_system else PROBE[1:]
    try:
        assistant_spans(tokenizer, probe)
        closing = end_of_turn(tokenizer)
    except ChatTemplateError as err:
        return [f"--prompt_format chat: {model_name}: {err}"]
    except (jinja2.TemplateError, TypeError, KeyError) as err:
        what = "a conversation with a system prompt" if with_system else "a two-exchange conversation"
        fix = " (the data has system turns: drop them, or use another --chat_template)" if with_system else ""
        return [f"--prompt_format chat: {model_name}'s chat template cannot render {what}: "
                f"{type(err).__name__}: {err}{fix}."]
    if not closing:
        return [f"--prompt_format chat: {model_name}'s chat template ends an assistant turn with nothing "
                "after the answer, so the model could not learn to stop. Use a template with an "
                "end-of-turn token (--chat_template chatml)."]
    return []


def end_of_turn_problem(tokenizer: Any) -> str | None:
    """A problem when the end-of-turn text is not one token of the vocabulary (after the
    tokens the recipe adds), else None."""
    closing = end_of_turn(tokenizer)
    if len(tokenizer(closing, add_special_tokens=False)["input_ids"]) != 1:
        return (f"--prompt_format chat: the template's end of turn {closing!r} is not one token of the "
                "tokenizer, so generation could not stop at it.")
    return None


def setup_problems(tokenizer: Any, rows: list[dict[str, Any]], model_name: str) -> list[str]:
    """Why the chat format cannot train on ``rows`` with ``tokenizer`` (set up by load_tokenizer)."""
    with_system = any(m["role"] == "system" for row in rows for m in row.get("messages", []))
    problems = chat_problems(tokenizer, with_system=with_system, model_name=model_name)
    if not problems and (problem := end_of_turn_problem(tokenizer)):
        problems.append(problem)
    return problems
