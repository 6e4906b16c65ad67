"""A bounded time series: full resolution for recent samples, uniform buckets for older ones.

A profile of a 30-hour run sampled every second on 8 GPUs is 108,000 samples per GPU. Keeping
them all would grow the sampler's memory and the `gpu_profile_data` artifact without bound, so
each series keeps at most `max_points` points:

- the newest `max_points // 2` samples at full resolution (the last ~17 minutes at 1 s and the
  default 2048 points), because that is what a person watching a live card looks at;
- everything older in at most `max_points - max_points // 2` buckets of equal width (a bucket
  is `width` consecutive samples; when the buckets run out, adjacent pairs merge and `width`
  doubles), so the whole run stays visible at uniform resolution.

Merging averages a column, or keeps its maximum for "peak" columns such as memory used (an OOM
happens at the peak, so a chart must not average it away). Every column also keeps its exact
whole-run maximum and mean, which downsampling cannot blur; summaries read those.

    >>> s = Series(("util", "mem"), max_points=4, peak_columns=("mem",))
    >>> for t in range(6):
    ...     s.append(float(t), {"util": 10.0 * t, "mem": 100.0 + t})
    >>> s.to_dict()["t"]          # two buckets of two old samples, then the two newest samples
    [0.0, 2.0, 4.0, 5.0]
    >>> s.to_dict()["mem"]        # peak column: each bucket keeps its maximum
    [101.0, 103.0, 104.0, 105.0]
    >>> s.stats()["util"]         # exact over all six samples
    {'max': 50.0, 'mean': 25.0}
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

# A point is [t, n, value per column]: n counts the raw samples merged into it.
_T, _N, _FIRST_VALUE = 0, 1, 2


class Series:
    """Bounded multi-column time series sharing one time axis; see the module docstring.

    Values may be None (a field that was not read in that sample); they are skipped by
    averages and maxima.
    """

    def __init__(
        self, columns: Iterable[str], max_points: int = 2048, peak_columns: Iterable[str] = ()
    ):
        self.columns = tuple(columns)
        if max_points < 4:
            # Two recent points and two buckets is the least that still shows a trend.
            raise ValueError(f"Series max_points must be at least 4, got {max_points}")
        unknown = set(peak_columns) - set(self.columns)
        if unknown:
            raise ValueError(f"Series peak_columns {sorted(unknown)} are not among the columns")
        self.max_points = max_points
        self._recent_capacity = max_points // 2
        self._bucket_capacity = max_points - self._recent_capacity
        self._is_peak = [c in set(peak_columns) for c in self.columns]
        self._recent: deque[list] = deque()
        self._buckets: list[list] = []
        self._width = 1  # raw samples per closed bucket
        self.samples = 0
        self._max: list[float | None] = [None] * len(self.columns)
        self._sum = [0.0] * len(self.columns)
        self._count = [0] * len(self.columns)

    def __len__(self) -> int:
        return len(self._buckets) + len(self._recent)

    def append(self, t: float, values: Mapping[str, float | None]) -> None:
        """Add one sample taken at time `t`; columns missing from `values` count as None."""
        point = [t, 1, *(values.get(c) for c in self.columns)]
        for i, v in enumerate(point[_FIRST_VALUE:]):
            if v is not None:
                self._sum[i] += v
                self._count[i] += 1
                if self._max[i] is None or v > self._max[i]:
                    self._max[i] = v
        self.samples += 1
        self._recent.append(point)
        if len(self._recent) > self._recent_capacity:
            self._add_to_buckets(self._recent.popleft())

    def _add_to_buckets(self, point: list) -> None:
        # The last bucket is still open while it holds fewer than `width` samples.
        if self._buckets and self._buckets[-1][_N] < self._width:
            self._buckets[-1] = self._merge(self._buckets[-1], point)
        else:
            self._buckets.append(point)
        if len(self._buckets) > self._bucket_capacity:
            self._buckets = [
                self._merge(*self._buckets[i : i + 2]) if i + 1 < len(self._buckets)
                else self._buckets[i]
                for i in range(0, len(self._buckets), 2)
            ]
            self._width *= 2

    def _merge(self, a: list, b: list) -> list:
        # Keep the earlier time so the first point of the run never moves.
        merged = [a[_T], a[_N] + b[_N]]
        for i, (va, vb) in enumerate(zip(a[_FIRST_VALUE:], b[_FIRST_VALUE:], strict=True)):
            if va is None or vb is None:
                merged.append(vb if va is None else va)
            elif self._is_peak[i]:
                merged.append(max(va, vb))
            else:
                merged.append((va * a[_N] + vb * b[_N]) / (a[_N] + b[_N]))
        return merged

    def stats(self) -> dict[str, dict[str, float]]:
        """Exact whole-run max and mean per column that had at least one value."""
        return {
            c: {"max": self._max[i], "mean": self._sum[i] / self._count[i]}
            for i, c in enumerate(self.columns)
            if self._count[i]
        }

    def to_dict(self, decimals: int = 1) -> dict[str, list]:
        """Columns as JSON-ready lists: {"t": [...], column: [...]}, values rounded."""
        points = [*self._buckets, *self._recent]
        out: dict[str, list] = {"t": [round(p[_T], decimals) for p in points]}
        for i, c in enumerate(self.columns):
            out[c] = [
                None if p[_FIRST_VALUE + i] is None else round(p[_FIRST_VALUE + i], decimals)
                for p in points
            ]
        return out
