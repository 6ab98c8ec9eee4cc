"""docs/PLAIN_LOOP.md's example runs as written and yields the INT8 form `pqd run` produces."""

import re
from pathlib import Path

import torch

from pqd.compress.qat import prepare_qat
from pqd.compress.sparsity import global_sparsity
from pqd.models.registry import create_model
from pqd.compress.student import convert_student, Student

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
    """``(code, source)``: the README's python block holding ``marker`` once it has been moved there,
    else the one in ``doc``."""
    for path in (ROOT / "README.md", doc):
        blocks = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S) if marker in b]
        if blocks:
            assert len(blocks) == 1, f"{path} has several examples with {marker}"
            return blocks[0], str(path)
    raise AssertionError(f"no python block with {marker} in README.md or {doc}")
