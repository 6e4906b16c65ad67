"""The bounded series: at most max_points, whole span kept, recent samples exact, stats exact."""

from __future__ import annotations

import doctest

import pytest

from gpu_profile import nvml_errors, series
from gpu_profile.series import Series


def test_docstring_examples_hold():
    for module in (series, nvml_errors):
        assert doctest.testmod(module).failed == 0


def fill(n: int, max_points: int = 64) -> Series:
    s = Series(("util", "mem"), max_points=max_points, peak_columns=("mem",))
    for i in range(n):
        # util cycles 0..9 so bucket means are easy to check; mem rises so peaks are the last.
        s.append(float(i), {"util": float(i % 10), "mem": float(i)})
    return s


def test_short_series_is_kept_exactly():
    d = fill(30).to_dict()
    assert d["t"] == [float(i) for i in range(30)]
    assert d["util"] == [float(i % 10) for i in range(30)]


@pytest.mark.parametrize("n", [65, 100, 1000, 12345])
def test_bounded_with_whole_span_and_recent_samples_exact(n):
    s = fill(n, max_points=64)
    d = s.to_dict()
    assert len(s) == len(d["t"]) <= 64
    assert d["t"][0] == 0.0 and d["t"][-1] == float(n - 1)
    assert d["t"] == sorted(d["t"])
    # The newest max_points // 2 samples are untouched.
    assert d["t"][-32:] == [float(i) for i in range(n - 32, n)]
    assert d["util"][-32:] == [float(i % 10) for i in range(n - 32, n)]


def test_older_points_are_uniform_buckets_with_true_means_and_peaks():
    s = fill(1000, max_points=64)
    d = s.to_dict()
    old_t = d["t"][:-32]
    widths = {b - a for a, b in zip(old_t, old_t[1:], strict=False)}
    assert len(widths) == 1  # uniform resolution over the older part of the run
    width = int(widths.pop())
    assert width in (16, 32, 64)  # 968 old samples in at most 32 buckets
    for k, start in enumerate(old_t[:-1]):  # the last bucket may still be filling
        raw = range(int(start), int(start) + width)
        assert d["util"][k] == pytest.approx(round(sum(i % 10 for i in raw) / width, 1))
        assert d["mem"][k] == float(raw[-1])  # peak column keeps the maximum


def test_stats_are_exact_over_all_samples():
    stats = fill(12345, max_points=64).stats()
    assert stats["mem"]["max"] == 12344.0
    assert stats["util"]["max"] == 9.0
    assert stats["util"]["mean"] == pytest.approx(sum(i % 10 for i in range(12345)) / 12345)


def test_missing_values_are_skipped_not_zeroed():
    s = Series(("a", "b"), max_points=4)
    for i in range(10):
        s.append(float(i), {"a": 10.0, "b": None if i % 2 else 4.0})
    d = s.to_dict()
    assert set(d["a"]) == {10.0}
    assert set(d["b"]) <= {4.0, None}
    assert s.stats()["b"] == {"max": 4.0, "mean": 4.0}
    assert "b" in s.stats() and Series(("x",)).stats() == {}


def test_invalid_arguments_name_the_problem():
    with pytest.raises(ValueError, match="max_points must be at least 4, got 2"):
        Series(("a",), max_points=2)
    with pytest.raises(ValueError, match=r"peak_columns \['z'\]"):
        Series(("a",), peak_columns=("z",))
