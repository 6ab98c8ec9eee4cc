"""How faithful a compressed model is to its teacher, beyond one top-1 number.

``faithfulness(teacher_logits, final_logits, labels)`` reports, for both models, top-1,
top-5 (top-k with k = 5, or the number of classes when fewer: the ``k`` field says which)
and per-class accuracy; how often the two models predict the same class; and McNemar's
test on the 2x2 table of teacher-right / compressed-right counts, i.e. whether the two
differ in accuracy by more than chance on this test set (a paired test: only the images
on which exactly one of them is right count).

McNemar's p-value is exact (two-sided binomial, p = 0.5) when there are fewer than
``EXACT_BELOW`` discordant images and chi-squared with Yates' continuity correction
(1 degree of freedom), ``(|b - c| - 1)^2 / (b + c)`` with ``|b - c| - 1`` floored at 0 (so
equal discordant counts give p = 1), otherwise. Plain ``math``: no scipy needed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

EXACT_BELOW = 25  # discordant pairs below which the chi-squared approximation is poor


def _binom_two_sided(k: int, n: int) -> float:
    """Two-sided exact p-value of ``k`` successes out of ``n`` under Binomial(n, 1/2)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    # sum_{i<=k} C(n, i) / 2^n, in exact integer arithmetic (n is small on this path)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2.0 * tail / 2**n)


def mcnemar(b: int, c: int, *, exact: bool | None = None) -> dict:
    """McNemar's test from the discordant counts of a paired 2x2 table.

    ``b``: images model A gets right and model B wrong; ``c``: the reverse. ``exact``:
    None picks the exact binomial test when ``b + c < EXACT_BELOW``, else chi-squared with
    continuity correction. Returns the counts, the method, the statistic and the p-value.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    use_exact = n < EXACT_BELOW if exact is None else exact
    if use_exact:
        return {"b": b, "c": c, "method": "exact_binomial", "statistic": float(min(b, c)), "p_value": _binom_two_sided(min(b, c), n)}
    stat = 0.0 if n == 0 else max(abs(b - c) - 1, 0) ** 2 / n
    # chi-squared with 1 degree of freedom: P(X > s) = erfc(sqrt(s / 2))
    return {"b": b, "c": c, "method": "chi2_continuity_corrected", "statistic": stat, "p_value": math.erfc(math.sqrt(stat / 2))}


def _topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(1).float().mean().item()


def _per_class(pred: torch.Tensor, labels: torch.Tensor, num_classes: int, names: Sequence[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for c in range(num_classes):
        sel = labels == c
        n = int(sel.sum())
        out[names[c]] = (pred[sel] == c).float().mean().item() if n else None
    return out


def faithfulness(
    teacher_logits: torch.Tensor, final_logits: torch.Tensor, labels: torch.Tensor, *,
    class_names: Sequence[str] | None = None, k: int = 5,
) -> dict:
    """Accuracy of both models, their agreement, and McNemar's test (teacher vs final).

    ``*_logits``: ``[N, C]`` scores on the same images in the same order; ``labels``: ``[N]``.
    Per-class accuracy is keyed by ``class_names`` (or the class index); a class with no
    test image gets ``None``.
    """
    if teacher_logits.shape != final_logits.shape or teacher_logits.dim() != 2 or labels.shape != teacher_logits.shape[:1]:
        raise ValueError(f"shape mismatch: teacher {tuple(teacher_logits.shape)}, final {tuple(final_logits.shape)}, labels {tuple(labels.shape)}")
    labels = labels.long().cpu()
    teacher_logits, final_logits = teacher_logits.float().cpu(), final_logits.float().cpu()
    num_classes = teacher_logits.shape[1]
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    kk = min(k, num_classes)
    tp, fp = teacher_logits.argmax(1), final_logits.argmax(1)
    t_ok, f_ok = tp == labels, fp == labels
    b = int((t_ok & ~f_ok).sum())  # teacher right, compressed wrong
    c = int((~t_ok & f_ok).sum())  # teacher wrong, compressed right

    def acc(logits: torch.Tensor, pred: torch.Tensor) -> dict:
        return {"top1": (pred == labels).float().mean().item(), "top5": _topk(logits, labels, kk),
                "per_class": _per_class(pred, labels, num_classes, names)}

    return {
        "n": int(labels.numel()),
        "k": kk,
        "teacher": acc(teacher_logits, tp),
        "final": acc(final_logits, fp),
        "agreement_with_teacher": (tp == fp).float().mean().item(),
        "contingency": {"both_right": int((t_ok & f_ok).sum()), "teacher_only": b, "final_only": c, "both_wrong": int((~t_ok & ~f_ok).sum())},
        "mcnemar": mcnemar(b, c),
    }
