"""CIFAR sources: standard python archive / extracted folder / image-folder copies, safe unpickling, download."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pqd.config import DataConfig
from pqd.data import cifar, load_data, restricted_loads
from pqd.errors import DataError


def _cfg(cache_dir: str, root: Path | str | None = None, dataset: str = "cifar10", **kw) -> DataConfig:
    return DataConfig(dataset=dataset, root=None if root is None else str(root), cache_dir=cache_dir, **kw)


def _check(s, src, classes):
    for ds, (x, y) in ((s.train, src["train"]), (s.test, src["test"])):
        assert ds.x.dtype == torch.uint8 and ds.y.dtype == torch.int64
        assert torch.equal(ds.x, torch.from_numpy(x)) and ds.y.tolist() == y.tolist()
    assert s.train.classes == tuple(classes) and s.hflip is True and s.image_shape == (3, 32, 32)


@pytest.fixture
def archive_dir(tmp_path, helpers) -> tuple[Path, dict]:
    d = tmp_path / "dl"
    d.mkdir()
    return d, helpers.cifar10(d / "cifar-10-python.tar.gz")


def test_python_archive_in_dir_file_and_extracted(archive_dir, tmp_path, cache_dir, helpers):
    d, src = archive_dir
    s = load_data(_cfg(cache_dir, d))
    assert s.name == "cifar10" and s.num_classes == 10 and len(s.train) == 30 and len(s.test) == 6
    _check(s, src, helpers.CIFAR10_NAMES)
    _check(load_data(_cfg(cache_dir, d / "cifar-10-python.tar.gz")), src, helpers.CIFAR10_NAMES)
    with tarfile.open(d / "cifar-10-python.tar.gz") as tf:
        tf.extractall(tmp_path / "ex", filter="data")
    _check(load_data(_cfg(cache_dir, tmp_path / "ex")), src, helpers.CIFAR10_NAMES)
    _check(load_data(_cfg(cache_dir, tmp_path / "ex" / "cifar-10-batches-py")), src, helpers.CIFAR10_NAMES)


def test_pickle_protocol_5_and_old_numpy_core_names(tmp_path, cache_dir, helpers):
    src = helpers.cifar10(tmp_path / "p5.tar.gz", protocol=5)
    _check(load_data(_cfg(cache_dir, tmp_path / "p5.tar.gz")), src, helpers.CIFAR10_NAMES)
    # numpy 1.x pickles (like the real archive) name numpy.core.multiarray._reconstruct
    blob = pickle.dumps({b"data": np.arange(6, dtype=np.uint8)}, protocol=3).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"
    )
    assert b"numpy.core.multiarray" in blob
    assert restricted_loads(blob, "x")[b"data"].tolist() == list(range(6))


def test_root_none_uses_cache_downloads(tmp_path, cache_dir, helpers):
    (Path(cache_dir) / "downloads").mkdir(parents=True)
    src = helpers.cifar10(Path(cache_dir) / "downloads" / "cifar-10-python.tar.gz")
    _check(load_data(_cfg(cache_dir)), src, helpers.CIFAR10_NAMES)


def test_cifar100_uses_fine_labels(tmp_path, cache_dir, helpers):
    src = helpers.cifar100(tmp_path / "cifar-100-python.tar.gz")
    s = load_data(_cfg(cache_dir, tmp_path, dataset="cifar100"))
    assert s.name == "cifar100" and s.num_classes == 100
    _check(s, src, [f"c{i:02d}" for i in range(100)])


def test_image_folder_copies(tmp_path, cache_dir, helpers):
    root = tmp_path / "jpg"
    helpers.write_folder(root, classes=helpers.CIFAR10_NAMES, n_train=2, n_test=1, size=(32, 32), fmt="jpg")
    shared = tmp_path / "shared"
    shared.mkdir()
    helpers.tar_dir(root, shared / "cifar10-jpeg.tar.gz")
    a = load_data(_cfg(cache_dir, root))
    b = load_data(_cfg(cache_dir, shared))  # a dir holding cifar10-jpeg.tar.gz, like ../shared/data
    c = load_data(_cfg(cache_dir, shared / "cifar10-jpeg.tar.gz"))
    assert a.train.classes == tuple(helpers.CIFAR10_NAMES) and len(a.train) == 20 and len(a.test) == 10
    assert torch.equal(a.train.x, b.train.x) and torch.equal(b.train.x, c.train.x) and torch.equal(a.test.y, c.test.y)


def test_wrong_class_count(tmp_path, cache_dir, helpers):
    root = tmp_path / "three"
    helpers.write_folder(root, classes=("a", "b", "c"))
    with pytest.raises(DataError, match="has 3 classes but CIFAR-10 has 10.*data.dataset=folder"):
        load_data(_cfg(cache_dir, root))


def test_wrong_archive_for_dataset(archive_dir, cache_dir):
    d, _ = archive_dir
    with pytest.raises(DataError, match=r"lacks train, test, meta.*CIFAR-100"):
        load_data(_cfg(cache_dir, d / "cifar-10-python.tar.gz", dataset="cifar100"))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _Evil(marker)})
    with pytest.raises(DataError, match=r"refusing to load evil.*system.*forbidden"):
        restricted_loads(blob, "evil")
    assert not marker.exists()
    pickle.loads(blob)  # sanity: the same blob really does run the command with plain pickle
    assert marker.exists()


def test_malicious_batch_in_archive(tmp_path, cache_dir, helpers):
    marker = tmp_path / "pwned"
    helpers.cifar10(tmp_path / "cifar-10-python.tar.gz", poison=pickle.dumps(_Evil(marker)))
    with pytest.raises(DataError, match=r"data_batch_1.*forbidden"):
        load_data(_cfg(cache_dir, tmp_path / "cifar-10-python.tar.gz"))
    assert not marker.exists()


def test_garbage_batch(tmp_path, cache_dir, helpers):
    helpers.cifar10(tmp_path / "cifar-10-python.tar.gz", poison=b"\x80\x04garbage")
    with pytest.raises(DataError, match=r"data_batch_1 is not a readable CIFAR batch"):
        load_data(_cfg(cache_dir, tmp_path / "cifar-10-python.tar.gz"))


def test_nothing_found(tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"not found: looked in .*empty.*data\.root=.*data\.download=true"):
        load_data(_cfg(cache_dir, tmp_path / "empty"))
    with pytest.raises(DataError, match=r"data.root .*missing. does not exist"):
        load_data(_cfg(cache_dir, tmp_path / "missing"))


def test_offline_download_fails_clearly(cache_dir, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"not found in .*downloads.*could not download .*no network.*data\.root"):
        load_data(_cfg(cache_dir, download=True))
    assert list((Path(cache_dir) / "downloads").iterdir()) == [], "no partial file left behind"


def test_md5_mismatch(cache_dir, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"an html error page"))
    with pytest.raises(DataError, match=r"md5 .*expected c58f30108f718f92721af3b95e74349a"):
        load_data(_cfg(cache_dir, download=True))
    assert list((Path(cache_dir) / "downloads").iterdir()) == []


def test_download_success_is_verified_and_renamed(tmp_path, cache_dir, monkeypatch, helpers):
    src = helpers.cifar10(tmp_path / "served.tar.gz")
    payload = (tmp_path / "served.tar.gz").read_bytes()
    urls = []

    def serve(url, timeout=None):
        urls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    spec = dataclasses.replace(cifar.SPECS["cifar10"], md5=hashlib.md5(payload).hexdigest())
    monkeypatch.setitem(cifar.SPECS, "cifar10", spec)
    s = load_data(_cfg(cache_dir, download=True))
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert [p.name for p in (Path(cache_dir) / "downloads").iterdir()] == ["cifar-10-python.tar.gz"]
    _check(s, src, helpers.CIFAR10_NAMES)
    load_data(_cfg(cache_dir, download=True))
    assert len(urls) == 1, "second load finds the downloaded archive"
