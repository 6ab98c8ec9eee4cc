"""How faithful a compressed model is to its teacher, beyond one top-1 number.

``faithfulness(teacher_logits, final_logits, labels)`` reports, for both models, top-1,
top-5 (top-k with k = 5, or the number of classes when fewer: the ``k`` field says which)
and per-class accuracy; how often the two models predict the same class; and McNemar's
test on the 2x2 table of teacher-right / compressed-right counts, i.e. whether the two
differ in accuracy by more than chance on this test set (a paired test: only the images
on which exactly one of them is right count).

McNemar's test (exact binomial below ``EXACT_BELOW`` discordant images, chi-squared with
continuity correction above) lives in :mod:`pqd.measure.stats`, with the accuracy
intervals; it is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pqd.measure.stats import EXACT_BELOW, mcnemar

__all__ = ["EXACT_BELOW", "faithfulness", "mcnemar"]


def _topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(1).float().mean().item()


def _per_class(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, names: Sequence[str]
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for c in range(num_classes):
        sel = labels == c
        n = int(sel.sum())
        out[names[c]] = (pred[sel] == c).float().mean().item() if n else None
    return out


def faithfulness(
    teacher_logits: torch.Tensor,
    final_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    class_names: Sequence[str] | None = None,
    k: int = 5,
) -> dict:
    """Accuracy of both models, their agreement, and McNemar's test (teacher vs final).

    ``*_logits``: ``[N, C]`` scores on the same images in the same order; ``labels``: ``[N]``.
    Per-class accuracy is keyed by ``class_names`` (or the class index); a class with no
    test image gets ``None``.
    """
    if (
        teacher_logits.shape != final_logits.shape
        or teacher_logits.dim() != 2
        or labels.shape != teacher_logits.shape[:1]
    ):
        raise ValueError(
            f"shape mismatch: teacher {tuple(teacher_logits.shape)}, final {tuple(final_logits.shape)}, labels {tuple(labels.shape)}"
        )
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
        return {
            "top1": (pred == labels).float().mean().item(),
            "top5": _topk(logits, labels, kk),
            "per_class": _per_class(pred, labels, num_classes, names),
        }

    return {
        "n": int(labels.numel()),
        "k": kk,
        "teacher": acc(teacher_logits, tp),
        "final": acc(final_logits, fp),
        "agreement_with_teacher": (tp == fp).float().mean().item(),
        "contingency": {
            "both_right": int((t_ok & f_ok).sum()),
            "teacher_only": b,
            "final_only": c,
            "both_wrong": int((~t_ok & ~f_ok).sum()),
        },
        "mcnemar": mcnemar(b, c),
    }
