"""scikit-learn's bundled 8x8 handwritten digits, made CIFAR-shaped (3x32x32 uint8). Works offline."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pqd.data.base import Raw

SPLIT_SEED = 0  # fixed, independent of the run seed: the test set never moves
TEST_FRACTION = 0.2


def read_digits() -> Raw:
    """1797 digits: values 0-16 → [0, 1], bilinear upsample to 32x32, → uint8, grey replicated to 3 channels;
    stratified 80/20 train/test split with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    img = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    img = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)
    x = (img * 255).round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous().numpy()
    y = d.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    train, test = np.sort(train), np.sort(test)
    return Raw(x[train], y[train], x[test], y[test], tuple(str(i) for i in range(10)))
