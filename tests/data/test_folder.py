"""Image-folder datasets: layouts, conversions, errors naming the culprit, the decode cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pqd.config import DataConfig
from pqd.data import Dataset, Splits, load_data
from pqd.errors import DataError


def _load(root: Path, cache_dir: str, **kw) -> Splits:
    return load_data(DataConfig(dataset="folder", root=str(root), cache_dir=cache_dir, **kw))


def test_folder_dir_shapes_labels_and_pixels(folder_factory, cache_dir):
    root, src = folder_factory(size=(6, 5))
    s = _load(root, cache_dir)
    assert s.name == f"folder:{root}"
    assert s.train.classes == ("cat", "dog", "emu") and s.num_classes == 3
    assert s.image_shape == (3, 5, 6) and s.hflip is True and s.val is None
    for ds, (x, y) in ((s.train, src["train"]), (s.test, src["test"])):
        assert ds.x.dtype == torch.uint8 and ds.x.is_contiguous() and ds.y.dtype == torch.int64
        assert torch.equal(ds.x, torch.from_numpy(x)), "PNG pixels must round-trip exactly"
        assert ds.y.tolist() == y.tolist()
    assert len(s.train) == 12 and len(s.test) == 6


@pytest.mark.parametrize("prefix", ["", "wrapper/"])
def test_folder_tar_gz_matches_dir(helpers, folder_factory, tmp_path, cache_dir, prefix):
    root, _ = folder_factory()
    archive = helpers.tar_dir(root, tmp_path / "imgs.tar.gz", prefix=prefix)
    a, b = _load(root, cache_dir), _load(archive, cache_dir)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    assert torch.equal(a.train.y, b.train.y) and a.train.classes == b.train.classes
    assert a.mean == b.mean and a.std == b.std


def test_modes_are_converted_to_rgb(tmp_path, cache_dir):
    root = tmp_path / "modes"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    Image.fromarray(grey, mode="L").save(root / "train/a/grey.png")
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(root / "train/a/rgba.png")
    Image.new("RGB", (5, 4), (200, 100, 50)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "train/b/pal.png")
    Image.new("RGB", (5, 4), (1, 2, 3)).save(root / "test/a/x.png")
    Image.new("RGB", (5, 4), (1, 2, 3)).save(root / "test/b/x.png")
    x = _load(root, cache_dir).train.x
    assert x.shape == (3, 3, 4, 5)
    assert all(torch.equal(x[0, c], torch.from_numpy(grey)) for c in range(3)), "grey replicated to 3 channels"
    assert x[1, :, 0, 0].tolist() == [10, 20, 30]
    assert x[2, :, 0, 0].tolist() == [200, 100, 50]


def test_hidden_files_are_ignored(folder_factory, cache_dir):
    root, _ = folder_factory()
    (root / "train/cat/.DS_Store").write_bytes(b"junk")
    (root / "train/.hidden").mkdir()
    assert len(_load(root, cache_dir).train) == 12


def test_missing_path(tmp_path, cache_dir):
    with pytest.raises(DataError, match=r"data.root .*nope. does not exist"):
        _load(tmp_path / "nope", cache_dir)


def test_no_test_folder(folder_factory, cache_dir):
    root, _ = folder_factory()
    for p in sorted((root / "test").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (root / "test").rmdir()
    with pytest.raises(DataError, match=r"no test/ folder"):
        _load(root, cache_dir)


@pytest.mark.parametrize("as_tar", [False, True])
def test_empty_class_named(helpers, folder_factory, tmp_path, cache_dir, as_tar):
    root, _ = folder_factory()
    (root / "train/zebra").mkdir()
    (root / "test/zebra").mkdir()
    src = helpers.tar_dir(root, tmp_path / "x.tar.gz") if as_tar else root
    with pytest.raises(DataError, match=r"train/zebra .*empty"):
        _load(src, cache_dir)


def test_class_mismatch_lists_differences(helpers, folder_factory, cache_dir):
    root, _ = folder_factory()
    helpers.write_folder(root / "_extra", classes=("yak",))
    (root / "_extra/train/yak").rename(root / "train/yak")
    (root / "test/emu").rename(root / "test/gnu")
    with pytest.raises(DataError, match=r"only in train/: emu, yak; only in test/: gnu"):
        _load(root, cache_dir)


@pytest.mark.parametrize("as_tar", [False, True])
def test_unreadable_image_named(helpers, folder_factory, tmp_path, cache_dir, as_tar):
    root, _ = folder_factory()
    (root / "train/dog/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    src = helpers.tar_dir(root, tmp_path / "x.tar.gz") if as_tar else root
    with pytest.raises(DataError, match=r"cannot read image .*train/dog/broken\.jpg"):
        _load(src, cache_dir)


def test_truncated_image_named(folder_factory, cache_dir):
    root, _ = folder_factory(fmt="jpg")
    p = root / "test/emu/001.jpg"
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(DataError, match=r"test/emu/001\.jpg"):
        _load(root, cache_dir)


def test_inconsistent_size_named(folder_factory, cache_dir):
    root, _ = folder_factory(size=(6, 5))
    Image.new("RGB", (7, 5)).save(root / "test/dog/odd.png")
    with pytest.raises(DataError, match=r"test/dog/odd\.png is 7x5 but .* is 6x5"):
        _load(root, cache_dir)


def test_truncated_archive(helpers, folder_factory, tmp_path, cache_dir):
    root, _ = folder_factory(n_train=30)
    archive = helpers.tar_dir(root, tmp_path / "x.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"x\.tar\.gz is corrupt or truncated"):
        _load(archive, cache_dir)


def test_not_an_archive(tmp_path, cache_dir):
    f = tmp_path / "data.tar.gz"
    f.write_bytes(b"hello")
    with pytest.raises(DataError, match="data.tar.gz is neither a directory nor a tar"):
        _load(f, cache_dir)


def test_second_load_hits_cache(helpers, folder_factory, tmp_path, cache_dir, monkeypatch, caplog):
    root, _ = folder_factory()
    archive = helpers.tar_dir(root, tmp_path / "x.tar.gz")
    first = _load(archive, cache_dir)
    assert not list(Path(cache_dir, "decoded").glob(".tmp-*")), "temp dir renamed into place"

    def boom(*a, **k):
        raise AssertionError("decoder must not run on a cache hit")

    monkeypatch.setattr("pqd.data.folder.decode_image", boom)
    with caplog.at_level(logging.DEBUG, logger="pqd.data"):
        second = _load(archive, cache_dir)
    assert "cache hit" in caplog.text
    assert torch.equal(first.train.x, second.train.x) and first.train.classes == second.train.classes

    # a changed source (new mtime) is a cache miss: the decoder runs again
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="must not run"):
        _load(archive, cache_dir)


def test_damaged_cache_entry_is_redecoded(folder_factory, cache_dir):
    root, _ = folder_factory()
    first = _load(root, cache_dir)
    (npy,) = Path(cache_dir, "decoded").glob("*/x_train.npy")
    npy.write_bytes(npy.read_bytes()[:50])
    assert torch.equal(_load(root, cache_dir).train.x, first.train.x)


def test_cache_dir_falls_back_to_env(folder_factory, tmp_path):
    root, _ = folder_factory()
    load_data(DataConfig(dataset="folder", root=str(root)))
    assert list((tmp_path / "env-cache" / "decoded").glob("folder-*/x_train.npy"))


def test_dataset_validates():
    from pqd.errors import DataError

    with pytest.raises(DataError, match="uint8.*pqd.data.adapters.as_dataset"):
        Dataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), ("a",))
    with pytest.raises(DataError, match="labels outside"):
        Dataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ("a",))
