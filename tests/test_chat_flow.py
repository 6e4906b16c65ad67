"""`--prompt-format chat` end to end on the bundled SmolLM2-135M-Instruct, through the flow.

A short run (6 steps, no DeepSpeed, ~3 minutes on 2 cores) in SmolLM2's own ChatML template:
the loss falls, the tuned model ends its answers at `<|im_end|>` at least as often as the base
model, and a plain transformers `pipeline("text-generation", model=dir)` given chat messages
answers exactly as the run's evaluation did and stops by itself, with no code of ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, card_components, flow_env, metaflow_runner, write_jsonl

# ~2.5 min alone on 2 cores, up to 8 with the other test worker and other work on the machine: the
# run and the test that starts it are bounded like the default run (tests/test_default_run.py).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
MAX_NEW_TOKENS = 48
INSTRUCTIONS = [
    {"instruction": "What is a random forest?"},
    {"instruction": "Name three primary colors."},
    {"instruction": "Who wrote Romeo and Juliet?"},
    {"instruction": "Summarize the text in one sentence.", "context": "The Nile is the longest river in Africa."},
]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("chat-flow")
    config = json.loads((REPO / "flows" / "configs" / "local-cpu.json").read_text())
    config["name"] = "bundled-chat-test"
    config["deepspeed_config"] = ""
    config["model_root"] = str(home / "models")
    config["training"].update(max_steps=6, batch_size=4, eval_batch_size=8, sample_fraction=0.25,
                              eval_max_new_tokens=MAX_NEW_TOKENS, prompt_format="chat")
    (home / "config.json").write_text(json.dumps(config))
    instructions = write_jsonl(home / "instructions.jsonl", INSTRUCTIONS)
    with metaflow_runner(str(REPO / "flows" / "dolly_flow.py"), show_output=False, env=flow_env(home), cwd=str(home),
                         config=[("config", str(home / "config.json"))],
                         timeout=1500).run(eval_instructions=str(instructions)) as running:
        assert running.status == "successful", running.stdout[-5000:] + running.stderr[-5000:]
        return running.run


def test_chat_run_learns_and_stops_at_the_end_of_turn(chat_run):
    metrics = chat_run.data.training_metrics
    assert (metrics["prompt_format"], metrics["end_marker"]) == ("chat", "<|im_end|>")
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"], metrics
    assert metrics["ended_share_final"] >= metrics["ended_share_base"], metrics
    assert chat_run["start"].task.data.config["training"]["prompt_format"] == "chat"

    from metaflow.cards import get_cards

    (summary,) = get_cards(chat_run["end"].task, id="summary")
    text = json.dumps(card_components(summary.get()))
    assert "chat: the model's own chat template, answers end at <|im_end|>" in text
    assert "Answers ending at <|im_end|>" in text


def test_a_plain_pipeline_answers_chat_messages_and_stops_by_itself(chat_run):
    from transformers import pipeline

    from training.chat import instruction_messages

    context = {row["instruction"]: row.get("context", "") for row in INSTRUCTIONS}
    location = Path(chat_run.data.model_location)
    final = chat_run["train"].task.data.evaluation[-1]
    ended = [a for a in final["answers"] if a["ended"]]
    assert ended, final
    chat = pipeline("text-generation", model=str(location))
    tokenizer = chat.tokenizer
    for answer in ended:
        # The user turn as the evaluation wrote it: the instruction, then its context.
        messages = instruction_messages(answer["instruction"], context[answer["instruction"]])
        reply = chat(messages, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0]["generated_text"][-1]
        assert reply["role"] == "assistant"
        # Greedy, as the evaluation (the pipeline samples by default): the same answer, and it stopped
        # at <|im_end|> by itself (generation_config.json's eos_token_id), short of the token limit.
        assert reply["content"].strip() == answer["response"], (reply, answer)
        assert len(tokenizer(reply["content"], add_special_tokens=False)["input_ids"]) < MAX_NEW_TOKENS
