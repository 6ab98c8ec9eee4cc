"""docs/PLAIN_LOOP.md's example runs as written and yields the INT8 form `pqd run` produces."""

import contextlib
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import pqd.compress.qat
from pqd.compress.qat import prepare_qat
from pqd.compress.sparsity import global_sparsity
from pqd.compress.student import Student, convert_student
from pqd.config import DataConfig
from pqd.data import load_data
from pqd.errors import CollapseWarning
from pqd.integrations.evaluation import evaluate
from pqd.models.registry import create_model

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "PLAIN_LOOP.md"


def pipeline_form(num_classes: int, shape: tuple[int, ...]) -> dict[str, str]:
    """Module path -> class of the INT8 model the pipeline's convert makes for the same architecture."""
    model = create_model("resnet18", num_classes=num_classes, width=0.125)
    int8 = convert_student(Student(prepare_qat(model, torch.zeros(2, *shape)), form="qat"))
    return {n: type(m).__name__ for n, m in int8.named_modules()}


def test_plain_loop_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, source = example_block(DOC)
    ns: dict = {"__name__": "plain_loop_example"}
    exec(compile(code, source, "exec"), ns)

    int8, scripted, masks = ns["int8"], ns["scripted"], ns["masks"]
    assert isinstance(int8, torch.fx.GraphModule)
    assert {n: type(m).__name__ for n, m in int8.named_modules()} == pipeline_form(10, (3, 32, 32))
    assert isinstance(scripted, torch.jit.ScriptModule) and (tmp_path / "model_int8.pt").is_file()
    # pruned positions are zero in the INT8 weights, at the target global sparsity
    zeros = total = 0
    for path, mask in masks.items():
        w = int8.get_submodule(path).weight().int_repr()
        assert torch.all(w[~mask.cpu()] == 0), path
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    assert zeros / total >= 0.8 - 1e-3
    assert global_sparsity(ns["qat"], list(masks)) >= 0.8 - 1e-3
    deployed = torch.jit.load(str(tmp_path / "model_int8.pt"))
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(deployed(x), scripted(x))


def example_block(doc: Path, marker: str = "GlobalPruner(") -> tuple[str, str]:
    """``(code, source)``: the one python block of ``doc`` holding ``marker`` (the example lives there only)."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S) if marker in b]
    assert len(blocks) == 1, f"{doc} must have exactly one python example with {marker}, has {len(blocks)}"
    readme = (ROOT / "README.md").read_text()
    assert marker not in "".join(re.findall(r"```python\n(.*?)```", readme, flags=re.S)), (
        "the example lives in docs only"
    )
    return blocks[0], str(doc)


def _user_factories():
    import sys

    here = Path(__file__).parents[1]
    for folder in (here / "robustness", here / "structured"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import pqd_user_models
    import structured_user_models

    return {"depthwise": pqd_user_models.mobilenet, "se": structured_user_models.SENet}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["depthwise", "se"])
def test_plain_loop_recipe_keeps_the_fake_quant_accuracy_on_depthwise_and_se_models(arch, tmp_path, monkeypatch):
    """The example, on digits and a trained depthwise / SE model: it ends within 2 points of the
    fake-quant accuracy it had when observers and BN statistics froze, and frozen() stays quiet."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    data = load_data(DataConfig(dataset="digits", test_subset=300))
    x, y = data.train.x.float() / 255, data.train.y
    x_test, y_test = data.test.x.float() / 255, data.test.y
    teacher = _user_factories()[arch](10)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    for _ in range(12):
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, drop_last=True):
            optimizer.zero_grad()
            F.cross_entropy(teacher(xb), yb).backward()
            optimizer.step()

    def accuracy(model) -> float:
        return evaluate(model, DataLoader(TensorDataset(x_test, y_test), batch_size=100))["top1"]

    at_freeze = []
    original = pqd.compress.qat.frozen

    @contextlib.contextmanager
    def measured(model, held_out, **kw):
        with original(model, held_out, **kw) as check:
            at_freeze.append(accuracy(model))
            model.train()
            yield check

    monkeypatch.setattr(pqd.compress.qat, "frozen", measured)
    code, source = example_block(DOC)
    code = code.replace(
        "images, labels = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))", "images, labels = USER_DATA"
    )
    code = code.replace("held_out = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))", "held_out = USER_HELD_OUT")
    code = code.replace('teacher = pqd.create_model("resnet18", num_classes=10, width=0.125)', "teacher = USER_TEACHER")
    assert code.count("USER_") == 3, "the example's data and teacher lines changed: update this test"
    ns = {
        "__name__": "plain_loop_example",
        "USER_DATA": (x[160:], y[160:]),
        "USER_HELD_OUT": (x[:160], y[:160]),
        "USER_TEACHER": teacher,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        exec(compile(code, source, "exec"), ns)
    (before,) = at_freeze
    assert before > 0.5, f"the fake-quant model is not good before freezing ({before:.3f}): the test says nothing"
    assert accuracy(ns["qat"]) >= before - 0.02
    assert accuracy(ns["int8"]) >= before - 0.02


def test_frozen_warns_when_training_after_freezing_collapses_the_model():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, width=0.125)
    x, y = torch.rand(32, 3, 16, 16), torch.arange(32) % 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):  # learn the batch
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    qat = prepare_qat(model, x[:2])
    with torch.no_grad():
        qat(x)  # observers see the data once, as QAT training would have done before the freeze boundary
    with (
        pytest.warns(CollapseWarning, match="lower the learning rate after freeze"),
        pqd.compress.qat.frozen(qat, (x, y)) as check,
        torch.no_grad(),
    ):  # what a much too high learning rate does to the weights
        for p in qat.parameters():
            p.add_(torch.randn_like(p) * 10)
    assert check.before[0] - check.after[0] > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        with pqd.compress.qat.frozen(qat, (x, y)):
            pass  # nothing trained: no drop, no warning


@pytest.mark.slow
def test_structured_pruning_example_runs_and_removes_channels(tmp_path, monkeypatch):
    pytest.importorskip("torch_pruning", reason="structured pruning needs the 'structured' extra (Torch-Pruning)")
    pytest.importorskip("onnxruntime", reason="the example times its models in ONNX Runtime")
    monkeypatch.chdir(tmp_path)
    code, source = example_block(DOC, marker="structured_prune(")
    ns: dict = {"__name__": "structured_example"}
    exec(compile(code, source, "exec"), ns)
    record, pruned = ns["record"], ns["pruned"]
    widths, dense = record["widths"], record["dense_widths"]
    assert set(widths) == set(dense) and all(widths[g] <= dense[g] for g in dense)
    assert any(widths[g] < dense[g] for g in dense) and record["macs"] < record["dense_macs"]
    assert record["measured_ms"] > 0 and record["budget_ms_same_run"] > 0 and isinstance(record["met"], bool)
    assert pruned(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
