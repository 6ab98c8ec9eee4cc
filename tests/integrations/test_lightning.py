"""docs/LIGHTNING.md's example runs as written: prune, QAT and KD through PQDCallback, and the
INT8 result has the form `pqd run` produces."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="PyTorch Lightning is not installed (pqd's 'lightning' extra)")

from pqd.compress.qat import prepare_qat  # noqa: E402
from pqd.compress.student import Student, convert_student  # noqa: E402
from pqd.models.registry import create_model  # noqa: E402

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "LIGHTNING.md"


def test_lightning_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, source = example_block(DOC)
    ns: dict = {"__name__": "lightning_example"}
    exec(compile(code, source, "exec"), ns)

    cb, module, int8 = ns["pqd_callback"], ns["module"], ns["int8"]
    assert cb.quantized and type(module.model).__name__ == "GraphModule"
    fq = [m for m in module.model.modules() if hasattr(m, "observer_enabled")]
    assert fq and all(int(m.observer_enabled) == 0 for m in fq), "observers must be frozen from freeze_epoch on"
    ref = convert_student(
        Student(
            prepare_qat(create_model("resnet18", num_classes=10, width=0.125), torch.zeros(2, 3, 32, 32)), form="qat"
        )
    )
    assert {n: type(m).__name__ for n, m in int8.named_modules()} == {
        n: type(m).__name__ for n, m in ref.named_modules()
    }
    zeros = total = 0
    for path, mask in cb.masks.items():
        w = int8.get_submodule(path).weight().int_repr()
        assert torch.all(w[~mask.cpu()] == 0), path
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    assert zeros / total >= 0.8 - 1e-3
    assert (tmp_path / "model_int8.pt").is_file()


def test_kd_changes_the_loss_and_trains_the_teacher_not():
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    from pqd.integrations.lightning import PQDCallback

    losses = []

    class M(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    teacher = create_model("resnet18", num_classes=4, width=0.125).eval()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(1)
    student = create_model("resnet18", num_classes=4, width=0.125)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    kw = dict(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    L.Trainer(**kw).fit(M(student), loader)
    cb = PQDCallback(teacher=teacher, temperature=2.0, alpha=0.5)
    L.Trainer(callbacks=[cb], **kw).fit(M(student), loader)
    from pqd.compress.kd import kd_loss

    student.train()
    expected = kd_loss(student(x), teacher(x), y, temperature=2.0, alpha=0.5).item()
    assert losses[0] != pytest.approx(losses[1])
    assert losses[1] == pytest.approx(expected, rel=1e-4)
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())


def example_block(doc: Path, marker: str = "PQDCallback(") -> tuple[str, str]:
    """``(code, source)``: the README's python block holding ``marker`` once it has been moved there,
    else the one in ``doc``."""
    for path in (ROOT / "README.md", doc):
        blocks = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S) if marker in b]
        if blocks:
            assert len(blocks) == 1, f"{path} has several examples with {marker}"
            return blocks[0], str(path)
    raise AssertionError(f"no python block with {marker} in README.md or {doc}")
