"""Intervals and paired tests for top-1 accuracy: how sure a measured accuracy is, and
whether two models on the same test images differ by more than chance.

* :func:`wilson_interval`: Wilson score interval for ``k`` correct out of ``n`` (a binomial
  proportion). Unlike the normal ("Wald") interval it stays inside [0, 1] and keeps close to
  its nominal coverage near 0 or 1 and for small ``n``.
* :func:`bootstrap_interval`: percentile bootstrap interval of the mean of per-image values
  (e.g. 0/1 correctness), seeded, so the same call gives the same interval.
* :func:`mcnemar`: McNemar's test from the two discordant counts of a paired 2x2 table;
  :func:`mcnemar_paired` builds that table from two per-image correctness vectors.
* :func:`top1_record`: ``{top1, ci_low, ci_high, n, method, confidence}`` for a correctness
  vector (the shape metrics and reports store beside every top-1).

Plain ``math`` / ``numpy``: no scipy needed.
"""

from __future__ import annotations

import math
import statistics
from statistics import NormalDist
from typing import Any

import numpy as np

EXACT_BELOW = 25  # discordant pairs below which McNemar's chi-squared approximation is poor
METHODS = ("wilson", "bootstrap")


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(k: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials.

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = k/n`` and ``z`` the
    two-sided normal quantile of ``confidence``. ``n = 0`` gives the uninformative (0, 1).
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # k = 0 / k = n: the bound is exactly 0 / 1; clamp float round-off
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def _as_vector(values: Any, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one value per image (1-D), got shape {a.shape}")
    return a


def bootstrap_interval(
    values: Any, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one number per image).

    ``resamples`` resamples of ``len(values)`` images drawn with replacement from a
    ``numpy`` generator seeded with ``seed``; the interval is the (1-c)/2 and (1+c)/2
    percentiles of their means (linear interpolation).
    """
    x = _as_vector(values, "values").astype(np.float64)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    _z(confidence)  # validates confidence
    if len(x) == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // len(x))  # bound the index matrix's memory
    for s in range(0, resamples, chunk):
        m = min(chunk, resamples - s)
        means[s : s + m] = x[rng.integers(0, len(x), size=(m, len(x)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def _binom_two_sided(k: int, n: int, *, mid_p: bool = False) -> float:
    """Two-sided exact p-value of ``k`` successes out of ``n`` under Binomial(n, 1/2).

    ``2 · P(X <= min(k, n-k))`` capped at 1; with ``mid_p``, ``2 · (P(X < m) + P(X = m) / 2)``
    (Lancaster's mid-p, less conservative than the exact test). Exact integer arithmetic.
    """
    if n == 0:
        return 1.0
    m = min(k, n - k)
    below = sum(math.comb(n, i) for i in range(m))  # P(X < m) * 2^n
    at = math.comb(n, m)
    if mid_p:
        return min(1.0, (2 * below + at) / 2**n)
    return min(1.0, 2 * (below + at) / 2**n)


def mcnemar(b: int, c: int, *, exact: bool | None = None, mid_p: bool = False) -> dict:
    """McNemar's test from the discordant counts of a paired 2x2 table.

    ``b``: images model A gets right and model B wrong; ``c``: the reverse. ``exact``: None
    picks the exact two-sided binomial test (p = 1/2 on the ``b + c`` discordant images) when
    ``b + c < EXACT_BELOW``, else chi-squared with Yates' continuity correction (1 degree of
    freedom), ``(|b - c| - 1)^2 / (b + c)`` with ``|b - c| - 1`` floored at 0 (equal
    discordant counts give p = 1). ``mid_p``: the exact test's mid-p variant (only on the
    exact path). Returns the counts, the method, the statistic and the p-value.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    use_exact = n < EXACT_BELOW if exact is None else exact
    if use_exact:
        return {
            "b": b,
            "c": c,
            "method": "exact_binomial_mid_p" if mid_p else "exact_binomial",
            "statistic": float(min(b, c)),
            "p_value": _binom_two_sided(min(b, c), n, mid_p=mid_p),
        }
    stat = 0.0 if n == 0 else max(abs(b - c) - 1, 0) ** 2 / n
    # chi-squared with 1 degree of freedom: P(X > s) = erfc(sqrt(s / 2))
    return {
        "b": b,
        "c": c,
        "method": "chi2_continuity_corrected",
        "statistic": stat,
        "p_value": math.erfc(math.sqrt(stat / 2)),
    }


def _bool_vector(values: Any, name: str) -> np.ndarray:
    a = _as_vector(values, name)
    if a.dtype != np.bool_:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1 (one per image: was the model right?)")
        a = a.astype(bool)
    return a


def correct_vector(logits: Any, labels: Any) -> np.ndarray:
    """Per-image correctness (bool ``[N]``) of ``[N, C]`` scores against ``[N]`` labels."""
    scores, y = np.asarray(logits), _as_vector(labels, "labels")
    if scores.ndim != 2 or scores.shape[0] != y.shape[0]:
        raise ValueError(f"shape mismatch: logits {scores.shape}, labels {y.shape}")
    return scores.argmax(axis=1) == y


def mcnemar_paired(correct_a: Any, correct_b: Any, *, exact: bool | None = None, mid_p: bool = False) -> dict:
    """McNemar's test between two models' correctness on the same images, in the same order.

    Returns :func:`mcnemar`'s record plus ``n``, both accuracies, their difference
    (``top1_a - top1_b``) and the full 2x2 table. ``b`` counts images only A gets right.
    """
    a, b_ = _bool_vector(correct_a, "correct_a"), _bool_vector(correct_b, "correct_b")
    if a.shape != b_.shape:
        raise ValueError(f"paired vectors must have the same length (same test images), got {len(a)} and {len(b_)}")
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    n = int(len(a))
    rec = mcnemar(b, c, exact=exact, mid_p=mid_p)
    ta, tb = (float(a.mean()), float(b_.mean())) if n else (float("nan"), float("nan"))
    return rec | {
        "n": n,
        "top1_a": ta,
        "top1_b": tb,
        "difference": ta - tb,
        "table": {"both_right": int((a & b_).sum()), "a_only": b, "b_only": c, "both_wrong": int((~a & ~b_).sum())},
    }


def counts_record(k: int, n: int, *, confidence: float = 0.95) -> dict:
    """``{top1, ci_low, ci_high, n, method, confidence}`` from counts (Wilson interval)."""
    low, high = wilson_interval(k, n, confidence=confidence)
    return {
        "top1": k / n if n else None,
        "ci_low": low,
        "ci_high": high,
        "n": n,
        "method": "wilson",
        "confidence": confidence,
    }


def top1_record(
    correct: Any, *, method: str = "wilson", confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict:
    """Top-1 with its interval from a per-image correctness vector (bools or 0/1).

    ``method``: 'wilson' (default; no randomness) or 'bootstrap' (percentile, ``resamples``
    resamples seeded with ``seed``). Returns ``{top1, ci_low, ci_high, n, method, confidence}``.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not valid; choose from {', '.join(METHODS)}")
    x = _bool_vector(correct, "correct")
    if method == "wilson":
        return counts_record(int(x.sum()), int(len(x)), confidence=confidence)
    low, high = bootstrap_interval(x, confidence=confidence, resamples=resamples, seed=seed)
    return {
        "top1": float(x.mean()),
        "ci_low": low,
        "ci_high": high,
        "n": int(len(x)),
        "method": "bootstrap",
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
    }


def mcnemar_pooled(tables: Any, *, exact: bool | None = None, mid_p: bool = False) -> dict:
    """McNemar's test on discordant counts summed over strata (e.g. seeds): ``[(b, c), ...]``.

    The Mantel-Haenszel form of McNemar's test for stratified matched pairs: the same test
    on ``sum(b), sum(c)``. Each stratum is one seed's pair of models on the same test images;
    the record keeps the per-stratum counts and their signs, so a reader sees whether every
    seed points the same way.
    """
    pairs = [(int(b), int(c)) for b, c in tables]
    if not pairs:
        raise ValueError("mcnemar_pooled needs at least one (b, c) table")
    rec = mcnemar(sum(b for b, _ in pairs), sum(c for _, c in pairs), exact=exact, mid_p=mid_p)
    return rec | {
        "strata": [{"b": b, "c": c} for b, c in pairs],
        "strata_a_better": sum(b > c for b, c in pairs),
        "strata_b_better": sum(c > b for b, c in pairs),
    }


def paired_difference_interval(
    correct_a: Any,
    correct_b: Any,
    *,
    confidence: float = 0.95,
    method: str = "wald",
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Interval for ``top1_a - top1_b`` of two models on the same images.

    'wald': ``d ± z · sqrt(b + c - (b - c)² / n) / n`` (the paired-proportions normal
    interval, ``b``/``c`` the discordant counts); 'bootstrap': percentile bootstrap over
    images (seeded). Returns ``{difference, ci_low, ci_high, n, method, confidence}``.
    """
    a, b_ = _bool_vector(correct_a, "correct_a"), _bool_vector(correct_b, "correct_b")
    if a.shape != b_.shape or len(a) == 0:
        raise ValueError(f"paired vectors must be non-empty and of the same length, got {len(a)} and {len(b_)}")
    n = len(a)
    d = float(a.mean() - b_.mean())
    if method == "wald":
        b, c = int((a & ~b_).sum()), int((~a & b_).sum())
        half = _z(confidence) * math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
        low, high = d - half, d + half
    elif method == "bootstrap":
        low, high = bootstrap_interval(
            a.astype(np.int8) - b_.astype(np.int8), confidence=confidence, resamples=resamples, seed=seed
        )
    else:
        raise ValueError(f"method {method!r} is not valid; choose 'wald' or 'bootstrap'")
    return {"difference": d, "ci_low": low, "ci_high": high, "n": n, "method": method, "confidence": confidence}


def holm(p_values: Any) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given): for a family of comparisons
    decided together, e.g. P->Q->D against each single technique."""
    ps = [float(p) for p in p_values]
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def _midranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman rank correlation (ties share their mean rank); None for fewer than 3 pairs or a constant side."""
    if len(xs) < 3:
        return None
    rx, ry = _midranks(xs), _midranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else None
