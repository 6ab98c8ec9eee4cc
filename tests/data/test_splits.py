"""digits, seeded stratified subsets / validation split, train statistics."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pqd.config import DataConfig
from pqd.data import channel_stats, load_data, stratified_split, stratified_subset


def test_digits_offline_fixed_test_split(cache_dir):
    a = load_data(DataConfig(dataset="digits", cache_dir=cache_dir), seed=0)
    b = load_data(DataConfig(dataset="digits", cache_dir=cache_dir), seed=7)
    assert a.name == "digits" and a.num_classes == 10 and a.train.classes == tuple("0123456789")
    assert a.image_shape == (3, 32, 32) and a.hflip is False
    assert len(a.train) == 1437 and len(a.test) == 360
    assert a.train.x.dtype == torch.uint8 and int(a.train.x.max()) == 255 and int(a.train.x.min()) == 0
    assert torch.equal(a.train.x[:, 0], a.train.x[:, 2]), "grey replicated to 3 channels"
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y), "test split ignores the run seed"
    counts = a.test.class_counts()
    assert max(counts) - min(counts) <= 2, f"stratified test split, got {counts}"
    # the digits pixels come from sklearn's 0-16 images: a 0 digit row-sum pattern differs from 1
    assert not torch.equal(a.train.x[a.train.y == 0][0], a.train.x[a.train.y == 1][0])


def test_train_subset_balanced_and_seeded(cache_dir):
    cfg = DataConfig(dataset="digits", train_subset=105, test_subset=50, cache_dir=cache_dir)
    a, b, c = load_data(cfg, seed=1), load_data(cfg, seed=1), load_data(cfg, seed=2)
    assert len(a.train) == 105 and len(a.test) == 50
    assert sorted(a.train.class_counts()) == [10] * 5 + [11] * 5
    assert a.test.class_counts() == [5] * 10
    assert torch.equal(a.train.x, b.train.x), "same seed, same subset"
    assert not torch.equal(a.train.x, c.train.x), "another seed, another subset"
    assert torch.equal(a.test.x, c.test.x), "test subset does not move with the seed"


def test_val_split_stratified_disjoint_seeded(cache_dir):
    cfg = DataConfig(dataset="digits", val_fraction=0.2, cache_dir=cache_dir)
    a, b, c = load_data(cfg, seed=3), load_data(cfg, seed=3), load_data(cfg, seed=4)
    assert a.val is not None and len(a.val) == round(0.2 * 1437) and len(a.train) + len(a.val) == 1437
    for cls, (n_val, n_tr) in enumerate(zip(a.val.class_counts(), a.train.class_counts(), strict=True)):
        assert abs(n_val - 0.2 * (n_val + n_tr)) <= 1, f"class {cls}: {n_val} val of {n_val + n_tr}"
    full = load_data(DataConfig(dataset="digits", cache_dir=cache_dir))
    key = lambda ds: Counter(bytes(img.numpy()) + bytes([int(lab)]) for img, lab in zip(ds.x, ds.y, strict=True))
    assert key(a.val) + key(a.train) == key(full.train), "train and val partition the original train split"
    assert torch.equal(a.val.x, b.val.x) and not torch.equal(a.val.x, c.val.x)
    assert a.mean == channel_stats(a.train.x)[0] and a.mean != full.mean, "stats from the final train split"


def test_subset_then_val(cache_dir):
    s = load_data(DataConfig(dataset="digits", train_subset=200, val_fraction=0.1, cache_dir=cache_dir), seed=0)
    assert len(s.train) == 180 and len(s.val) == 20 and s.val.class_counts() == [2] * 10


def test_stratified_subset_respects_small_classes():
    y = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    idx = stratified_subset(y, 12, np.random.default_rng(0))
    assert np.bincount(y[idx].numpy()).tolist() == [2, 5, 5]
    assert len(set(idx.tolist())) == 12
    assert len(stratified_subset(y, 99, np.random.default_rng(0))) == 22, "asking for more keeps everything"


def test_stratified_split_holds_out_at_least_one():
    y = torch.tensor([0, 0, 1, 1, 1])
    keep, held = stratified_split(y, 0.01, np.random.default_rng(0))
    assert len(held) == 1 and sorted([*keep, *held]) == [0, 1, 2, 3, 4]


def test_channel_stats_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 7, 5), generator=g, dtype=torch.uint8)
    x[:, 2] = 77  # a constant channel gets std 1 (no division by zero)
    mean, std = channel_stats(x)
    xf = x.double() / 255
    assert mean == pytest.approx(xf.mean((0, 2, 3)).tolist(), abs=1e-12)
    assert std[:2] == pytest.approx(xf.std((0, 2, 3), unbiased=False)[:2].tolist(), abs=1e-12)
    assert std[2] == 1.0
