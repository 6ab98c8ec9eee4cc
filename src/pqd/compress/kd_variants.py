"""Knowledge-distillation variants as loss modules (``nn.Module``), plus feature taps.

Response-based KD (Hinton et al. 2015) is :class:`pqd.compress.kd.KDLoss`. This module adds:

* :class:`FeatureTaps` - forward hooks that keep the outputs of chosen modules of a model
  (:func:`auto_layers` picks the output of each top-level block when none are given).
* :class:`HintLoss` - feature-based KD, FitNets hints (Romero et al. 2015):
  ``sum_l mean((a_l(F_s,l) - F_t,l)^2)`` where ``a_l`` is a learned 1x1 convolution from the
  student's channels to the teacher's (identity where the widths match, e.g. unstructured
  pruning; learned where they differ, e.g. after structured pruning). Where spatial sizes
  differ the larger map is average-pooled to the smaller.
* :class:`AttentionLoss` - attention transfer (Zagoruyko & Komodakis 2017): with the spatial
  attention map ``Q(F) = normalize(flatten(mean_c F^2))`` (unit L2 norm per image),
  ``sum_l mean((Q(F_s,l) - Q(F_t,l))^2)``; needs no adapter (channel counts may differ), so
  its values are small: the paper weighs it with beta = 1000.
* :class:`MutualLearningLoss` - online deep mutual learning (Zhang et al. 2018), K >= 2
  students, no pre-trained teacher: student ``i`` minimises
  ``CE(z_i, y) + 1/(K-1) sum_{j != i} T^2 KL(softmax(z_j/T) || softmax(z_i/T))`` with the peers'
  distributions detached; the module returns the sum over students, whose gradient for each
  student is exactly its own term.
* :class:`SelfDistillationLoss` - self-distillation (Zhang et al. 2019, "Be your own teacher"):
  auxiliary classifiers (global average pool + linear) on shallower blocks learn from the
  network's own final output: ``CE(z, y) + beta sum_i [T^2 KL(softmax(z/T) || softmax(a_i/T)) +
  alpha CE(a_i, y)]`` with ``z`` (deepest output) detached as the target. The heads are
  training-only; the gradient they send into the shared shallow layers is the regulariser.

All losses keep their trainable parts (adapters, heads) as submodules, so an optimizer over
``loss.parameters()`` (or a module that holds the loss) trains them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pqd.compress.kd import kd_loss
from pqd.errors import ConfigError, ModelError

__all__ = [
    "AttentionLoss",
    "FeatureTaps",
    "HintLoss",
    "MutualLearningLoss",
    "SelfDistillationLoss",
    "attention_map",
    "auto_layers",
    "feature_shapes",
]


# --------------------------------------------------------------------------- taps


class FeatureTaps:
    """Keeps the latest output of each module in ``layers`` (module paths) of ``model``.

    ``taps.features[path]`` is refreshed at every forward of ``model``; ``taps.get()`` returns
    them in ``layers`` order and raises :class:`ModelError` naming a layer that did not run
    (e.g. a container whose forward a torch.fx graph inlines: tap one of its leaf modules).
    ``remove()`` (or leaving a ``with`` block) detaches the hooks.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        self.layers = list(layers)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in self.layers:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ModelError(f"KD layer {path!r} is not a module of {type(model).__name__}") from None
            self._handles.append(module.register_forward_hook(self._hook(path)))

    def _hook(self, path: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self.features[path] = output

        return hook

    def get(self) -> list[torch.Tensor]:
        missing = [p for p in self.layers if p not in self.features]
        if missing:
            raise ModelError(
                f"KD layer(s) {missing} produced no tensor in the last forward pass; choose modules that run "
                "(in a quantization-prepared model, leaf modules such as 'layer1.1.relu2')"
            )
        return [self.features[p] for p in self.layers]

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _fired(model: nn.Module, example: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """``(path, output shape)`` of every module whose forward ran (last call wins), in call order."""
    seen: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, m in model.named_modules():
        if name:

            def hook(module, args, output, name=name):
                if isinstance(output, torch.Tensor):
                    seen.pop(name, None)
                    seen[name] = tuple(output.shape)

            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return list(seen.items())


def auto_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """One tap per top-level block of ``model``: for each top-level child that holds a conv layer
    below it (ResNet's layer1..4, VGG's features), the child itself if its forward runs with a 4-D
    output, else its last descendant to run with a 4-D output (torch.fx graphs call leaves only)."""
    fired = _fired(model, example)
    out = []
    for name, child in model.named_children():
        has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for n, m in child.named_modules() if n)
        if not has_conv:
            continue
        mine = [(p, s) for p, s in fired if (p == name or p.startswith(name + ".")) and len(s) == 4]
        if not mine:
            continue
        whole = [p for p, _ in mine if p == name]
        out.append(whole[0] if whole else mine[-1][0])
    if not out:
        raise ModelError(
            f"cannot pick feature layers of {type(model).__name__} automatically (no top-level block with a "
            "4-D output); set distill.layers to module paths"
        )
    return out


def feature_shapes(model: nn.Module, layers: Sequence[str], example: torch.Tensor) -> list[tuple[int, ...]]:
    """Output shapes of ``layers`` for ``example`` (one eval-mode forward, no grad)."""
    with FeatureTaps(model, layers) as taps:
        was_training = model.training
        with torch.no_grad():
            model.eval()(example)
        model.train(was_training)
        return [tuple(f.shape) for f in taps.get()]


def _match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)


