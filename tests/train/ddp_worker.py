"""Run by tests/train/test_loop.py under torchrun: 2 gloo processes train one model."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import _blobs  # noqa: E402

from pqd.config import TrainConfig  # noqa: E402
from pqd.data import Splits  # noqa: E402
from pqd.measure import predict, top1  # noqa: E402
from pqd.models.registry import create_model  # noqa: E402
from pqd.train import train  # noqa: E402

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
data = Splits(
    name="blobs",
    train=_blobs(256, 4, 16, 0),
    val=None,
    test=_blobs(64, 4, 16, 1),
    mean=(0.5,) * 3,
    std=(0.25,) * 3,
    hflip=True,
)
torch.manual_seed(0)
model = create_model("resnet18", num_classes=4, width=0.125)
train(
    model,
    data,
    epochs=4,
    lr=0.02,
    config=TrainConfig(batch_size=16, progress=False),
    checkpoint=out / "epoch.safetensors",
)
torch.save(model.state_dict(), out / f"rank{rank}.pt")
if rank == 0:
    (out / "acc.txt").write_text(str(top1(predict(model, data.test, mean=data.mean, std=data.std), data.test.y)))
dist.destroy_process_group()
