import pytest
import torch

from pqd.compress.sparsity import global_sparsity, prunable_layers, sparsity_at
from pqd.compress.student import Student
from pqd.config import TrainConfig
from pqd.errors import ConfigError
from pqd.models.registry import create_model
from pqd.stages.prune import PruneConfig, compute_masks, prune

CFG = TrainConfig(batch_size=32, progress=False)


def _model():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=4, width=0.125)


def test_cubic_schedule_reaches_target_then_holds():
    s = [sparsity_at(e, epochs=8, target=0.9, prune_fraction=0.5) for e in range(8)]
    assert s[0] > 0 and s[3] == pytest.approx(0.9) and s[-1] == pytest.approx(0.9)
    assert all(a < b for a, b in zip(s[:4], s[1:4], strict=False)), "ramp must increase"
    inc = [b - a for a, b in zip([0] + s[:4], s[:4], strict=False)]
    assert inc[0] > inc[-1], "cubic schedule prunes fastest early"
    assert sparsity_at(0, epochs=8, target=0.9, schedule="oneshot") == 0.9


def test_exclusions():
    m = _model()
    all_layers = prunable_layers(m)
    assert all_layers[0] == "conv1" and all_layers[-1] == "fc"
    kept = prunable_layers(m, ("@first", "@last", "layer4.*"))
    assert "conv1" not in kept and "fc" not in kept and not any(k.startswith("layer4") for k in kept)
    with pytest.raises(ConfigError, match="matches no prunable layer"):
        prunable_layers(m, ("nope*",))


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_global_masks_hit_exact_sparsity_and_grow_monotonically(criterion):
    m = _model()
    layers = prunable_layers(m, ("@first",))
    g = torch.Generator().manual_seed(0)
    m1 = compute_masks(m, layers, 0.5, criterion=criterion, generator=g)
    m2 = compute_masks(m, layers, 0.8, criterion=criterion, old=m1, generator=g)
    total = sum(v.numel() for v in m1.values())
    assert sum(int((~v).sum()) for v in m1.values()) == round(0.5 * total)
    assert sum(int((~v).sum()) for v in m2.values()) == round(0.8 * total)
    assert all(torch.all(m2[k] <= m1[k]) for k in layers), "pruned weights must stay pruned"


def test_magnitude_is_global_not_per_layer():
    m = _model()
    with torch.no_grad():
        m.layer1[0].conv1.weight.mul_(1e-3)  # a layer of tiny weights is pruned first
    masks = compute_masks(m, prunable_layers(m), 0.05)
    assert masks["layer1.0.conv1"].float().mean() < 0.05
    assert masks["layer4.1.conv2"].float().mean() > 0.9


@pytest.mark.parametrize("schedule, epochs", [("gradual", 3), ("oneshot", 1), ("oneshot", 0)])
def test_prune_stage_hits_target(tiny_data, schedule, epochs):
    cfg = PruneConfig(sparsity=0.7, schedule=schedule)
    out = prune(Student(_model()), cfg, data=tiny_data, epochs=epochs, train_config=CFG)
    layers = prunable_layers(out.model, cfg.exclude)
    assert set(out.masks) == set(layers)
    assert global_sparsity(out.model, layers) == pytest.approx(0.7, abs=0.01)
    assert out.form == "fp32"
