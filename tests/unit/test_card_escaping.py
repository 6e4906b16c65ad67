"""No card shows user or data text as live Markdown/HTML: every card builder, fed a payload in every
field a user or a data set controls, puts it into table cells or into code spans/blocks.

Metaflow 2.19 renders a ``Markdown`` component's source as raw HTML (marked, no sanitizer), so the
check reads each Markdown source as marked would: what is left outside code blocks and code spans
must hold no tag, link or image. In headless Chromium: tests/test_sweep_flow.py
(``test_comparison_card_renders_in_a_real_browser``) and tests/test_optional_outputs_off.py
(``test_end_card_shows_a_hostile_data_set_name_as_text_in_a_browser``).
"""

from __future__ import annotations

import re
import sys
from typing import Any

from metaflow.cards import Markdown

from tests.conftest import REPO, walk_components

sys.path.insert(0, str(REPO / "flows"))  # the flow's own modules, as the flow imports them

from comparison_card import comparison_components, result_row  # noqa: E402
from summary_card import load_instructions, summary_components  # noqa: E402
from training_card import card_components as training_components  # noqa: E402
from training_card import preflight_components  # noqa: E402

from gpu_profile.render import code_block, code_span  # noqa: E402
from training.progress import progress_view  # noqa: E402

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=\"document.title='pwned'\">"
# Both tags, and each way out of what holds them: a backtick (a code span), a blank line (a
# paragraph), a fence (a code block), a link and an image.
HOSTILE = f"{SCRIPT} x` {IMG} `y\n\n{IMG}\n```\n[link](javascript:alert(1)) ![i](http://x/i.png) **b**"
LIVE = re.compile(r"<[A-Za-z!?/]|\]\(|onerror|javascript:")
# marked's rules: a fenced block ends at a line of at least its own fence; a code span at the next
# run of exactly as many backticks, within its paragraph.
FENCED = re.compile(r"^(`{3,})[^`\n]*\n.*?^\1`*[ \t]*$", re.S | re.M)
SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)


def rendered(components: list) -> list[dict]:
    """The dicts the card's JavaScript receives."""
    return [c.render() for c in components]


def live_markup(components: list) -> list[str]:
    """Tags, links and images that would be live in the Markdown components: none may be there."""
    found = []
    for node in walk_components(rendered(components)):
        if node.get("type") == "markdown":
            outside = SPAN.sub("", FENCED.sub("", node["source"]))
            found += [f"{match.group()!r} in {node['source']!r}" for match in LIVE.finditer(outside)]
    return found


