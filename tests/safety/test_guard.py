"""Divergence is noticed; a chance-level teacher is flagged."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pqd.config import TrainConfig
from pqd.errors import DivergenceError
from pqd.models.registry import create_model
from pqd.train.guard import DivergenceGuard, check_sparsity, check_teacher_quality, first_nonfinite
from pqd.train.loop import train

CFG = TrainConfig(batch_size=64, progress=False)


def test_a_huge_lr_is_stopped_by_the_training_loops_guard(tiny_data):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, width=0.125)
    with pytest.raises(DivergenceError, match=r"training diverged.*epoch 1"):
        train(model, tiny_data, epochs=1, lr=1e6, config=CFG)


def test_a_nan_model_at_the_end_of_an_epoch_names_the_lr_to_lower():
    model = create_model("resnet18", num_classes=4, width=0.125)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    assert first_nonfinite(model) is not None
    guard = DivergenceGuard("teacher", lr_key="teacher.lr", base_lr=1e6)
    with pytest.raises(
        DivergenceError,
        match=r"teacher: training diverged: .* at epoch 1, step 4 "
        r"\(learning rate 3e\+04 at that step; teacher.lr = 1e\+06\).*--set teacher.lr=",
    ):
        guard.end_epoch(model, epoch=0, step=3, lr=3e4)


def _loop(guard: DivergenceGuard, losses, every_epoch_steps=4):
    for i, v in enumerate(losses):
        epoch, step = divmod(i, every_epoch_steps)
        guard.step(torch.tensor(v), epoch=epoch, step=step, lr=0.1)


def test_step_flags_are_read_every_n_steps():
    g = DivergenceGuard("distill", every=2)
    _loop(g, [1.0, 0.9, 0.8, 0.7])
    with pytest.raises(
        DivergenceError, match=r"distill: training diverged: the loss became NaN/inf at epoch 1, between steps 3 and 4"
    ):
        _loop(DivergenceGuard("distill", every=2), [1.0, 0.9, float("nan"), 0.7])
    with pytest.raises(DivergenceError, match="epoch 2, step 1"):
        _loop(DivergenceGuard("prune", every=1), [1.0, 1.0, 1.0, 1.0, float("inf")])
    with pytest.raises(DivergenceError, match="exceeded 100"):
        _loop(DivergenceGuard("prune", every=1, max_loss=100.0), [1.0, 1e4])


def test_end_epoch_reads_pending_flag():
    g = DivergenceGuard("teacher", every=1000)
    g.step(torch.tensor(float("nan")), epoch=0, step=0)
    g.step(torch.tensor(1.0), epoch=0, step=1)
    with pytest.raises(DivergenceError, match="between steps 1 and 2"):
        g.end_epoch(nn.Linear(2, 2), epoch=0, step=1)
    g.end_epoch(nn.Linear(2, 2), epoch=1, step=1)  # clean model, no pending flag


def test_explain_turns_observer_error_into_divergence():
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = prepare_qat_fx(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).train(),
            get_default_qat_qconfig_mapping("x86"),
            (torch.zeros(1, 3, 8, 8),),
        )
    with torch.no_grad():
        next(m.parameters()).fill_(float("nan"))
    g = DivergenceGuard("quantize", lr_key="quantize.lr")
    with pytest.raises(RuntimeError, match="zero_point") as info:
        m(torch.randn(2, 3, 8, 8))  # the raw error a user would otherwise see
    err = g.explain(info.value, m, epoch=2, step=9, lr=0.01)
    assert isinstance(err, DivergenceError) and "quantize: training diverged" in str(err) and "epoch 3" in str(err)
    assert g.explain(RuntimeError("other"), nn.Linear(2, 2), epoch=0, step=0) is None


def test_teacher_quality():
    with pytest.raises(DivergenceError, match=r"top-1 10.00% is at chance level \(10.00% for 10 classes"):
        check_teacher_quality(0.10, 10)
    with pytest.raises(DivergenceError, match="chance"):
        check_teacher_quality(float("nan"), 10)
    with pytest.raises(DivergenceError, match="predicts class 3 for 95.0%"):
        check_teacher_quality(0.5, 2, min_ratio=0.5, pred_counts=[5, 0, 0, 95])
    check_teacher_quality(0.97, 10, pred_counts=[10] * 10)
    # a slice that is almost all one class, answered right: not a collapse; answered with that class regardless: one
    assert check_teacher_quality(0.99, 10, pred_counts=[99, 1] + [0] * 8, label_counts=[99, 1] + [0] * 8) is None
    with pytest.raises(DivergenceError, match="collapsed"):
        check_teacher_quality(0.5, 10, pred_counts=[95, 5] + [0] * 8, label_counts=[10] * 10)
    assert "chance level" in check_teacher_quality(0.1, 10, strict=False)
    assert check_teacher_quality(0.9, 10, strict=False) is None
    check_teacher_quality(0.2, 100)


def test_sparsity_far_from_target():
    with pytest.raises(DivergenceError, match=r"achieved sparsity 0.0% is far from the target 50.0%"):
        check_sparsity(0.5, 0.0)
    check_sparsity(0.5, 0.49)


def test_flag_is_all_reduced_under_ddp(tmp_path):
    """Two gloo ranks: only rank 1 sees a NaN loss, both must raise at the same read."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.txt")) == ["raised", "raised"]


def _ddp_worker(rank, world, folder):
    import os
    from pathlib import Path

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getppid() % 1000))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = DivergenceGuard("distill", every=2)
        g.step(torch.tensor(1.0), epoch=0, step=0)
        try:
            g.step(torch.tensor(float("nan") if rank == 1 else 1.0), epoch=0, step=1)
            result = "finished"
        except DivergenceError:
            result = "raised"
        Path(folder, f"rank{rank}.txt").write_text(result)
    finally:
        dist.destroy_process_group()
