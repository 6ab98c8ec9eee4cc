"""Channel importance: which channels of a group to keep, and how much a group's channels are worth.

Criteria (``get_importance(name)``):

- ``l1`` / ``l2``: filter norm, summed over every layer of the coupled group (Torch-Pruning's
  group magnitude importance);
- ``bn``: |BN scale| (network slimming; meaningful after training with an L1 penalty on the
  BN scales, still a usable signal without it);
- ``taylor``: first-order Taylor |w · dL/dw| on a few training batches
  (:func:`accumulate_gradients` must run first; :func:`group_scores` does it);
- ``random``: a baseline.

Every criterion returns scores normalised to mean 1 within a group, so scores of
different groups are comparable: :func:`global_widths` ranks all channels at once,
:func:`uniform_widths` keeps the same ratio everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pqd.compress.channels.graph import ROUND_TO
from pqd.errors import ConfigError

CRITERIA = ("l1", "l2", "bn", "taylor", "random")


def get_importance(name: str):
    """A Torch-Pruning importance object: ``imp(group) -> Tensor[channels]`` (mean-normalised)."""
    from pqd.compress.channels.graph import require_torch_pruning

    tp = require_torch_pruning()
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer="mean")
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")
    if name == "bn":
        return tp.importance.BNScaleImportance(normalizer="mean")
    if name == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer="mean")
    if name == "random":
        return tp.importance.RandomImportance()
    raise ConfigError(f"structured.importance: {name!r} is not valid; choose one of {', '.join(map(repr, CRITERIA))}")


def accumulate_gradients(model: nn.Module, data, *, batches: int = 4, batch_size: int = 64, seed: int = 0) -> None:
    """Leave dL/dw of the cross-entropy on ``batches`` training batches in every ``.grad`` (for Taylor)."""
    from pqd.data import batches as iterate

    model.eval()  # BN statistics untouched; gradients still flow
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for i, (x, y) in enumerate(
        iterate(
            data.train, batch_size=batch_size, mean=data.mean, std=data.std, shuffle=True, generator=gen, device=device
        )
    ):
        if i >= batches:
            break
        nn.functional.cross_entropy(model(x), y).backward()


def group_scores(
    graph, criterion: str, *, data=None, batches: int = 4, batch_size: int = 64, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Per-channel scores of every group of a :class:`pqd.compress.channels.graph.ChannelGraph`."""
    if criterion == "taylor":
        if data is None:
            raise ConfigError("structured.importance: 'taylor' needs training data for its gradient batches")
        accumulate_gradients(graph.model, data, batches=batches, batch_size=batch_size, seed=seed)
    if criterion == "random":
        torch.manual_seed(seed)
    try:
        return graph.scores(get_importance(criterion))
    finally:
        if criterion == "taylor":
            graph.model.zero_grad(set_to_none=True)


def retained(scores: torch.Tensor, k: int) -> float:
    """Sum of the ``k`` largest scores."""
    return float(torch.sort(scores, descending=True).values[:k].sum())


def uniform_widths(channels: Mapping[str, int], keep_ratio: float, *, round_to: int = ROUND_TO) -> dict[str, int]:
    """The same keep ratio in every group (per-layer ratios), rounded up to ``round_to``."""
    from pqd.compress.channels.graph import round_width

    return {g: round_width(c * keep_ratio, c, round_to) for g, c in channels.items()}


def global_widths(
    scores: Mapping[str, torch.Tensor], keep_ratio: float, *, round_to: int = ROUND_TO, min_keep: float = 0.05
) -> dict[str, int]:
    """Global ranking: keep the ``keep_ratio`` most important channels of the whole model.

    Each group keeps at least ``min_keep`` of its channels (and one ``round_to`` step).
    """
    from pqd.compress.channels.graph import round_width

    allv = torch.cat([s for s in scores.values()])
    n_keep = max(1, int(round(keep_ratio * allv.numel())))
    thresh = torch.sort(allv, descending=True).values[n_keep - 1]
    out = {}
    for g, s in scores.items():
        k = max(int((s >= thresh).sum()), int(round(min_keep * s.numel())), 1)
        out[g] = round_width(k, s.numel(), round_to)
    return out
