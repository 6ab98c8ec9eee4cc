from __future__ import annotations

import pqd_user_models as um
import pytest
import torch
from structured_user_models import SENet

from pqd.errors import ModelError
from pqd.registry import create_model
from pqd.structured.graph import ChannelGraph, count_macs, prune_to_widths, round_width
from pqd.structured.importance import global_widths, group_scores, uniform_widths

X = torch.randn(2, 3, 32, 32)

MODELS = {
    "resnet18": lambda: create_model("resnet18", num_classes=10, width=0.125),
    "wrn_28_10": lambda: create_model("wrn_28_10", num_classes=10, width=0.125),
    "vgg16_bn": lambda: create_model("vgg16_bn", num_classes=10, width=0.125),
    "mobilenet_dw": um.MobileNetish,
    "densenet_concat": um.DenseNetish,
    "functional_add": um.Functional,
    "se_inverted_residual": SENet,
}


def trained_bn(model):
    """Random BN statistics, so that pruning really changes outputs."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_prune_keeps_output_shape_and_predicts_layer_shapes(name):
    model = trained_bn(MODELS[name]())
    graph = ChannelGraph(model, X)
    assert graph.groups, "no prunable group found"
    keep = uniform_widths(graph.widths(), 0.5, round_to=8)
    pruned = prune_to_widths(model, keep, example=X)
    assert pruned(X).shape == model(X).shape
    assert count_macs(pruned, X) < count_macs(model, X)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    # the analytic layer shapes the latency model uses match the real pruned model
    real = {r.name: (r.cin, r.cout, r.groups) for r in ChannelGraph(pruned, X).layers}
    pred = {r.name: (r.cin, r.cout, r.groups) for r in graph.layer_shapes(keep)}
    assert pred == real
    # the new widths are the requested ones
    assert ChannelGraph(pruned, X).widths() == {g: min(k, graph.widths()[g]) for g, k in keep.items()}
    # the input model is untouched
    assert ChannelGraph(model, X).widths() == graph.widths()


def test_keeps_the_most_important_channels():
    model = trained_bn(create_model("vgg16_bn", num_classes=10, width=0.125))
    graph = ChannelGraph(model, X)
    first = graph.groups[0]
    with torch.no_grad():
        model.get_submodule(first.id).weight[:4].mul_(100.0)  # four obviously important filters
    pruned = prune_to_widths(model, {first.id: 4}, example=X, round_to=1)
    w = pruned.get_submodule(first.id).weight
    assert w.shape[0] == 4
    assert torch.allclose(w, model.get_submodule(first.id).weight[:4])


def test_round_to():
    assert round_width(13, 64, 8) == 16
    assert round_width(13, 64, 1) == 13
    assert round_width(3, 64, 8) == 8
    assert round_width(70, 64, 16) == 64
    assert round_width(1, 4, 8) == 4  # a group smaller than round_to stays whole


def test_global_ranking_keeps_requested_fraction():
    model = trained_bn(create_model("resnet18", num_classes=10, width=0.25))
    graph = ChannelGraph(model, X)
    scores = group_scores(graph, "l2")
    widths = global_widths(scores, 0.5, round_to=1, min_keep=0.0)
    total, kept = sum(graph.widths().values()), sum(widths.values())
    assert abs(kept - 0.5 * total) <= len(widths)  # ties at the threshold only
    assert len(set(w / graph.widths()[g] for g, w in widths.items())) > 1  # not uniform


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "random"])
def test_criteria_score_every_channel(criterion):
    model = trained_bn(create_model("resnet18", num_classes=10, width=0.125))
    graph = ChannelGraph(model, X)
    scores = group_scores(graph, criterion)
    assert {g: s.numel() for g, s in scores.items()} == graph.widths()


def test_taylor_uses_gradients(tiny_data):
    model = create_model("resnet18", num_classes=4, width=0.125)
    x = torch.zeros(2, 3, 16, 16)
    graph = ChannelGraph(model, x)
    scores = group_scores(graph, "taylor", data=tiny_data, batches=2, batch_size=32)
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert any(s.std() > 0 for s in scores.values())
    assert all(p.grad is None for p in model.parameters())


def test_refuses_quantized_models():
    from pqd.stages.quantize import prepare

    model = create_model("resnet18", num_classes=10, width=0.125)
    qat = prepare(model, X, mode="qat")
    with pytest.raises(ModelError, match="structured pruning must come before quantize, e.g. S:"):
        ChannelGraph(qat, X)
    with pytest.raises(ModelError, match="before quantize"):
        prune_to_widths(qat, {}, example=X)


def test_unknown_group_is_a_clear_error():
    model = create_model("resnet18", num_classes=10, width=0.125)
    with pytest.raises(ModelError, match="unknown group"):
        prune_to_widths(model, {"nope": 3}, example=X)
