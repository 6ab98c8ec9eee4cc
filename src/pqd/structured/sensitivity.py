"""Per-layer sensitivity: accuracy drop per channel group vs keep ratio, and per layer under INT8.

``analyze(model, data)`` returns one row (a dict) per measurement:

- ``kind='prune'``: group ``group`` pruned alone to ``keep_ratio`` (by the chosen criterion,
  no fine-tuning), every other layer intact;
- ``kind='quantize'``: layer ``layer`` alone converted to INT8 (x86 FX, static, calibrated on
  training batches), every other layer FP32.

``accuracy`` and ``drop`` (baseline accuracy minus accuracy, in points of a fraction) are
on the validation split when the data has one, else on the test split. The search
(:mod:`pqd.structured.search`) reads the prune rows as predicted accuracy loss;
:func:`write` writes CSV, Markdown and a plot for a person.

    pqd analyze --model resnet18 --width 0.25 --weights teacher.safetensors --dataset cifar10 --root DATA --out OUT
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pqd.errors import ModelError

log = logging.getLogger("pqd.structured")

COLUMNS = ("kind", "group", "layer", "channels", "keep_ratio", "kept", "macs", "accuracy", "baseline", "drop")


def _accuracy(model: nn.Module, ds, data, batch_size: int) -> float:
    from pqd.measure.accuracy import predict, top1

    return top1(predict(model, ds, mean=data.mean, std=data.std, batch_size=batch_size), ds.y)


def _quantize_one(
    model: nn.Module, layer: str, example: torch.Tensor, data, calib_batches: int, batch_size: int
) -> nn.Module:
    import warnings

    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from pqd.compress.qat import BACKEND, qconfig_mapping
    from pqd.data import batches

    torch.backends.quantized.engine = BACKEND
    qc = qconfig_mapping("ptq").global_qconfig
    mapping = QConfigMapping().set_module_name(layer, qc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, (example,))
        with torch.no_grad():
            for i, (x, _) in enumerate(batches(data.train, batch_size=batch_size, mean=data.mean, std=data.std)):
                if i >= calib_batches:
                    break
                prepared(x)
        return convert_fx(prepared)


def analyze(
    model: nn.Module,
    data,
    *,
    keep_ratios: Sequence[float] = (0.75, 0.5, 0.25),
    criterion: str = "l1",
    prune: bool = True,
    quantize: bool = True,
    max_images: int | None = 1000,
    round_to: int = 1,
    calib_batches: int = 4,
    batch_size: int = 256,
    ignore: Sequence[str] = (),
) -> list[dict]:
    """Sensitivity rows (see the module docstring); the model is not modified."""
    from pqd.compress.channels.graph import ChannelGraph, prune_to_widths, round_width
    from pqd.compress.channels.importance import group_scores

    if any(not 0 < r < 1 for r in keep_ratios):
        raise ModelError(f"analyze: keep ratios must be in (0, 1), got {list(keep_ratios)}")
    model = copy.deepcopy(model).cpu().eval()
    ds = data.val if data.val is not None else data.test
    if max_images is not None and len(ds) > max_images:
        ds = ds.subset(torch.arange(max_images))
    example = torch.zeros(2, *data.image_shape)
    base = _accuracy(model, ds, data, batch_size)
    rows: list[dict] = []
    if prune:
        graph = ChannelGraph(copy.deepcopy(model), example, tuple(ignore))
        scores = group_scores(graph, criterion, data=data)
        for g in graph.groups:
            for r in keep_ratios:
                k = round_width(g.channels * r, g.channels, round_to)
                if k >= g.channels:
                    continue
                pruned = prune_to_widths(model, {g.id: k}, example=example, round_to=1, scores=scores, ignore=ignore)
                acc = _accuracy(pruned, ds, data, batch_size)
                macs = sum(x.macs for x in graph.layer_shapes({g.id: k}))
                rows.append(
                    {
                        "kind": "prune",
                        "group": g.id,
                        "layer": g.id,
                        "channels": g.channels,
                        "keep_ratio": k / g.channels,
                        "kept": k,
                        "macs": macs,
                        "accuracy": acc,
                        "baseline": base,
                        "drop": base - acc,
                    }
                )
    if quantize:
        from pqd.compress.channels.graph import trace_layers

        for layer in trace_layers(model, example):
            try:
                q = _quantize_one(model, layer.name, example, data, calib_batches, batch_size)
            except Exception as exc:  # torch.fx raises many types
                raise ModelError(
                    f"analyze: cannot quantize layer {layer.name!r} alone ({type(exc).__name__}: {str(exc)[:200]})"
                ) from None
            acc = _accuracy(q, ds, data, batch_size)
            rows.append(
                {
                    "kind": "quantize",
                    "group": "",
                    "layer": layer.name,
                    "channels": layer.cout,
                    "keep_ratio": 1.0,
                    "kept": layer.cout,
                    "macs": layer.macs,
                    "accuracy": acc,
                    "baseline": base,
                    "drop": base - acc,
                }
            )
    return rows


def to_markdown(rows: Sequence[dict]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows: Sequence[dict], path: str | Path) -> Path | None:
    """Drop vs keep ratio per group (left) and INT8 drop per layer (right); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'pqd[report]'); skipping the sensitivity plot")
        return None
    prune_rows = [r for r in rows if r["kind"] == "prune"]
    quant_rows = [r for r in rows if r["kind"] == "quantize"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    groups: dict[str, list] = {}
    for r in prune_rows:
        groups.setdefault(r["group"], []).append((r["keep_ratio"], 100 * r["drop"]))
    for g, pts in groups.items():
        pts = sorted(pts + [(1.0, 0.0)])
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=g)
    axes[0].set(
        xlabel="keep ratio (channels kept in the group)",
        ylabel="top-1 drop (points)",
        title="Channel pruning, one group at a time",
    )
    if len(groups) <= 20:
        axes[0].legend(fontsize=6)
    axes[1].bar(range(len(quant_rows)), [100 * r["drop"] for r in quant_rows])
    axes[1].set_xticks(range(len(quant_rows)), [r["layer"] for r in quant_rows], rotation=90, fontsize=6)
    axes[1].set(ylabel="top-1 drop (points)", title="INT8, one layer at a time")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rows: Sequence[dict], out_dir: str | Path, *, stem: str = "sensitivity") -> dict[str, Path]:
    """``<stem>.csv``, ``<stem>.md`` and (with matplotlib) ``<stem>.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(to_markdown(rows))
    png = plot(rows, out / f"{stem}.png")
    if png is not None:
        paths["png"] = png
    return paths


def read_csv(path: str | Path) -> list[dict]:
    """Rows written by :func:`write`, with numbers parsed (for ``structured.sensitivity``)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for c in ("channels", "kept", "macs"):
                r[c] = int(r[c])
            for c in ("keep_ratio", "accuracy", "baseline", "drop"):
                r[c] = float(r[c])
            rows.append(r)
    return rows


