"""The trainer's metrics stream: reading it as it grows, and what the card derives from it."""

from __future__ import annotations

import json

import pytest

from training.progress import ProgressReader, ProgressWriter, progress_view


def events_of_a_run(steps: int = 10, tokens_per_step: int = 100, step_s: float = 0.5) -> list[dict]:
    events = [{"event": "begin", "time": 1000.0, "max_steps": 40, "epochs": 2.0, "start_step": 0, "world_size": 2}]
    for step in range(1, steps + 1):
        t = 1000.0 + step
        events.append({"event": "step", "time": t, "step": step, "epoch": step / 20, "tokens": step * tokens_per_step,
                       "step_s": step_s})
        events.append({"event": "log", "time": t, "step": step, "epoch": step / 20, "loss": 3.0 - step / 10,
                       "learning_rate": 1e-4, "grad_norm": 1.5})
    events.append({"event": "eval", "time": 1000.0 + steps, "step": steps, "epoch": steps / 20, "eval_loss": 2.0})
    return events


def test_view_has_curves_progress_eta_and_throughput():
    view = progress_view(events_of_a_run(), now=1010.0)
    assert view["status"] == "training"
    assert (view["step"], view["max_steps"], view["world_size"]) == (10, 40, 2)
    assert view["elapsed_s"] == pytest.approx(10.0)
    # 10 steps in 10 s, 30 to go
    assert view["eta_s"] == pytest.approx(30.0)
    assert [s for s, _ in view["loss"]] == list(range(1, 11))
    assert view["eval_loss"] == [(10, 2.0)]
    # 100 tokens per 0.5 s step, whatever the wall clock did between steps
    assert view["tokens_per_second"] and all(v == pytest.approx(200.0) for _, v in view["tokens_per_second"])


def test_finished_stream_has_no_eta_and_stops_the_clock():
    events = events_of_a_run() + [{"event": "end", "time": 1012.0, "step": 10, "status": "done"}]
    view = progress_view(events, now=5000.0)
    assert view["status"] == "done" and view["eta_s"] is None and view["elapsed_s"] == pytest.approx(12.0)


def test_resumed_stream_skips_the_first_step_of_throughput_and_keeps_restored_curves():
    events = [{"event": "begin", "time": 0.0, "max_steps": 20, "epochs": 1.0, "start_step": 10, "world_size": 1},
              {"event": "log", "time": 0.0, "step": 5, "epoch": 0.25, "loss": 2.5, "learning_rate": 1e-4,
               "grad_norm": 1.0, "restored": True}]
    events += [{"event": "step", "time": float(s), "step": 10 + s, "epoch": 0.5, "tokens": 5000 + 50 * s,
                "step_s": 1.0} for s in range(1, 7)]
    view = progress_view(events, now=6.0)
    assert view["loss"] == [(5, 2.5)]
    # 6 step events after a restored token count of 5000: 5 deltas of 50 tokens in 1 s each
    assert view["tokens_per_second"] == [(16, 50.0)]
    assert view["eta_s"] == pytest.approx(6.0 / 6 * 4)


def test_non_finite_gradient_norms_are_left_out_of_the_chart():
    events = events_of_a_run(steps=2)
    events[2]["grad_norm"] = float("inf")
    assert progress_view(events)["grad_norm"] == [(2, 1.5)]


def test_reader_waits_for_half_written_lines_and_notices_a_new_attempt(tmp_path):
    path = tmp_path / "progress.jsonl"
    reader = ProgressReader(path)
    assert reader.poll() is False  # no file yet
    writer = ProgressWriter(path)
    writer.write("begin", max_steps=4, epochs=1.0, start_step=0, world_size=1)
    with path.open("a") as f:
        f.write('{"event": "step", "step": 1, "epo')  # the trainer is mid-write
    assert reader.poll() is True and [e["event"] for e in reader.events] == ["begin"]
    with path.open("a") as f:
        f.write('ch": 0.25, "tokens": 10, "step_s": 0.1, "time": 1.0}\n')
    assert reader.poll() is True and [e["event"] for e in reader.events] == ["begin", "step"]
    assert reader.poll() is False
    writer.close()
    # A retried attempt rewrites the stream: the reader starts over instead of mixing the two.
    path.unlink()
    again = ProgressWriter(path)
    again.write("begin", max_steps=4, epochs=1.0, start_step=2, world_size=1)
    again.close()
    assert reader.poll() is True
    assert [e["event"] for e in reader.events] == ["begin"] and reader.events[0]["start_step"] == 2


def test_writer_lines_are_json(tmp_path):
    writer = ProgressWriter(tmp_path / "logs" / "progress.jsonl")
    writer.write("log", step=1, loss=1.25)
    writer.close()
    (line,) = (tmp_path / "logs" / "progress.jsonl").read_text().splitlines()
    assert json.loads(line)["loss"] == 1.25
