"""The points of a sweep: a grid from the config's ``sweep`` section or from ``--grid``.

Keys are the config's ``training`` keys (``learning_rate``, ``epochs``, ``batch_size``, ``peft``,
``prompt_format``, ``lora_r``, ...); a point sets some of them, the rest come from the preset and
the flow's parameters.

    "sweep": {"learning_rate": [1e-4, 5e-5], "epochs": [1, 2]}            4 points: the product
    "sweep": {"points": [{"learning_rate": 1e-4}, {"peft": "lora", "learning_rate": 1e-3}]}
    --grid "learning_rate=1e-4,5e-5 epochs=1,2"                           the same 4 points
    "sweep": {"max_points": 12, ...}                                      more than 8 points

    cd flows && python -c "from sweep_grid import parse_grid; print(parse_grid('epochs=1,2'))"
"""

from __future__ import annotations

import itertools
import json
from typing import Any

DEFAULT_MAX_POINTS = 8


class GridError(ValueError):
    """The grid cannot be expanded; the message names the problem and the fix."""


def _scalar(text: str) -> Any:
    """A grid value as JSON reads it (1e-4, 2, true), else the string itself (lora, chatml)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (int, float, bool, str)) else text


def parse_grid(text: str) -> dict[str, list[Any]]:
    """``"learning_rate=1e-4,5e-5 epochs=1,2"`` -> ``{"learning_rate": [0.0001, 5e-05], "epochs": [1, 2]}``."""
    grid: dict[str, list[Any]] = {}
    for part in text.split():
        key, sep, values = part.partition("=")
        if not sep or not key:
            raise GridError(f"--grid: {part!r} is not key=value[,value...]; "
                            "e.g. --grid \"learning_rate=1e-4,5e-5 epochs=1,2\".")
        if key in grid:
            raise GridError(f"--grid: {key} is given twice; list its values once: {key}=a,b.")
        items = [v for v in values.split(",") if v]
        if not items:
            raise GridError(f"--grid: {key} has no values; e.g. {key}=1,2.")
        grid[key] = [_scalar(v) for v in items]
    return grid


def expand(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The points of a ``sweep`` section (without ``max_points``): its explicit ``points``, or the
    product of its lists, in the order written."""
    if "points" in section:
        points = section["points"]
        extra = sorted(set(section) - {"points"})
        if extra:
            raise GridError(f"config sweep: 'points' lists the points itself; drop {', '.join(extra)} "
                            "or fold them into the points.")
        if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
            raise GridError("config sweep.points: must be a non-empty list of objects, e.g. "
                            '[{"learning_rate": 1e-4}, {"peft": "lora", "learning_rate": 1e-3}].')
        return [dict(p) for p in points]
    if not section:
        return []
    for key, values in section.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"config sweep.{key}: must be a non-empty list of values, got {values!r}.")
    keys = list(section)
    return [dict(zip(keys, combination, strict=True)) for combination in itertools.product(*(section[k] for k in keys))]


def sweep_points(section: dict[str, Any] | None, grid: str) -> tuple[list[dict[str, Any]], int]:
    """(the points, max_points): ``--grid`` when given (it replaces the config's grid), else the
    config's ``sweep`` section. Raises GridError naming the problem."""
    section = dict(section or {})
    max_points = section.pop("max_points", DEFAULT_MAX_POINTS)
    if not isinstance(max_points, int) or isinstance(max_points, bool) or max_points < 1:
        raise GridError(f"config sweep.max_points: must be a positive integer, got {max_points!r}.")
    points = expand(parse_grid(grid)) if grid.strip() else expand(section)
    if not points:
        raise GridError("No sweep points: pass --grid \"learning_rate=1e-4,5e-5\" "
                        "or add a \"sweep\" section to the config.")
    if len(points) > max_points:
        raise GridError(f"The grid has {len(points)} points, more than config sweep.max_points ({max_points}): "
                        "drop values, or raise max_points if every point is worth its GPUs.")
    duplicates = [point_name(p) for i, p in enumerate(points) if p in points[:i]]
    if duplicates:
        raise GridError(f"The grid repeats point(s) {', '.join(duplicates)}: each point must differ.")
    return points, max_points


def point_name(point: dict[str, Any]) -> str:
    """A short, readable name: ``learning_rate=0.0001 epochs=2`` (``defaults`` for an empty point)."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "defaults"
