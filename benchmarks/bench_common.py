"""Helpers shared by the benchmark scripts (imported as ``bench_common`` from a script in this folder)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from pqd.compress.channels.graph import ChannelGraph, prune_to_widths
from pqd.compress.channels.importance import group_scores
from pqd.config import DataConfig
from pqd.data import load_data
from pqd.measure.stats import mcnemar_pooled, paired_difference_interval
from pqd.models.registry import create_model
from pqd.structured import latency_model as L
from pqd.structured.select import adapted_bn_ranker, normalized_images
from pqd.train.checkpoint import load_checkpoint

SHAPE = (3, 32, 32)


def recorded_target(res: dict) -> L.Target:
    """The target a benchmarks/structured.py result JSON was measured on (and its threads set here)."""
    args = res["args"]
    torch.set_num_threads(args["threads"])
    return L.Target(args["runtime"], args["batch"], args["threads"])


def recorded_shape(res: dict) -> tuple[int, int, int]:
    """The input shape a benchmarks/structured.py result JSON was timed at (``--image-size``, else 32x32)."""
    size = res["args"].get("image_size")
    return (3, size, size) if size else SHAPE


def recorded_models(entry: dict, *, shape=SHAPE, teacher_weights: str | None = None, keep=lambda variant: True) -> dict:
    """``{variant: model}`` pruned to the widths one model entry of a result JSON recorded (rows ``keep``
    selects), for inputs of ``shape``; untrained weights unless ``teacher_weights`` (widths alone decide
    latency)."""
    torch.manual_seed(0)
    teacher = create_model(entry["model"], num_classes=10)
    if teacher_weights:
        teacher.load_state_dict(load_checkpoint(teacher_weights)[0])
    teacher.eval()
    example = torch.zeros(2, *shape)
    scores = group_scores(ChannelGraph(copy.deepcopy(teacher), example), "l1")
    return {
        r["variant"]: prune_to_widths(teacher, r["widths"], example=example, round_to=1, scores=scores)
        for r in entry["rows"]
        if keep(r["variant"])
    }


def validation_images(data, args):
    """``args.val_images`` training-split images outside the training subset (for the sensitivity analysis), seeded."""
    full = load_data(DataConfig(dataset="cifar10", root=args.data, test_subset=10)).train
    seen = {bytes(x.numpy().tobytes()) for x in data.train.x}
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(1234))
    keep = [int(i) for i in order if bytes(full.x[i].numpy().tobytes()) not in seen][: args.val_images]
    return full.subset(torch.tensor(keep))


def bench_ranker(teacher, scores, example, data, args):
    """The adapted-BN ranker of ``--select adapted_bn``: BN re-estimated on ``args.select_images`` seeded training
    images, scored on the ``args.val_images`` held-out images of :func:`validation_images`."""
    val = validation_images(data, args)
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(4321))
    calib, _ = normalized_images(data.train, perm[: args.select_images], mean=data.mean, std=data.std)
    val_x, val_y = normalized_images(val, torch.arange(len(val)), mean=data.mean, std=data.std)
    return adapted_bn_ranker(teacher, scores, example=example, calib=calib, val_x=val_x, val_y=val_y)


ALPHA = 0.05


def verdict(diff: float, p_holm: float, hi: float, seeds_against: int) -> str:
    """A claim's verdict (docs/RESULTS_TEMPLATE.md): holds / does not hold / not resolved at this scale."""
    if diff > 0 and p_holm < ALPHA and seeds_against == 0:
        return "holds"
    if (diff < 0 and p_holm < ALPHA) or hi < 0.005:
        return "does not hold"
    return "not resolved at this scale"


def paired_comparison(ca: dict[int, np.ndarray], cb: dict[int, np.ndarray]) -> dict | None:
    """A vs B on the same test images, pooled over the seeds both ran: the difference in top-1 (fraction) with
    its 95% paired interval (Wald), McNemar's stratified test on the discordant images, seeds pointing each way."""
    seeds = sorted(set(ca) & set(cb))
    if not seeds:
        return None
    tables = [(int((ca[s] & ~cb[s]).sum()), int((~ca[s] & cb[s]).sum())) for s in seeds]
    rec = mcnemar_pooled(tables)
    iv = paired_difference_interval(np.concatenate([ca[s] for s in seeds]), np.concatenate([cb[s] for s in seeds]))
    n = sum(len(ca[s]) for s in seeds)
    return {
        "seeds": seeds,
        "n": n,
        "top1_a": sum(int(ca[s].sum()) for s in seeds) / n,
        "top1_b": sum(int(cb[s].sum()) for s in seeds) / n,
        "difference": iv["difference"],
        "ci": [iv["ci_low"], iv["ci_high"]],
        "p": rec["p_value"],
        "b": rec["b"],
        "c": rec["c"],
        "seeds_a_better": rec["strata_a_better"],
        "seeds_b_better": rec["strata_b_better"],
    }
