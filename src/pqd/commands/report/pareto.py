"""Pareto dominance over several objectives (pure functions, no dependencies)."""

from __future__ import annotations

import math
from collections.abc import Sequence

SENSES = ("max", "min")


def _check(points: Sequence[Sequence[float]], senses: Sequence[str]) -> None:
    for s in senses:
        if s not in SENSES:
            raise ValueError(f"sense {s!r} is not valid; use 'max' or 'min'")
    for i, p in enumerate(points):
        if len(p) != len(senses):
            raise ValueError(f"point {i} has {len(p)} values but {len(senses)} senses were given")
        if any(v is None or not math.isfinite(v) for v in p):
            raise ValueError(f"point {i} {tuple(p)} has a missing or non-finite value")


def dominates(a: Sequence[float], b: Sequence[float], senses: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and strictly better in one."""
    better = False
    for x, y, s in zip(a, b, senses, strict=True):
        if s == "min":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(points: Sequence[Sequence[float]], senses: Sequence[str]) -> list[int]:
    """Indices (ascending) of the non-dominated points.

    ``senses[k]`` is 'max' or 'min' for objective ``k``; e.g. accuracy↑, size↓, latency↓ is
    ``("max", "min", "min")``. Equal points do not dominate each other, so duplicates of a
    frontier point are all on the frontier.
    """
    _check(points, senses)
    return [i for i, p in enumerate(points) if not any(dominates(q, p, senses) for j, q in enumerate(points) if j != i)]


def dominators(points: Sequence[Sequence[float]], senses: Sequence[str]) -> dict[int, list[int]]:
    """For every dominated point, the indices of the points that dominate it."""
    _check(points, senses)
    out = {}
    for i, p in enumerate(points):
        by = [j for j, q in enumerate(points) if j != i and dominates(q, p, senses)]
        if by:
            out[i] = by
    return out
