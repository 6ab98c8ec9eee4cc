from __future__ import annotations

import numpy as np
import pytest
import torch
from test_graph import MODELS, X, trained_bn

from pqd.compress.channels.graph import ChannelGraph, prune_to_widths
from pqd.compress.channels.importance import uniform_widths
from pqd.deploy.runtimes import available
from pqd.structured.latency_model import export_int8

pytestmark = pytest.mark.skipif(
    not (available("onnx") and available("onnxscript") and available("onnxruntime")), reason="needs pqd[onnx]"
)


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_model_exports_int8_and_runs(tmp_path, name):
    from pqd.deploy.runtimes import OpenVinoRunner, OrtRunner

    model = trained_bn(MODELS[name]())
    graph = ChannelGraph(model, X)
    pruned = prune_to_widths(model, uniform_widths(graph.widths(), 0.5, round_to=8), example=X)
    spec = export_int8(pruned, X, "onnxruntime", tmp_path / "m")
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref = pruned(torch.from_numpy(x)).detach().numpy()
    outs = [OrtRunner(spec["path"], threads=1, spinning=False)(x)]
    if available("openvino"):
        outs.append(OpenVinoRunner(spec["path"], threads=1)(x))
    for out in outs:
        assert out.shape == ref.shape
        assert np.isfinite(out).all()
        assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.9  # INT8 of the same pruned network
