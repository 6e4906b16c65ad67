"""The Dolly v2 prompt format and its tokenization with completion-only labels.

A training example reads, exactly as in databricks/dolly v2::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    Input:
    {context}

    ### Response:
    {response}

    ### End

(the ``Input:`` block only when there is a context). ``### Instruction:``, ``### Response:\\n``
and ``### End`` are added to the tokenizer as special tokens, so each is one id the model learns
to emit (``### End``) or to condition on.

Tokenization is done piece by piece rather than on the joined string, for two reasons:

* the boundary between prompt and response is known by construction, so labels are -100 for
  every prompt token up to and including the response key, and nothing has to search the ids
  for the response key (Dolly v1 crashed with "Could not find response key" when it failed);
* user text is tokenized with ``split_special_tokens=True``: a context that happens to contain
  the literal text ``### Response:`` stays ordinary text and cannot end the prompt early.

Generation (``training.generate``) encodes its prompt with :func:`encode_prompt`, the same code,
so training and inference see the same ids. A Dolly-format model is saved with
:func:`dolly_chat_template` as its chat template, so tools that only know chat messages
(transformers' pipeline, vLLM's chat endpoint) render the same prompt (one user turn: the
instruction) and stop at ``### End`` (listed in its generation_config's ``eos_token_id``).
"""

from __future__ import annotations

from typing import Any

INTRO_BLURB = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "Input:"
RESPONSE_KEY = "### Response:"
END_KEY = "### End"
RESPONSE_KEY_NL = f"{RESPONSE_KEY}\n"

# The tokens Dolly v2 adds to the vocabulary.
SPECIAL_KEYS = [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL]

IGNORE_INDEX = -100  # label value the loss ignores


def format_prompt(instruction: str, context: str = "") -> str:
    """The prompt text up to and including ``### Response:\\n`` (what generation continues)."""
    text = f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n"
    if context:
        text += f"{INPUT_KEY}\n{context}\n\n"
    return text + RESPONSE_KEY_NL


def format_example(instruction: str, response: str, context: str = "") -> str:
    """The full training text of one example, response and ``### End`` included."""
    return f"{format_prompt(instruction, context)}{response}\n\n{END_KEY}"


def _encode_text(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:  # fast tokenizers fail on an empty batch (a batch where no row has a context)
        return []
    # split_special_tokens: user text that spells a special key stays plain text.
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _key_id(tokenizer: Any, key: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(key)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"The tokenizer has no special token {key!r}: load it with "
            "training.base_model.load_tokenizer(path) (prompt_format='dolly' adds the Dolly keys)."
        )
    return token_id


def _bos_ids(tokenizer: Any) -> list[int]:
    """[bos] for tokenizers that start every sequence with it (Llama), [] otherwise (Pythia)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids and ids[0] == bos else []


def encode_prompts(
    tokenizer: Any, instructions: list[str], contexts: list[str]
) -> list[list[int]]:
    """Token ids of each prompt, ending with the ``### Response:\\n`` token."""
    instruction_id = _key_id(tokenizer, INSTRUCTION_KEY)
    response_id = _key_id(tokenizer, RESPONSE_KEY_NL)
    intro = _bos_ids(tokenizer) + _encode_text(tokenizer, [f"{INTRO_BLURB}\n\n"])[0]
    bodies = _encode_text(tokenizer, [f"\n{text}\n\n" for text in instructions])
    with_context = [i for i, context in enumerate(contexts) if context]
    context_ids = _encode_text(
        tokenizer, [f"{INPUT_KEY}\n{contexts[i]}\n\n" for i in with_context]
    )
    context_by_row = dict(zip(with_context, context_ids, strict=True))
    return [
        intro + [instruction_id] + body + context_by_row.get(i, []) + [response_id]
        for i, body in enumerate(bodies)
    ]


def encode_prompt(tokenizer: Any, instruction: str, context: str = "") -> list[int]:
    """Token ids of one prompt (see :func:`encode_prompts`)."""
    return encode_prompts(tokenizer, [instruction], [context])[0]


def encode_examples(
    tokenizer: Any, instructions: list[str], contexts: list[str], responses: list[str]
) -> dict[str, list[list[int]]]:
    """``input_ids`` and ``labels`` of full examples; labels are -100 over the prompt.

    The learned part is the response, ``### End`` and eos: the model learns to answer and to stop.
    """
    end_id = _key_id(tokenizer, END_KEY)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = encode_prompts(tokenizer, instructions, contexts)
    answers = _encode_text(tokenizer, [f"{text}\n\n" for text in responses])
    input_ids, labels = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        completion = answer + [end_id] + eos
        input_ids.append(prompt + completion)
        labels.append([IGNORE_INDEX] * len(prompt) + completion)
    return {"input_ids": input_ids, "labels": labels}


def dolly_chat_template(tokenizer: Any) -> str:
    """A chat template that renders this format's prompt: one user turn is the instruction, an
    assistant turn the response; a system turn is ignored (Dolly's intro is fixed).

    Rendered and tokenized whole, it gives the ids of :func:`encode_prompt` (tested).
    """
    bos = "{{ bos_token }}" if _bos_ids(tokenizer) else ""
    return (
        "{%- if messages | selectattr('role', 'equalto', 'user') | list | length != 1 -%}"
        "{{ raise_exception('A Dolly-format model answers one instruction: pass one user message.') }}"
        "{%- endif -%}"
        f"{bos}{{{{ {INTRO_BLURB!r} + '\n\n' }}}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{{{ {INSTRUCTION_KEY!r} + '\n' + message['content'] + '\n\n' + {RESPONSE_KEY_NL!r} }}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{ message['content'] + '\n\n' + {END_KEY!r} }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
