"""Which prompt format a tokenizer is for, and the tokens that end its answers: the one home of
"what format is this model, which tokens stop it", for training, evaluation and generation.

    prompt_format_of(tokenizer)     # "dolly" (the Dolly keys) or "chat" (its chat template)
    end_marker(tokenizer)           # "### End", or the template's end of turn ("<|im_end|>")
    stop_token_ids(tokenizer)       # [id of the end marker, eos]
"""

from __future__ import annotations

from typing import Any

from training.prompt import END_KEY, RESPONSE_KEY, RESPONSE_KEY_NL, encode_prompt


def prompt_format_of(tokenizer: Any) -> str:
    """``dolly`` or ``chat``: the format a tokenizer set up here (or saved with a model tuned
    here) is for. Dolly-format tokenizers carry the Dolly chat template; models tuned before
    that template existed are known by their Dolly keys."""
    if RESPONSE_KEY in (tokenizer.chat_template or ""):
        return "dolly"
    response_id = tokenizer.convert_tokens_to_ids(RESPONSE_KEY_NL)
    has_keys = response_id is not None and response_id != tokenizer.unk_token_id
    return "dolly" if has_keys else "chat"



def end_marker(tokenizer: Any) -> str:
    """What an answer ends with: ``### End``, or the chat template's end of turn."""
    from training.chat import end_of_turn

    return END_KEY if prompt_format_of(tokenizer) == "dolly" else end_of_turn(tokenizer)



def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids generation stops at: the end marker's, then eos (saved as the model's
    ``generation_config.eos_token_id``, so any generate() call stops there too)."""
    ids = [tokenizer.convert_tokens_to_ids(end_marker(tokenizer))]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids



def encode_instruction(tokenizer: Any, instruction: str, context: str = "", system: str = "") -> list[int]:
    """The prompt ids of one instruction in the tokenizer's format (as in training)."""
    if prompt_format_of(tokenizer) == "dolly":
        if system:
            raise ValueError("--system: a Dolly-format model has a fixed intro and no system prompt; "
                             "drop --system (models trained with --prompt_format chat take one).")
        return encode_prompt(tokenizer, instruction, context)
    from training.chat import encode_chat_prompt, instruction_messages

    return encode_chat_prompt(tokenizer, instruction_messages(instruction, context, system))