def shown(components: list) -> str:
    """Every string of the card (table cells and headers, Markdown sources), one per line."""

    def strings(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
        return [text for value in values for text in strings(value)]

    return "\n".join(strings(rendered(components)))


def test_code_span_and_block_hold_anything_as_text():
    assert code_span("a  `b`\n\nc") == "`a \u02cbb\u02cb c`"  # no backtick, no line break to end it early
    assert code_span("") == "` `"
    assert code_block("x\n````\ny") == "`````\nx\n````\ny\n`````"  # longer than any run inside
    assert code_block("print(1)", "python") == "```python\nprint(1)\n```"
    assert live_markup([]) == []


def test_summary_card():
    config = {
        "base_model": HOSTILE, "dataset": HOSTILE, "preset": HOSTILE, "deepspeed_config": HOSTILE,
        "dataset_rows": {"train": 48, "eval": 16}, "resources": {"cpu": 2, "gpu": 0, "memory": 8192},
        "training": {"batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                     "prompt_format": "chat", "chat_template": HOSTILE},
    }
    components = summary_components(pathspec="DollyFlow/7", config=config, metrics=all_off_metrics(HOSTILE),
                                     evaluation=[], model_location=HOSTILE)
    assert live_markup(components) == []
    assert "data" + IMG in shown(summary_components(
        pathspec="DollyFlow/7", config={**config, "dataset": "data" + IMG}, metrics=all_off_metrics("### End"),
        evaluation=[], model_location="/m"))
    # The command a user copies: the location quoted for the shell, inside code blocks.
    assert "--model '/models/my model'" in load_instructions("/models/my model", "DollyFlow/7")
    assert live_markup([Markdown(load_instructions(HOSTILE, "DollyFlow/7"))]) == []


def test_summary_card_without_answers_checkpoints_or_merge_says_n_a():
    config = {"base_model": "m", "dataset": "d", "preset": "p", "deepspeed_config": "", "dataset_rows": {},
              "resources": {"cpu": 2, "gpu": 0, "memory": 8192},
              "training": {"batch_size": 4, "learning_rate": 1e-3}}
    components = rendered(summary_components(pathspec="DollyFlow/7", config=config, metrics=all_off_metrics("### End"),
                                             evaluation=[], model_location="/m"))
    cells = {row[0]: row[1] for node in walk_components(components) if node.get("type") == "table"
             for row in node["data"]}
    assert cells["Answers ending at ### End"] == "n/a" and cells["Mean answer tokens"] == "n/a"
    assert cells["DeepSpeed"] == "off" and "adapter only" in cells["Method"]


def all_off_metrics(end_marker: str) -> dict[str, Any]:
    """metrics.json of a LoRA run without merge, evaluation answers or checkpoints."""
    return {
        "world_size": 1, "train_rows": 48, "eval_rows": 16, "dropped_long_rows": 0, "skipped_bad_rows": 0,
        "dataset_fingerprint": "0123456789abcdef", "precision": "fp32", "global_step": 2, "epochs": 0.17,
        "end_marker": end_marker, "eval_loss_before": 6.0, "eval_loss_after": 5.9, "perplexity_before": 403.4,
        "perplexity_after": 365.0, "ended_share_base": None, "ended_share_final": None, "tokens_per_second": 900.0,
        "tokens_per_second_overall": 700.0, "tokens": 4000, "train_runtime_s": 4.0, "total_runtime_s": 20.0,
        "peft": "lora", "lora": {"r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": "all-linear",
                                 "merged": False},
        "trainable_parameters": 10_000, "parameters": 100_000, "adapter_bytes": 50_000, "checkpoint_bytes": None,
    }


def test_comparison_card():
    point = {"index": 0, "name": HOSTILE, "settings": {"chat_template": HOSTILE}}
    metrics = {"eval_loss_before": 6.0, "eval_loss_after": 5.0, "ended_share_base": 0.0, "ended_share_final": 0.5,
               "end_marker": HOSTILE, "tokens_per_second": 900.0, "eval_loss_history": [[0, 6.0], [2, 5.0]]}
    rows = [
        result_row(point, metrics=metrics, error=None, wall_s=10.0, gpus=0, model_location=HOSTILE),
        result_row({**point, "index": 1}, metrics=None, error=HOSTILE, wall_s=3.0, gpus=0, model_location=None),
    ]
    answers = {0: [{"instruction": HOSTILE, "response": HOSTILE, "ended": False}]}
    components = comparison_components(rows, rows[0], "eval_loss", answers)
    assert live_markup(components) == []
    # The instruction heads its answers' table.
    tables = [c for c in rendered(components) if c["type"] == "table"]
    assert tables[-1]["columns"] == ["Point", f"1. {HOSTILE}"]


def test_training_card_and_its_preflight():
    point = {"label": "base", "global_step": 0, "ended_share": 0.0, "mean_new_tokens": 8.0, "end_marker": HOSTILE,
             "answers": [{"instruction": HOSTILE, "response": HOSTILE, "ended": False, "new_tokens": 8}]}
    view = progress_view([{"event": "begin", "time": 0.0, "max_steps": 2, "epochs": 1.0, "start_step": 0,
                           "world_size": 1}, {"event": "evaluation", "time": 1.0, **point}], now=2.0)
    components = training_components(view, failed="TrainerFailed")
    assert live_markup(components) == []
    (evaluation,) = [c["source"] for c in rendered(components)
                     if c["type"] == "markdown" and "## Evaluation" in c["source"]]
    assert f"[no {code_span(HOSTILE)}]" in evaluation

    record = {
        "facts": {"gpus": [{"name": HOSTILE, "total_memory_bytes": 80 * 1024**3}], "gpus_requested": 1,
                  "driver_version": HOSTILE, "driver_cuda": [12, 4], "torch_version": HOSTILE, "torch_cuda": HOSTILE,
                  "nccl_version": [2, 21, 5], "shm_bytes": 2**30, "disk_free_bytes": 2**40},
        "memory_estimate": {"per_gpu": 2**33}, "checkpoint_disk_bytes": 2**31,
        "findings": [{"severity": "error", "code": "gpu-count", "message": HOSTILE}],
    }
    components = preflight_components(record)
    assert live_markup(components) == []
    findings = [c for c in rendered(components) if c["type"] == "table"][0]
    assert findings["data"] == [["error", "gpu-count", HOSTILE]]


def test_comparison_chart_draws_a_point_name_holding_dollar_signs_as_text():
    import io

    from comparison_card import eval_loss_figure

    name = r"chat_template=/tmp/$\undefinedcommand{$.jinja"  # mathtext would refuse to parse it
    figure = eval_loss_figure([{"point": 0, "name": name, "eval_loss_history": [[0, 6.0], [2, 5.0]]}])
    figure.savefig(io.BytesIO(), format="png")  # the legend is laid out and drawn here
    assert figure.axes[0].get_legend().get_texts()[0].get_text() == "1: " + name.replace("$", r"\$")
