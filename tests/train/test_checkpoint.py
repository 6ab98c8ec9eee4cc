import os
import pickle

import pytest
import torch

from pqd.errors import CheckpointError
from pqd.train import checkpoint as ck


def test_round_trip_keeps_tensors_and_meta(tmp_path):
    t = {"a": torch.randn(3, 4), "m": torch.rand(5) > 0.5, "i": torch.arange(4)}
    p = ck.save_checkpoint(tmp_path / "c.safetensors", t, {"epoch": 3})
    got, meta = ck.load_checkpoint(p)
    assert meta == {"epoch": 3}
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)


def test_corrupted_file_is_refused(tmp_path):
    p = ck.save_checkpoint(tmp_path / "c.safetensors", {"a": torch.zeros(1000)}, {})
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF  # flip bits in the tensor payload
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        ck.load_checkpoint(p)
    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable"):
        ck.load_checkpoint(p)


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    p = ck.save_checkpoint(tmp_path / "c.safetensors", {"a": torch.ones(3)}, {"v": 1})

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(p, {"a": torch.zeros(3)}, {"v": 2})
    got, meta = ck.load_checkpoint(p)
    assert meta == {"v": 1} and torch.equal(got["a"], torch.ones(3))
    assert [f.name for f in tmp_path.iterdir()] == ["c.safetensors"], "temporary file left behind"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_weights_are_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        ck.load_weights(p)


def test_plain_state_dict_and_safetensors_load(tmp_path):
    sd = {"w": torch.randn(2, 2)}
    torch.save(sd, tmp_path / "w.pt")
    assert torch.equal(ck.load_weights(tmp_path / "w.pt")["w"], sd["w"])
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "w.safetensors")
    assert torch.equal(ck.load_weights(tmp_path / "w.safetensors")["w"], sd["w"])
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load_weights(tmp_path / "nope.safetensors")
