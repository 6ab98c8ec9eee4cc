import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pqd.config import TrainConfig
from pqd.measure import predict, top1
from pqd.models.registry import create_model
from pqd.train import train
from pqd.train.loop import apply_masks

CFG = TrainConfig(batch_size=32, progress=False, warmup_epochs=0.5)


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet18", num_classes=4, width=0.125)


def test_training_learns(tiny_data):
    m = _model()
    before = top1(predict(m, tiny_data.test, mean=tiny_data.mean, std=tiny_data.std), tiny_data.test.y)
    train(m, tiny_data, epochs=4, lr=0.02, config=CFG)
    after = top1(predict(m, tiny_data.test, mean=tiny_data.mean, std=tiny_data.std), tiny_data.test.y)
    assert after > 0.6 and after > before


def test_masks_stay_zero_through_training(tiny_data):
    m = _model()
    w = m.layer1[0].conv1.weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    masks = {"layer1.0.conv1": mask}
    apply_masks(m, masks)
    train(m, tiny_data, epochs=1, lr=0.05, config=CFG, masks=masks)
    assert torch.all(m.layer1[0].conv1.weight[~mask] == 0)
    assert torch.any(m.layer1[0].conv1.weight[mask] != 0)


class _Killed(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted(tiny_data, tmp_path):
    ref = train(_model(), tiny_data, epochs=3, lr=0.05, config=CFG, seed=1)

    def die_at_2(epoch):
        if epoch == 2:
            raise _Killed

    ckpt = tmp_path / "epoch.safetensors"
    with pytest.raises(_Killed):
        train(_model(), tiny_data, epochs=3, lr=0.05, config=CFG, seed=1, checkpoint=ckpt, before_epoch=die_at_2)
    assert ckpt.exists()
    calls = []
    resumed = train(
        _model(seed=99), tiny_data, epochs=3, lr=0.05, config=CFG, seed=1, checkpoint=ckpt, before_epoch=calls.append
    )
    assert calls == [2], "only the unfinished epoch may run again"
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_distributed_two_gloo_processes(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(tmp_path),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "DDP replicas diverged"
    acc = float((tmp_path / "acc.txt").read_text())
    assert acc > 0.5
    assert (tmp_path / "epoch.safetensors").exists(), "rank 0 must write the checkpoint"


def test_tracker_gets_per_epoch_metrics(tiny_data):
    class Recorder:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, dict(metrics)))

        def close(self):
            pass

    rec = Recorder()
    train(_model(), tiny_data, epochs=2, lr=0.05, config=CFG, tag="prune", tracker=rec)
    assert [s for s, _ in rec.calls] == [0, 1]
    assert set(rec.calls[0][1]) == {"prune.loss", "prune.train_top1", "prune.images_per_s", "prune.lr"}
    assert all(0 <= m["prune.train_top1"] <= 1 and m["prune.loss"] > 0 for _, m in rec.calls)


def test_a_dataloader_is_refused_naming_the_adapter():
    """A raw DataLoader raised AttributeError deep inside training; now a DataError naming as_splits."""
    from torch.utils.data import DataLoader, TensorDataset

    from pqd.compress.student import Student
    from pqd.errors import DataError
    from pqd.stages.structured import structured_prune
    from pqd.train.loop import train as train_fn

    loader = DataLoader(TensorDataset(torch.rand(8, 3, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(
        DataError,
        match=r"pqd.train.train\(model, data\) takes a pqd.data.Splits, got a "
        r"torch.utils.data.dataloader.DataLoader.*pqd.data.adapters.as_splits",
    ):
        train_fn(model, loader, epochs=1, lr=0.1)
    with pytest.raises(DataError, match=r"structured_prune\(..., data=\) takes a pqd.data.Splits.*as_splits"):
        structured_prune(Student(model), None, data=loader, epochs=1, train_config=None)
