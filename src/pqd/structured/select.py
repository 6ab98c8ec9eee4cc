"""Several width recipes under one latency target, chosen by accuracy after adaptive BN.

One importance criterion decides alone where the greedy search of :mod:`pqd.structured.search`
cuts, and the two measured here fail in opposite directions (docs/STRUCTURED.md): mean-normalised
L1 costs about the same per channel everywhere, so the greedy cuts where a channel costs the most
milliseconds (the early, high-resolution layers); a per-group sensitivity table cuts the deep
layers. Uniform width scaling sits between them and beat both below 0.75x.

Here each **recipe** turns a predicted-latency target into widths:

- ``greedy``: the search's greedy on the given cost (importance or sensitivity);
- ``greedy_fraction``: the greedy charging the *share of a group's importance* removed (a
  64-channel group's channel costs 8x a 512-channel group's), which cuts the wide, deep groups;
- ``uniform``: the largest uniform keep ratio whose prediction meets the target;
- ``blend{t}_{name}``: per-group keep ratios ``(1 - t) * uniform + t * greedy recipe``, scaled
  together until the prediction meets the target;
- ``uniform_refill``: uniform, then channels added back one rounding step at a time where they
  restore the most importance per predicted millisecond, until the target is filled. Latency
  rises in steps with width (docs/STRUCTURED.md), so the largest uniform model under a target
  can leave a fifth of it unused.

:func:`adapted_bn_ranker` scores every recipe's model without training: the pruned model's BN
statistics re-estimated on a few hundred training images, then per-image correctness on held-out
images (EagleEye, Li et al., ECCV 2020: that accuracy ranks pruned candidates the way fine-tuned
accuracy does far better than the un-adapted one). :func:`choose` (defined beside the search) takes the best, but keeps
uniform scaling unless the best beats it on those images by McNemar's paired test (α = 0.05): on
1,000 images a difference of a few tenths of a point is noise, and there uniform scaling is the
safer choice (docs/STRUCTURED.md). :func:`pqd.structured.search.search` ranks the recipes once,
at its first target, and keeps the chosen recipe while it corrects the target against measured
latency. Whether the ranking predicts fine-tuned INT8 accuracy is measured in
benchmarks/structured.py (``--select adapted_bn``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from pqd.compress.channels.graph import ChannelGraph, prune_to_widths, round_width
from pqd.structured.latency_model import LatencyModel
from pqd.structured.search import choose, cost_function, greedy_widths, refill_widths

__all__ = ["adapt_bn", "adapted_bn_ranker", "choose", "fit_scale", "normalized_images", "stage_ranker", "width_recipes"]

Widths = dict[str, int]
Recipe = Callable[[LatencyModel, float], Widths]


def _scaled(graph: ChannelGraph, ratios: Mapping[str, float], s: float, *, round_to: int, min_keep: float) -> Widths:
    chans = graph.widths()
    return {g: round_width(max(min_keep, min(1.0, s * ratios[g])) * c, c, round_to) for g, c in chans.items()}


def fit_scale(
    graph: ChannelGraph,
    lm: LatencyModel,
    ratios: Mapping[str, float],
    target_ms: float,
    *,
    round_to: int,
    min_keep: float,
    steps: int = 30,
) -> Widths:
    """Per-group keep ratios ``ratios`` scaled by one factor, the largest whose predicted latency is <= ``target_ms``.

    Bisection on the factor (the prediction grows with every width). If even the smallest
    widths miss the target, those are returned (the search reports the miss when it measures)."""
    top = max(1.0 / max(min(ratios.values()), 1e-6), 1.0)
    lo, hi = 0.0, top
    if lm.predict(graph, _scaled(graph, ratios, hi, round_to=round_to, min_keep=min_keep)) <= target_ms:
        return _scaled(graph, ratios, hi, round_to=round_to, min_keep=min_keep)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if lm.predict(graph, _scaled(graph, ratios, mid, round_to=round_to, min_keep=min_keep)) <= target_ms:
            lo = mid
        else:
            hi = mid
    return _scaled(graph, ratios, lo, round_to=round_to, min_keep=min_keep)


def width_recipes(
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor] | None,
    *,
    cost=None,
    round_to: int = 8,
    min_keep: float = 0.1,
    blends: Sequence[float] = (0.5,),
) -> dict[str, Recipe]:
    """The recipes named in the module docstring. ``cost`` is the search's own greedy cost (default:
    from ``scores``); ``greedy_fraction`` needs ``scores``."""
    chans = graph.widths()
    base_cost = cost if cost is not None else cost_function(graph, scores, None)
    greedy: dict[str, Recipe] = {
        "greedy": lambda lm, t: greedy_widths(graph, lm, base_cost, t, round_to=round_to, min_keep=min_keep)
    }
    if scores is not None:
        fc = cost_function(graph, scores, None, per_group=True)
        greedy["greedy_fraction"] = lambda lm, t: greedy_widths(graph, lm, fc, t, round_to=round_to, min_keep=min_keep)
    ones = {g: 1.0 for g in chans}
    recipes: dict[str, Recipe] = dict(greedy)
    recipes["uniform"] = lambda lm, t: fit_scale(graph, lm, ones, t, round_to=round_to, min_keep=min_keep)

    def blend(name: str, tw: float) -> Recipe:
        def make(lm, t):
            u, w = recipes["uniform"](lm, t), greedy[name](lm, t)
            ratios = {g: (1 - tw) * u[g] / chans[g] + tw * w[g] / chans[g] for g in chans}
            return fit_scale(graph, lm, ratios, t, round_to=round_to, min_keep=min_keep)

        return make

    for name in greedy:
        for tw in blends:
            recipes[f"blend{tw:g}_{name}"] = blend(name, tw)
    recipes["uniform_refill"] = lambda lm, t: refill_widths(
        graph, lm, base_cost, recipes["uniform"](lm, t), t, round_to=round_to
    )
    return recipes


@torch.no_grad()
def adapt_bn(model: nn.Module, images: torch.Tensor, *, batch_size: int = 128) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``images`` (normalised, NCHW); in place, returns eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    for i in range(0, len(images), batch_size):
        model(images[i : i + batch_size])
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    return model.eval()


def adapted_bn_ranker(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor] | None,
    *,
    example: torch.Tensor,
    calib: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    batch_size: int = 250,
    ignore: Sequence[str] = (),
) -> Callable[[Mapping[str, Widths]], dict[str, torch.Tensor]]:
    """``rank({name: widths}) -> {name: per-image correctness}`` (bool, in ``val_y``'s order): each candidate
    pruned from ``model`` (channels kept by ``scores``), BN re-estimated on ``calib``, then run on ``val_x``.
    Images are normalised float tensors on the CPU; ``model`` is not modified."""
    base = copy.deepcopy(model).cpu().eval()

    def rank(candidates: Mapping[str, Widths]) -> dict[str, torch.Tensor]:
        out = {}
        for name, widths in candidates.items():
            m = adapt_bn(
                prune_to_widths(base, widths, example=example, round_to=1, scores=scores, ignore=ignore), calib
            )
            with torch.inference_mode():
                pred = torch.cat([m(val_x[i : i + batch_size]).argmax(1) for i in range(0, len(val_x), batch_size)])
            out[name] = pred == val_y
        return out

    return rank


def normalized_images(ds, index: torch.Tensor, *, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of ``ds[index]``, normalised as the training loop feeds them, without augmentation, on the CPU."""
    from pqd.data import batches

    sub = ds.subset(index)
    return next(iter(batches(sub, batch_size=len(sub), mean=mean, std=std)))


def stage_ranker(
    model: nn.Module,
    scores,
    data,
    *,
    example: torch.Tensor,
    calib_images: int,
    val_images: int = 1000,
    seed: int = 0,
    ignore: Sequence[str] = (),
) -> tuple[Callable, str]:
    """The ranker the structured stage uses: BN re-estimated on ``calib_images`` seeded training images, top-1 on
    up to ``val_images`` images of the validation split, or, without one, on other training images (said in the
    returned label)."""
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    calib, _ = normalized_images(data.train, perm[:calib_images], mean=data.mean, std=data.std)
    if data.val is not None and len(data.val):
        val_x, val_y = normalized_images(
            data.val, torch.arange(min(val_images, len(data.val))), mean=data.mean, std=data.std
        )
        where = f"{len(val_y)} validation images"
    else:
        rest = perm[calib_images : calib_images + val_images]
        if len(rest) == 0:
            rest = perm[:val_images]
        val_x, val_y = normalized_images(data.train, rest, mean=data.mean, std=data.std)
        where = f"{len(val_y)} training images (no validation split)"
    return adapted_bn_ranker(
        model, scores, example=example, calib=calib, val_x=val_x, val_y=val_y, ignore=ignore
    ), where
