"""The real shared CIFAR-10 JPEG copy: $PQD_DATA_DIR (CI: ../shared/data). Skipped in fresh clones."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pqd.config import DataConfig
from pqd.data import load_data


def test_shared_cifar10_jpeg(cache_dir, caplog):
    root = os.environ.get("PQD_DATA_DIR")
    if not root or not (Path(root) / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip("set PQD_DATA_DIR to the folder holding cifar10-jpeg.tar.gz (CI uses ../shared/data)")
    cfg = DataConfig(dataset="cifar10", root=root, cache_dir=cache_dir)
    s = load_data(cfg)
    assert (len(s.train), len(s.test), s.image_shape) == (50000, 10000, (3, 32, 32))
    assert s.train.classes[:3] == ("airplane", "automobile", "bird") and s.num_classes == 10
    assert s.train.class_counts() == [5000] * 10 and s.test.class_counts() == [1000] * 10
    assert s.mean == pytest.approx((0.491, 0.482, 0.447), abs=0.005)  # the well-known CIFAR-10 means
    # how long decoding takes is a benchmark's business (a timed assert fails on a busy machine); that the
    # second load reads the decoded cache instead of decoding again is this test's
    caplog.clear()  # only the second load's records (the first's are captured too when another test raised the level)
    with caplog.at_level(logging.DEBUG, logger="pqd.data"):
        again = load_data(cfg)
    assert "cache hit" in caplog.text and "decoding" not in caplog.text
    assert again.train.x.data_ptr() != s.train.x.data_ptr() and bool((again.train.x[:100] == s.train.x[:100]).all())
