"""card_components(): the components a card gets, in order, for a GPU node and for no GPU."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pynvml
from fake_nvml import FakeClock, FakeNvml
from metaflow.cards import Image, Markdown, Table

from gpu_profile.render import card_components
from gpu_profile.sampler import GpuSampler


def kinds(components: list) -> list[str]:
    return [type(c).__name__ for c in components]


def rendered(component) -> dict:
    out = component.render()
    json.dumps(out)  # what the card template receives must serialize
    return out


def test_gpu_node_card(node, sampler, tick):
    node.gpus[0].processes = {4242: 1000.0}
    node.gpus[1].util = 80
    tick(5)
    node.lose(3)
    tick(2)
    components = card_components(sampler.snapshot())
    assert kinds(components) == [
        "Markdown",  # verdict
        "Table",  # status lines (GPU 3 lost): they name devices, so table cells (text)
        "Table",  # summary
        "Table",  # processes
        "Image", "Image", "Image", "Image",  # one utilization + memory chart per GPU
        "Markdown", "Table", "Markdown",  # topology heading, matrix, legend
        "Image",  # host CPU/RAM
    ]
    verdict_md, status, summary = components[:3]
    assert rendered(verdict_md)["source"].strip().startswith("**Lost GPU 3 at 6 s")
    assert rendered(status)["columns"] == ["Status"]
    assert any(row[0].startswith("GPU 3: NVIDIA A100-SXM4-80GB lost at 6 s") for row in rendered(status)["data"])
    table = rendered(summary)
    assert table["columns"][:4] == ["GPU", "Device", "Driver", "CUDA"]  # not swapped
    assert table["data"][1][:6] == ["1", "NVIDIA A100-SXM4-80GB", "550.54.15", "12.4", "80.0",
                                    "80.0"]
    assert table["data"][3][0] == "3 (lost)"
    assert table["data"][2][8] == "n/a"  # GPU 2 cannot report power
    topology = rendered(components[9])
    assert topology["columns"] == ["", "GPU0", "GPU1", "GPU2", "GPU3"]
    assert topology["data"][0] == ["GPU0", "X", "NV4", "SYS", "SYS"]
    legend = rendered(components[10])["source"]
    assert "**NV#**" in legend and "**SYS**" in legend and "**PIX**" not in legend
    for image in components[4:8] + components[11:]:
        assert rendered(image)["src"].startswith("data:image/png;base64,")
    assert plt.get_fignums() == []  # no figure left behind in pyplot


def test_no_gpu_card_is_the_reason_and_the_host_chart():
    s = GpuSampler(nvml=FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    s.sample_once()
    components = card_components(s.snapshot())
    assert [type(c) for c in components] == [Markdown, Image]
    assert rendered(components[0])["source"].strip().startswith(
        "**No NVIDIA GPU visible (NVML library not found (libnvidia-ml.so.1)")
    assert rendered(components[1])["src"].startswith("data:image/png;base64,")


def test_single_gpu_card_has_no_topology():
    s = GpuSampler(nvml=FakeNvml(1))
    s.sample_once()
    components = card_components(s.snapshot())
    assert [type(c) for c in components] == [Markdown, Table, Image, Image]


def test_card_of_an_empty_profile_renders():
    # The card is first drawn before the thread's first sample lands.
    components = card_components(GpuSampler(nvml=FakeNvml(2)).snapshot())
    assert sum(isinstance(c, Image) for c in components) == 3
    for c in components:
        rendered(c)


def test_device_and_process_names_are_shown_as_text():
    """NVML's device names and the names of processes on a GPU reach the card as table cells,
    never as live Markdown (tests/unit/test_card_escaping.py has the payload and the check)."""
    from tests.unit.test_card_escaping import HOSTILE, live_markup

    node, clock = FakeNvml(4, process_names={4242: HOSTILE}), FakeClock()
    for gpu in node.gpus:
        gpu.name = HOSTILE
    node.gpus[0].processes = {4242: 1000.0}
    s = GpuSampler(interval=1.0, nvml=node, clock=clock)
    for lose in (None, None, 3):
        if lose is not None:
            node.lose(lose)  # its status line names the device
        clock.now += 1
        node.advance(1)
        s.sample_once()
    components = card_components(s.snapshot())
    assert live_markup(components) == []
    status = rendered(components[1])
    assert any(row[0].startswith(f"GPU 3: {HOSTILE} lost at") for row in status["data"])
    assert [row[2] for row in rendered(components[3])["data"]] == [HOSTILE]  # the process
