"""Accuracy degradation profiles: does a model keep its accuracy on every part of the test set,
or only on average?

Definition (all functions here use it):

* The test set is taken **in its fixed order** (pqd's test splits are deterministic), N images.
* **Level** ``k = 0, 1, 2, ...`` cuts it into ``2**k`` contiguous, non-overlapping **slices** of
  ``n_k = N // 2**k`` images each: slice ``j`` is images ``[j * n_k, (j + 1) * n_k)`` (the last
  ``N - 2**k * n_k`` images are left out at that level). Level 0 is the whole test set. Levels
  stop before the slice size falls under ``min_slice`` (default 25 images), so the profile
  covers slices of 1, 1/2, 1/4, ... of the data down to about ``min_slice`` images.
* The **profile** of a model lists, per level, the fraction ``n_k / N``, the slice size, and
  the min / mean / max accuracy over the level's slices.
* The **degradation factor** ``DF = 1 - min_k(worst slice accuracy at level k) / accuracy on
  the whole set``: the largest relative accuracy loss on any contiguous slice of at least
  ``min_slice`` images (0 = every slice is as accurate as the whole set; 1 = some slice is
  entirely wrong). Smaller slices vary more by chance, so DF is only comparable between
  models evaluated on the same test set with the same ``min_slice``.
* **Paired comparison with the teacher** (:func:`compare_degradation`): for every slice of
  every level, the accuracy gap ``teacher - final`` on the same images, and McNemar's exact /
  continuity-corrected test (:func:`pqd.measure.faithfulness.mcnemar`) on that slice's
  discordant images. The worst slice is the one with the smallest p-value among slices where
  the final model is worse; its p-value is Bonferroni-adjusted by the number of slices tested.
* **Flag** (``slice_failure``): the final model *keeps the mean accuracy* (whole-set gap to
  the teacher <= ``mean_tol``, default 1 point) but is worse than the teacher on some slice
  with adjusted p < ``alpha`` (default 0.05) and a gap of at least ``slice_tol`` (default 5
  points). That is the model the mean hides.
"""

from __future__ import annotations

from typing import Any

import torch

from pqd.measure.faithfulness import mcnemar

__all__ = ["compare_degradation", "degradation_profile", "slice_bounds"]


def _correct(logits_or_pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    pred = logits_or_pred.argmax(1) if logits_or_pred.dim() == 2 else logits_or_pred
    return (pred.cpu() == labels.cpu()).to(torch.int64)


def slice_bounds(n: int, *, min_slice: int = 25) -> list[list[tuple[int, int]]]:
    """``[(start, end), ...]`` per level (see the module doc). Level 0 is always there."""
    if n < 1:
        raise ValueError("a degradation profile needs at least one test image")
    if min_slice < 1:
        raise ValueError(f"min_slice must be >= 1, got {min_slice}")
    levels, k = [], 0
    while True:
        size = n // 2**k
        if k > 0 and size < min_slice:
            break
        levels.append([(j * size, (j + 1) * size) for j in range(2**k)])
        k += 1
        if size <= 1:
            break
    return levels


def degradation_profile(logits: torch.Tensor, labels: torch.Tensor, *, min_slice: int = 25) -> dict[str, Any]:
    """Profile and degradation factor of one model (``logits`` ``[N, C]`` or predictions ``[N]``)."""
    return _profile(_correct(logits, labels), min_slice)


def _profile(correct: torch.Tensor, min_slice: int) -> dict[str, Any]:
    full = correct.float().mean().item()
    levels = []
    for bounds in slice_bounds(len(correct), min_slice=min_slice):
        accs = [correct[a:b].float().mean().item() for a, b in bounds]
        size = bounds[0][1] - bounds[0][0]
        levels.append(
            {
                "fraction": size / len(correct),
                "size": size,
                "slices": len(bounds),
                "min": min(accs),
                "mean": sum(accs) / len(accs),
                "max": max(accs),
            }
        )
    worst = min(lv["min"] for lv in levels)
    return {
        "top1": full,
        "min_slice": min_slice,
        "levels": levels,
        "degradation_factor": (1.0 - worst / full) if full > 0 else 0.0,
    }


def compare_degradation(
    teacher_logits: torch.Tensor,
    final_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    min_slice: int = 25,
    mean_tol: float = 0.01,
    slice_tol: float = 0.05,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The final model's profile, the teacher's, the worst paired slice and the flag (module doc).

    This is what :func:`pqd.run.pipeline.finalize` stores as ``metrics.json["degradation"]``.
    """
    t, f = _correct(teacher_logits, labels), _correct(final_logits, labels)
    final, teacher = _profile(f, min_slice), _profile(t, min_slice)
    tested, worst = 0, None
    for k, bounds in enumerate(slice_bounds(len(f), min_slice=min_slice)):
        for j, (a, b) in enumerate(bounds):
            ts, fs = t[a:b], f[a:b]
            gap = (ts.float().mean() - fs.float().mean()).item()
            tested += 1
            if gap <= 0:
                continue
            test = mcnemar(int(((ts == 1) & (fs == 0)).sum()), int(((ts == 0) & (fs == 1)).sum()))
            cand = {
                "level": k,
                "slice": j,
                "start": a,
                "size": b - a,
                "teacher_top1": ts.float().mean().item(),
                "final_top1": fs.float().mean().item(),
                "gap": gap,
                "p_value": test["p_value"],
            }
            if worst is None or (cand["p_value"], -cand["gap"]) < (worst["p_value"], -worst["gap"]):
                worst = cand
    if worst is not None:
        worst["p_adjusted"] = min(1.0, worst["p_value"] * tested)
    mean_gap = teacher["top1"] - final["top1"]
    flag = bool(
        worst is not None and mean_gap <= mean_tol and worst["gap"] >= slice_tol and worst["p_adjusted"] < alpha
    )
    return {
        "min_slice": min_slice,
        "slices_tested": tested,
        "final": {k: final[k] for k in ("degradation_factor", "levels")},
        "teacher": {k: teacher[k] for k in ("degradation_factor", "levels")},
        "degradation_factor": final["degradation_factor"],
        "teacher_degradation_factor": teacher["degradation_factor"],
        "mean_gap": mean_gap,
        "worst_slice": worst,
        "slice_failure": flag,
        "rule": {"mean_tol": mean_tol, "slice_tol": slice_tol, "alpha": alpha},
    }