def analyze_main(argv: Sequence[str] | None = None) -> int:
    """``pqd analyze``: sensitivity table + plot of a model (weights from a safetensors file)."""
    from pqd.config import DataConfig
    from pqd.data import load_data
    from pqd.models.registry import create_model

    p = argparse.ArgumentParser(prog="pqd analyze", description="per-group pruning and per-layer INT8 sensitivity")
    p.add_argument("--model", default="resnet18", help="registry name or package.module:factory")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument(
        "--weights", help="safetensors state dict (e.g. a run's teacher.safetensors); without it the model is untrained"
    )
    p.add_argument("--dataset", default="digits")
    p.add_argument("--root")
    p.add_argument("--train-subset", type=int)
    p.add_argument("--test-subset", type=int)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--keep-ratios", default="0.75,0.5,0.25")
    p.add_argument("--criterion", default="l1")
    p.add_argument("--max-images", type=int, default=1000)
    p.add_argument("--no-quantize", action="store_true")
    p.add_argument("--no-prune", action="store_true")
    p.add_argument("--out", default="sensitivity")
    a = p.parse_args(argv)
    data = load_data(
        DataConfig(
            dataset=a.dataset,
            root=a.root,
            train_subset=a.train_subset,
            test_subset=a.test_subset,
            val_fraction=a.val_fraction,
        )
    )
    kwargs = {"width": a.width} if a.width != 1.0 else {}
    model = create_model(a.model, num_classes=data.num_classes, **kwargs)
    if a.weights:
        from pqd.compress.channels.reshape import fit_to_state_dict
        from pqd.train.checkpoint import load_checkpoint

        state = load_checkpoint(a.weights, user_file=True)[0]
        fit_to_state_dict(model, state)
        model.load_state_dict(state)
    else:
        log.warning("no --weights: analysing an untrained model")
    rows = analyze(
        model,
        data,
        keep_ratios=tuple(float(x) for x in a.keep_ratios.split(",")),
        criterion=a.criterion,
        prune=not a.no_prune,
        quantize=not a.no_quantize,
        max_images=a.max_images,
    )
    paths = write(rows, a.out)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0
