"""DDP through every stage: teacher, prune, QAT and KD under ``torchrun`` (2 gloo processes on CPU).

After each stage every rank must hold identical weights, masks and buffers: BN running statistics,
fake-quant observer ranges / scales / zero points and their enable flags. Each rank sees different
images, so any buffer a rank updates locally and nobody syncs shows up as a difference here.

This file is also the worker: ``torchrun ... tests/test_ddp_stages.py OUT`` runs the stages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STAGES = ("teacher", "prune", "quantize", "distill")


def _blobs(n: int, num_classes: int, size: int, seed: int):
    from pqd.data import Dataset

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    colours = (
        torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])[:num_classes].view(num_classes, 3, 1, 1) * 255
    )
    x = colours[y] * 0.6 + torch.rand(n, 3, size, size, generator=g) * 255 * 0.4
    return Dataset(x=x.to(torch.uint8).contiguous(), y=y.long(), classes=tuple(str(i) for i in range(num_classes)))


def _worker(out: Path) -> None:
    import copy
    import warnings

    import torch.distributed as dist

    from pqd.compress.student import Student
    from pqd.config import TrainConfig
    from pqd.data import Splits
    from pqd.models.registry import create_model
    from pqd.stages.distill import DistillConfig, distill
    from pqd.stages.prune import PruneConfig, prune
    from pqd.stages.quantize import QuantizeConfig, quantize
    from pqd.train import train

    warnings.filterwarnings("ignore")
    backend = os.environ.get("PQD_TEST_DDP_BACKEND", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    data = Splits(
        name="blobs",
        train=_blobs(128, 4, 16, 0),
        val=None,
        test=_blobs(32, 4, 16, 1),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        hflip=True,
    )
    cfg = TrainConfig(batch_size=16, progress=False)
    common = dict(data=data, train_config=cfg, seed=0)
    torch.manual_seed(0)
    teacher = create_model("resnet18", num_classes=4, width=0.125).to(device)
    train(teacher, data, epochs=1, lr=0.05, config=cfg, seed=0, tag="teacher", amp=True)

    def snap(model, masks):  # state_dict() aliases the live tensors: copy them before the next stage trains
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, {k: v.clone() for k, v in masks.items()}

    states = {"teacher": snap(teacher, {})}
    student = prune(Student(copy.deepcopy(teacher)), PruneConfig(sparsity=0.5), epochs=1, **common)
    states["prune"] = snap(student.model, student.masks)
    # freeze_fraction 0.5 of 2 epochs: observers and BN statistics update in epoch 1, frozen in epoch 2
    student = quantize(student, QuantizeConfig(freeze_fraction=0.5), epochs=2, **common)
    assert next(student.model.parameters()).device == device, "the QAT student must stay on the training device"
    states["quantize"] = snap(student.model, student.masks)
    # KD with observers live to the last step (no frozen epoch): only the loop's buffer sync keeps them equal
    student.freeze_fraction = 0.0
    student = distill(student, DistillConfig(), teacher=teacher, epochs=2, **common)
    states["distill"] = snap(student.model, student.masks)
    flat = {f"{stage}/model/{k}": v.cpu() for stage, (sd, _) in states.items() for k, v in sd.items()}
    flat.update({f"{stage}/mask/{k}": v.cpu() for stage, (_, m) in states.items() for k, v in m.items()})
    torch.save(flat, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _run(tmp_path, backend: str) -> tuple[dict, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path), PQD_TEST_DDP_BACKEND=backend)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tuple(torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))


@pytest.mark.slow
def test_ddp_stages_keep_every_buffer_identical_across_ranks(tmp_path):
    _check(*_run(tmp_path, "gloo"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_ddp_stages_on_nccl(tmp_path):
    _check(*_run(tmp_path, "nccl"))


def _check(s0: dict, s1: dict) -> None:
    assert s0.keys() == s1.keys()
    differ = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not differ, f"{len(differ)} tensors differ between ranks, e.g. {differ[:5]}"
    for stage in STAGES:  # the run covered what it claims to
        assert any(k.startswith(f"{stage}/model/") and k.endswith("running_mean") for k in s0), stage
    for stage in ("quantize", "distill"):
        scales = [
            k for k in s0 if k.startswith(f"{stage}/model/") and "activation_post_process" in k and k.endswith(".scale")
        ]
        ranges = [k for k in s0 if k.startswith(f"{stage}/model/") and k.endswith(".min_val")]
        assert scales and ranges, stage
        assert all(float(s0[k].min()) > 0 for k in scales) and any(float(s0[k].abs().max()) > 0 for k in ranges)
        assert all(int(s0[k]) == 0 for k in s0 if k.startswith(f"{stage}/model/") and k.endswith("observer_enabled")), (
            "the stage ends with observers frozen"
        )
    masks = [k for k in s0 if k.startswith("distill/mask/")]
    assert masks and sum(int((~s0[k]).sum()) for k in masks) > 0


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
