"""Coupled channel groups of a model and physical channel removal, on Torch-Pruning's graph.

Torch-Pruning (``torch_pruning``, pinned 1.6.1) traces the model once and finds which
channels must be removed together: the output channels of every conv feeding one residual
add, a BN and the next layer's input channels, a depthwise conv's channels with its
producer's, the slices of a concatenation, an SE block's squeeze/excite convs. pqd names
each such *group* by the module path of its root layer (the conv or linear whose output
channels the group removes) and keeps, per group, the channel count, the layers it touches
and their multiply-accumulates.

:func:`prune_to_widths` returns a dense, physically smaller copy of a model with a given
number of channels kept per group; :func:`layer_shapes` predicts every conv/linear layer's
shape for given widths without building the model (what the latency model evaluates inside
the search loop).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pqd.errors import ModelError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d  # one of CONVS

ORDER_HINT = "structured pruning must come before quantize, e.g. S:5,P:20,Q:40,D:40"


def require_torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError:
        raise ModelError(
            "structured pruning needs torch-pruning: pip install 'pqd[structured]' (torch-pruning==1.6.1)"
        ) from None
    return tp


# --------------------------------------------------------------------------- checks


def check_prunable(model: nn.Module) -> None:
    """Refuse fake-quantized, observed or converted INT8 models with the order that works."""
    from torch.ao.quantization import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    for name, m in model.named_modules():
        mod = type(m).__module__
        if isinstance(m, (FakeQuantizeBase, ObserverBase)) or mod.startswith(
            ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.ao.nn.qat", "torch.ao.nn.intrinsic.qat")
        ):
            raise ModelError(
                f"cannot prune channels of a quantized model (module {name or '<root>'!r} is {type(m).__name__}): {ORDER_HINT}"
            )
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"cannot prune channels of a TorchScript model: {ORDER_HINT}")


# --------------------------------------------------------------------------- layer table


@dataclass(frozen=True)
class Layer:
    """A conv or linear layer as traced on the example input (batch 1)."""

    name: str
    kind: str  # 'conv' (k > 1), 'pointwise' (1x1), 'depthwise', 'grouped', 'linear'
    cin: int
    cout: int
    groups: int
    kernel: int  # kh * kw (1 for linear)
    out_hw: int  # output spatial positions (1 for linear)

    @property
    def macs(self) -> int:
        return self.out_hw * self.cout * (self.cin // self.groups) * self.kernel

    def resized(self, cin: int, cout: int) -> Layer:
        groups = self.groups
        if self.kind == "depthwise":
            groups = cin = cout
        return Layer(self.name, self.kind, cin, cout, groups, self.kernel, self.out_hw)


def _kind(m: nn.Linear | Conv) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups > 1:
        return "depthwise" if m.groups == m.in_channels == m.out_channels else "grouped"
    return "pointwise" if math.prod(m.kernel_size) == 1 else "conv"


def trace_layers(model: nn.Module, example: torch.Tensor) -> list[Layer]:
    """Every Conv1d/2d/3d and Linear layer that runs on ``example``, in execution order."""
    rows: list[Layer] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def hook(m, inp, out):
        if isinstance(m, nn.Linear):
            rows.append(
                Layer(
                    names[m],
                    "linear",
                    m.in_features,
                    m.out_features,
                    1,
                    1,
                    max(1, out.numel() // out.shape[0] // m.out_features),
                )
            )
        else:
            rows.append(
                Layer(
                    names[m],
                    _kind(m),
                    m.in_channels,
                    m.out_channels,
                    m.groups,
                    math.prod(m.kernel_size),
                    math.prod(out.shape[2:]),
                )
            )

    for m in model.modules():
        if isinstance(m, (nn.Linear, *CONVS)):
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    seen, out = set(), []
    for r in rows:  # a module called twice is one set of weights: keep its first call
        if r.name not in seen:
            seen.add(r.name)
            out.append(r)
    return out


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Conv + linear multiply-accumulates for one image."""
    return sum(r.macs for r in trace_layers(model, example))


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Group:
    """Channels removed together. ``id`` is the root layer's module path.

    ``out_layers`` / ``in_layers``: (layer, channels of that layer's output / input this
    group controls); ``layers``: every module (conv, linear, norm) the group touches.
    """

    id: str
    channels: int
    layers: tuple[str, ...]
    out_layers: tuple[tuple[str, int], ...]
    in_layers: tuple[tuple[str, int], ...]
    macs: int  # MACs of the conv/linear layers whose input or output this group resizes

    def to_dict(self) -> dict:
        return {"id": self.id, "channels": self.channels, "layers": list(self.layers), "macs": self.macs}


