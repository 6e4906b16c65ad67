"""@gpu_profile in real flow runs: the card, the artifacts, validation, and a real browser."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import (
    REPO,
    card_components,
    chromium_flags,
    component_types,
    needs_chromium,
    nvml_gpu_count,
    python_env,
    started,
    wait_for_exit,
)

ARTIFACTS = REPO / "test-artifacts"


def profile_card_html(task) -> str:
    from metaflow.cards import get_cards

    cards = get_cards(task, id="gpu_profile")
    assert len(cards) == 1
    return cards[0].get()


@pytest.fixture(scope="module")
def cpu_run(tiny_run):
    return tiny_run[0]


def test_cpu_node_card_shows_host_and_why_no_gpu(cpu_run):
    """The flow trained on the CPU; the profile shows what NVML sees on this machine: no GPU
    (and why) on a CPU machine, the machine's GPUs on a GPU machine (CUDA hidden or not)."""
    task = cpu_run["train"].task
    data = task.data.gpu_profile_data
    gpus = nvml_gpu_count()
    assert task.data.gpu_profile_num_gpus == data["num_gpus"] == gpus
    assert len(data["host"]["t"]) >= 2 and max(data["host"]["cpu_percent"]) > 0
    components = card_components(profile_card_html(task))
    text = json.dumps(components)
    assert component_types(components)["image"] == 1 + gpus  # the host CPU/RAM chart, one per GPU
    if not gpus:
        assert "No NVIDIA GPU visible" in text and "NVML" in text


def test_simulated_four_gpu_node_gets_one_chart_set_per_gpu(all_off_run):
    """The flow trained (2 steps, no answers: all the profile needs) with NVML answered by
    tests/gpu_profile/nvml_shim, a simulated 4-GPU node (`all_off_run` in tests/conftest.py)."""
    task = all_off_run[0]["train"].task
    data = task.data.gpu_profile_data
    assert task.data.gpu_profile_num_gpus == 4
    assert [d["name"] for d in data["devices"]] == ["NVIDIA A100-SXM4-80GB"] * 4
    assert all(len(g["t"]) >= 2 and max(g["util"]) == busy
               for g, busy in zip(data["gpus"], (97, 91, 12, 0), strict=True))
    # The shim's GPU 3 cannot report power (NVML_ERROR_NOT_SUPPORTED); every other query works.
    assert [g["unsupported"] for g in data["gpus"]] == [[], [], [], ["power_w"]]
    components = card_components(profile_card_html(task))
    text = json.dumps(components)
    assert component_types(components)["image"] == 4 + 1  # per GPU, plus the host
    assert "NV4" in text and "SYS" in text  # the topology table and its legend
    assert "NVIDIA A100-SXM4-80GB" in text


def test_bad_interval_fails_flow_validation_naming_decorator_and_step(tmp_path):
    flow = tmp_path / "bad_interval_flow.py"
    flow.write_text(
        "from metaflow import FlowSpec, step\n"
        "from gpu_profile import gpu_profile\n\n"
        "class BadIntervalFlow(FlowSpec):\n"
        "    @gpu_profile(interval=-1)\n"
        "    @step\n"
        "    def start(self):\n"
        "        self.next(self.end)\n\n"
        "    @step\n"
        "    def end(self):\n"
        "        pass\n\n"
        "if __name__ == '__main__':\n"
        "    BadIntervalFlow()\n"
    )
    result = subprocess.run([sys.executable, str(flow), "run"], cwd=tmp_path, env=python_env(),
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "@gpu_profile on step 'start': interval=-1" in output, output[-2000:]
    assert "Workflow starting" not in output  # refused before any task ran

    # A bad redraw setting is refused at the same moment, with the fix.
    fixed = flow.read_text().replace("interval=-1", "interval=1")
    flow.write_text(fixed)
    result = subprocess.run([sys.executable, str(flow), "run"], cwd=tmp_path,
                            env=python_env(DOLLY_CARD_REFRESH_S="1"), capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "DOLLY_CARD_REFRESH_S='1': must be a number of seconds >= 5" in output, output[-2000:]
    assert "Workflow starting" not in output


@needs_chromium
def test_card_renders_charts_in_a_real_browser(cpu_run, tmp_path):
    html = tmp_path / "gpu_profile_card.html"
    html.write_text(profile_card_html(cpu_run["train"].task))
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "gpu_profile_card.png"
    flags = chromium_flags(tmp_path / "chromium", (1200, 1400))
    dom = subprocess.run([*flags, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The card's own JavaScript turned the embedded JSON into elements: the chart is an <img>
    # with the PNG inline (no network), and the verdict text is on the page.
    gpus = nvml_gpu_count()
    assert len(re.findall(r"<img[^>]+src=\"data:image/png", dom.stdout)) == 1 + gpus
    assert ("No NVIDIA GPU visible" in dom.stdout) == (gpus == 0)
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)]
    assert console_errors == []
    shot = subprocess.run([*flags, f"--screenshot={screenshot}", html.as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert shot.returncode == 0 and screenshot.stat().st_size > 20_000  # a blank page is a few KB


def test_sigterm_stops_the_profiled_task_promptly(tmp_path):
    """A preempted pod gets SIGTERM: the sampler and card threads must not keep the task alive."""
    import signal
    import time

    pid_file = tmp_path / "task.pid"
    flow = tmp_path / "sigterm_flow.py"
    flow.write_text(
        "import os, time\n"
        "from metaflow import FlowSpec, step\n"
        "from gpu_profile import gpu_profile\n\n"
        "class SigtermFlow(FlowSpec):\n"
        "    @gpu_profile(interval=0.2)\n"
        "    @step\n"
        "    def start(self):\n"
        f"        open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "        time.sleep(120)\n"
        "        self.next(self.end)\n\n"
        "    @step\n"
        "    def end(self):\n"
        "        pass\n\n"
        "if __name__ == '__main__':\n"
        "    SigtermFlow()\n"
    )
    env = python_env(METAFLOW_DATASTORE_SYSROOT_LOCAL=str(tmp_path))
    log = tmp_path / "run.log"
    with started([sys.executable, str(flow), "run"], log, cwd=tmp_path, env=env) as run:
        deadline = time.monotonic() + 300
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pid_file.exists(), "the step never started"
        time.sleep(2)  # let the sampler and the card refresher run
        task_pid = int(pid_file.read_text())
        os.kill(task_pid, signal.SIGTERM)
        sent = time.monotonic()
        # 60 s: room for a slow machine, and still half the 120 s the step would sleep if a
        # sampler or card thread kept the task alive.
        while time.monotonic() - sent < 60:
            try:
                os.kill(task_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the task was still alive 60 s after SIGTERM")  # started() kills it
        code = wait_for_exit(run, log, timeout=120)
    output = log.read_text()
    assert code != 0
    # Metaflow saw that task fail (a step that slept on would have succeeded).
    assert re.search(rf"/start/1 \(pid {task_pid}\)\] Task failed\.", output), output[-3000:]
    assert "Step start (task-id 1) failed." in output
