from __future__ import annotations

import pqd_user_models as um
import pytest
import torch
from structured_user_models import LayerScaleNet, SENet

from pqd.compress.channels.graph import ChannelGraph, prune_to_widths
from pqd.compress.channels.importance import uniform_widths
from pqd.compress.channels.reshape import fit_to_state_dict
from pqd.errors import CheckpointError
from pqd.models.registry import create_model
from pqd.train.checkpoint import load_checkpoint, save_checkpoint

X = torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: create_model("resnet18", num_classes=10, width=0.125),
        um.MobileNetish,
        um.DenseNetish,
        SENet,
        LayerScaleNet,
    ],
)
def test_restore_pruned_model_from_safetensors(tmp_path, factory):
    torch.manual_seed(0)
    model = factory().eval()
    graph = ChannelGraph(model, X)
    pruned = prune_to_widths(model, uniform_widths(graph.widths(), 0.5, round_to=4), example=X).eval()
    save_checkpoint(tmp_path / "s.safetensors", dict(pruned.state_dict()), {"epoch": 0})
    state = load_checkpoint(tmp_path / "s.safetensors")[0]
    fresh = factory()
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state)
    fit_to_state_dict(fresh, state)
    fresh.load_state_dict(state)
    fresh.eval()
    assert torch.allclose(fresh(X), pruned(X), atol=1e-5)


def test_fit_is_a_no_op_on_matching_shapes():
    model = create_model("resnet18", num_classes=10, width=0.125)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_to_state_dict(model, model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_saved_tensor_of_another_rank_names_the_tensor_and_the_cause():
    model = LayerScaleNet()
    state = dict(model.state_dict())
    state["blocks.0.gamma"] = torch.zeros(8, 1)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.gamma.*\(8, 1\).*\(16,\).*config\.yaml's model"):
        fit_to_state_dict(model, state)