# --------------------------------------------------------------------------- losses


class HintLoss(nn.Module):
    """FitNets hints: ``sum_l mean((adapter_l(s_l) - t_l)^2)``; ``adapter_l`` is a 1x1 conv
    (no bias) from ``student_channels[l]`` to ``teacher_channels[l]``, or identity where equal."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]):
        super().__init__()
        if len(student_channels) != len(teacher_channels) or not student_channels:
            raise ConfigError("HintLoss needs one (student, teacher) channel pair per layer")
        self.adapters = nn.ModuleList(
            nn.Identity() if s == t else nn.Conv2d(s, t, 1, bias=False)
            for s, t in zip(student_channels, teacher_channels, strict=True)
        )

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(())  # a 0-dim CPU scalar: adds to a loss on any device
        for adapter, s, t in zip(self.adapters, student_feats, teacher_feats, strict=True):
            s, t = _match_spatial(adapter(s.float()), t.detach().float().to(s.device))
            total = total + F.mse_loss(s, t)
        return total


def attention_map(f: torch.Tensor, p: int = 2) -> torch.Tensor:
    """``normalize(flatten(mean_c |f|^p))``: one unit-norm spatial map per image."""
    return F.normalize(f.float().abs().pow(p).mean(1).flatten(1), dim=1)


class AttentionLoss(nn.Module):
    """Attention transfer: ``sum_l mean((Q(s_l) - Q(t_l))^2)`` with :func:`attention_map` ``Q``."""

    def __init__(self, *, p: int = 2):
        super().__init__()
        self.p = p

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(())  # a 0-dim CPU scalar: adds to a loss on any device
        for s, t in zip(student_feats, teacher_feats, strict=True):
            s, t = _match_spatial(s, t.detach().to(s.device))
            total = total + (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean()
        return total


class MutualLearningLoss(nn.Module):
    """Deep mutual learning over K >= 2 students' logits (see the module doc). ``forward(logits,
    labels)`` takes the list of the students' logits and returns the summed loss."""

    def __init__(self, *, temperature: float = 1.0):
        super().__init__()
        if not 0.1 <= temperature <= 100.0:
            raise ConfigError(f"MutualLearningLoss temperature must be in [0.1, 100], got {temperature}")
        self.temperature = float(temperature)

    def forward(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if len(logits) < 2:
            raise ConfigError("mutual learning needs at least two students")
        k, t = len(logits), self.temperature
        total = torch.zeros(())  # a 0-dim CPU scalar: adds to a loss on any device
        for i, zi in enumerate(logits):
            zi = zi.float()
            mimic = sum(
                F.kl_div(
                    F.log_softmax(zi / t, 1),
                    F.log_softmax(zj.detach().float() / t, 1),
                    reduction="batchmean",
                    log_target=True,
                )
                for j, zj in enumerate(logits)
                if j != i
            )
            total = total + F.cross_entropy(zi, target) + t * t * mimic / (k - 1)
        return total


class SelfDistillationLoss(nn.Module):
    """Self-distillation with auxiliary heads (see the module doc). ``forward(final_logits,
    features, labels)``; ``features``: the tapped shallower feature maps, one per head."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        *,
        temperature: float = 4.0,
        alpha: float = 0.5,
        beta: float = 1.0,
    ):
        super().__init__()
        if not channels:
            raise ConfigError("self-distillation needs at least one shallower layer for an auxiliary head")
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)) for c in channels
        )
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)

    def forward(
        self, final_logits: torch.Tensor, features: Sequence[torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        z = final_logits.float()
        soft = z.detach()
        total = F.cross_entropy(z, target)
        for head, f in zip(self.heads, features, strict=True):
            a = head(f.float())
            total = total + self.beta * kd_loss(a, soft, target, temperature=self.temperature, alpha=self.alpha)
        return total
