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


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_refusal_keeps_the_reason_whole_and_the_code_execution_warning(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"fc.weight": _RunsCode()}, path)
    with pytest.raises(CheckpointError) as exc:
        ck.load_weights(path)
    msg = str(exc.value)
    assert "\x1b" not in msg and "[1m" not in msg
    assert "unsupported GLOBAL posix.getcwd" in msg  # torch's reason, not cut mid-word
    assert "can run arbitrary code" in msg and "Only if you trust its source" in msg


def test_unpickling_reason_strips_colour_codes_and_cuts_at_a_word():
    err = RuntimeError(
        "Weights only load failed. \x1b[1mdo those steps only if you trust the source\x1b[0m\n"
        "(1) Re-running with weights_only=False ...\nWeightsUnpickler error: " + "word " * 200
    )
    reason = ck.unpickling_reason(err)
    assert "\x1b" not in reason and "[0m" not in reason and "(1)" not in reason
    assert reason.startswith("RuntimeError: WeightsUnpickler error: word") and reason.endswith("word ...")


def test_a_damaged_user_weights_file_is_never_to_be_deleted(tmp_path):
    path = tmp_path / "mine.safetensors"
    ck.save_checkpoint(path, {"w": torch.ones(3)})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="delete it to recompute"):
        ck.load_checkpoint(path)
    with pytest.raises(CheckpointError) as exc:
        ck.load_checkpoint(path, user_file=True)
    assert "delete" not in str(exc.value).replace("never changes or deletes", "")
    assert "copy it again" in str(exc.value)