@dataclass
class ChannelGraph:
    """Torch-Pruning's dependency graph of ``model`` plus pqd's group table.

    ``ignore``: module paths whose *output* channels are kept (the classifier is always
    ignored: the last conv/linear layer, whose output is the model's output).
    """

    model: nn.Module
    example: torch.Tensor
    ignore: tuple[str, ...] = ()
    groups: list[Group] = field(init=False)
    layers: list[Layer] = field(init=False)

    def __post_init__(self):
        check_prunable(self.model)
        tp = require_torch_pruning()
        self.layers = trace_layers(self.model, self.example)
        if not self.layers:
            raise ModelError(f"{type(self.model).__name__} has no Conv or Linear layer to prune")
        mods = dict(self.model.named_modules())
        self._names = {m: n for n, m in mods.items()}
        ignored = [mods[self.layers[-1].name]] + [mods[n] for n in self.ignore if n in mods]
        unknown = [n for n in self.ignore if n not in mods]
        if unknown:
            raise ModelError(f"structured ignore: no module named {', '.join(map(repr, unknown))}")
        try:
            self.dg = tp.DependencyGraph().build_dependency(self.model, example_inputs=self.example[:1])
            raw = list(self.dg.get_all_groups(ignored_layers=ignored, root_module_types=[*CONVS, nn.Linear]))
        except Exception as exc:  # the tracer raises many types
            raise ModelError(
                f"cannot build the channel dependency graph of {type(self.model).__name__} "
                f"({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
        by_layer = {r.name: r for r in self.layers}
        ignored_names = {self._names[m] for m in ignored}
        self.groups = []
        self._handlers: dict[str, Callable] = {}
        for g in raw:
            root = g[0].dep.target.module
            gid = self._names.get(root)
            if gid is None or gid in self._handlers:
                continue
            layers: list[str] = []
            outs: list[tuple[str, int]] = []
            ins: list[tuple[str, int]] = []
            for dep, idxs in g:
                m = dep.target.module
                n = self._names.get(m)
                if n is None:
                    continue  # tp's pseudo-nodes (add, concat, reshape)
                if n not in layers:
                    layers.append(n)
                if n in by_layer:
                    is_out = self.dg.is_out_channel_pruning_fn(dep.handler)
                    (outs if is_out else ins).append((n, len(idxs)))
            if any(n in ignored_names for n, _ in outs):
                continue
            touched = {n for n, _ in outs} | {n for n, _ in ins}
            self.groups.append(
                Group(
                    gid,
                    len(g[0].idxs),
                    tuple(layers),
                    tuple(dict(outs).items()),
                    tuple(dict(ins).items()),
                    sum(by_layer[n].macs for n in touched),
                )
            )
            self._handlers[gid] = g[0].dep.handler
        self.groups.sort(key=lambda gr: [r.name for r in self.layers].index(gr.id) if gr.id in by_layer else 10**9)

    def group(self, gid: str) -> Group:
        for g in self.groups:
            if g.id == gid:
                return g
        raise ModelError(f"no prunable channel group {gid!r}; groups: {', '.join(g.id for g in self.groups)}")

    def widths(self) -> dict[str, int]:
        return {g.id: g.channels for g in self.groups}

    def layer_shapes(self, keep: Mapping[str, int]) -> list[Layer]:
        """Every conv/linear layer's shape after keeping ``keep[g]`` channels of group g (others full)."""
        dcin: dict[str, float] = {}
        dcout: dict[str, float] = {}
        for g in self.groups:
            k = keep.get(g.id, g.channels)
            if k == g.channels:
                continue
            frac = (g.channels - k) / g.channels
            for n, c in g.out_layers:
                dcout[n] = dcout.get(n, 0) + c * frac
            for n, c in g.in_layers:
                dcin[n] = dcin.get(n, 0) + c * frac
        out = []
        for r in self.layers:
            cout = max(1, int(round(r.cout - dcout.get(r.name, 0))))
            cin = max(1, int(round(r.cin - dcin.get(r.name, 0))))
            if r.kind == "depthwise":
                cin = cout
            out.append(r.resized(cin, cout))
        return out

    def scores(self, importance) -> dict[str, torch.Tensor]:
        """Per-channel importance of every group (``importance(tp_group) -> Tensor[channels]``)."""
        mods = dict(self.model.named_modules())
        out = {}
        for g in self.groups:
            tg = self.dg.get_pruning_group(mods[g.id], self._handlers[g.id], list(range(g.channels)))
            s = importance(tg)
            if s is None:  # tp importances return None for groups without a scorable layer
                s = torch.ones(g.channels)
            out[g.id] = s.detach().float().cpu().reshape(-1)[: g.channels]
        return out


ROUND_TO = 8  # channel counts are multiples of this by default: what the INT8 kernels like
MIN_KEEP = 0.1  # by default a channel group keeps at least this share of its channels


def round_width(k: float, channels: int, round_to: int) -> int:
    """``k`` rounded up to a multiple of ``round_to``, within [min(round_to, channels), channels]."""
    if round_to < 1:
        raise ModelError(f"round_to must be >= 1, got {round_to}")
    k = max(1, int(math.ceil(k / round_to) * round_to))
    return max(min(round_to, channels), min(k, channels))


def prune_to_widths(
    model: nn.Module,
    keep: Mapping[str, int],
    importance=None,
    *,
    example: torch.Tensor,
    round_to: int = ROUND_TO,
    ignore: Sequence[str] = (),
    scores: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A pruned deep copy of ``model`` keeping ``keep[group_id]`` channels per group.

    Groups not named in ``keep`` stay whole. Counts are rounded up to multiples of
    ``round_to`` (what the INT8 kernels prefer; ``round_to=1`` keeps them exact). Which
    channels survive: the highest ``importance`` scores (default: L1 filter norm), or
    precomputed ``scores`` per group (from :meth:`ChannelGraph.scores` on the same model).
    """
    check_prunable(model)
    work = copy.deepcopy(model).cpu()
    graph = ChannelGraph(work, example.cpu(), tuple(ignore))
    unknown = [k for k in keep if k not in {g.id for g in graph.groups}]
    if unknown:
        raise ModelError(
            f"prune_to_widths: unknown group(s) {', '.join(map(repr, unknown))}; groups: {', '.join(g.id for g in graph.groups)}"
        )
    if scores is None:
        if importance is None:  # L1 filter norm, as pqd.compress.channels.importance.get_importance("l1")
            importance = require_torch_pruning().importance.GroupMagnitudeImportance(p=1, normalizer="mean")
        scores = graph.scores(importance)
    mods = dict(work.named_modules())
    for g in graph.groups:
        if g.id not in keep:
            continue
        k = round_width(keep[g.id], g.channels, round_to)
        if k >= g.channels:
            continue
        s = scores[g.id]
        drop = sorted(torch.argsort(s, descending=True)[k:].tolist())
        tg = graph.dg.get_pruning_group(mods[g.id], graph._handlers[g.id], drop)
        if not graph.dg.check_pruning_group(tg):
            raise ModelError(
                f"Torch-Pruning refused to prune group {g.id!r} to {k} channels (a layer would be left empty)"
            )
        tg.prune()
    work.eval()
    return work


def current_widths(model: nn.Module, example: torch.Tensor, *, ignore: Sequence[str] = ()) -> dict[str, int]:
    return ChannelGraph(model, example, tuple(ignore)).widths()
