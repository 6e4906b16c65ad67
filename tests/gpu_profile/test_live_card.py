"""How often live cards redraw: spaced by the CPUs a step may use, or as the user sets it."""

from __future__ import annotations

import pytest

from gpu_profile import live_card
from gpu_profile.live_card import refresh_interval_s, usable_cpus


@pytest.mark.parametrize(("cpus", "seconds"), [(1, 120), (2, 60), (8, 15), (24, 5), (96, 5)])
def test_redraws_are_spaced_by_the_cpus(monkeypatch, cpus, seconds):
    monkeypatch.delenv(live_card.ENV, raising=False)
    assert refresh_interval_s(cpus) == seconds


def test_the_user_sets_the_interval_and_a_bad_setting_names_the_fix(monkeypatch):
    monkeypatch.setenv(live_card.ENV, "7.5")
    assert refresh_interval_s(2) == 7.5
    for bad in ("2", "soon", "-5"):
        monkeypatch.setenv(live_card.ENV, bad)
        with pytest.raises(ValueError, match=rf"DOLLY_CARD_REFRESH_S='{bad}': must be a number of seconds >= 5"):
            refresh_interval_s(2)


def test_usable_cpus_follow_affinity_and_a_cgroup_quota(monkeypatch, tmp_path):
    import os
    from pathlib import Path

    affinity = len(os.sched_getaffinity(0))
    real_path = Path

    def fake_path(text):  # only the cgroup file is redirected
        return real_path(tmp_path / "cpu.max") if text == "/sys/fs/cgroup/cpu.max" else real_path(text)

    monkeypatch.setattr(live_card, "Path", fake_path)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus() == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # a limit of half a CPU: counted as 1
    assert usable_cpus() == 1.0
    (tmp_path / "cpu.max").write_text(f"{100000 * (affinity + 4)} 100000\n")  # a limit above the cores
    assert usable_cpus() == affinity
