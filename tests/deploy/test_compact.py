"""pqd.deploy.compact: the compact sparse INT8 checkpoint round-trips bit for bit, chooses the
smallest coding, refuses corrupt and crafted files, and shrinks with sparsity."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
import yaml

from pqd.compress.qat import prepare
from pqd.compress.sparsity import prunable_layers
from pqd.compress.student import Student, convert_student
from pqd.deploy import compact
from pqd.errors import CheckpointError
from pqd.models.registry import create_model
from pqd.run.config import RunConfig
from pqd.run.loader import load_int8_module
from pqd.run.rundir import RunDir
from pqd.stages.prune import compute_masks
from pqd.train import apply_masks

SPARSITIES = (0.0, 0.5, 0.9, 0.99)
pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning")


def _int8(sparsity: float, seed: int = 0, calibrate: bool = True) -> torch.nn.Module:
    """ResNet-18 (width 0.125, 10 classes): global magnitude pruning, PTQ on random data, convert."""
    warnings.filterwarnings("ignore")
    torch.manual_seed(seed)
    model = create_model("resnet18", width=0.125, num_classes=10).eval()
    if sparsity:
        apply_masks(model, compute_masks(model, prunable_layers(model), sparsity))
    prepared = prepare(model, torch.zeros(2, 3, 32, 32), mode="ptq")
    if calibrate:
        with torch.no_grad():
            prepared(torch.randn(16, 3, 32, 32))
    return convert_student(Student(prepared, form="ptq")).eval()


@pytest.fixture(scope="module")
def models() -> dict[float, torch.nn.Module]:
    return {s: _int8(s) for s in SPARSITIES}


@pytest.fixture(scope="module")
def skeleton() -> torch.nn.Module:
    """Same architecture, other weights, never calibrated."""
    return _int8(0.0, seed=123, calibrate=False)


def _qmodules(model):
    return {n: m for n, m in model.named_modules() if callable(getattr(m, "weight", None))}


@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.99])
def test_round_trip_is_bit_exact_with_identical_predictions(sparsity, models, skeleton, tmp_path):
    int8 = models[sparsity]
    path = tmp_path / "m.pqdz"
    compact.save_compact(int8, path, meta={"sparsity": sparsity})
    assert compact.state_mismatches(int8, skeleton), "the skeleton must start out different"
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(int8(x), skeleton(x))

    loaded = compact.load_compact(path, skeleton)
    assert loaded is skeleton
    mods, got = _qmodules(int8), _qmodules(loaded)
    assert len(mods) == 21 and mods.keys() == got.keys()  # 20 convs + fc, read back from the modules' packed weights
    for name, m in mods.items():
        a, b = m.weight(), got[name].weight()
        assert torch.equal(a.int_repr(), b.int_repr()), name
        assert torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales()), name
        assert torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points()), name
        assert a.q_per_channel_axis() == b.q_per_channel_axis()
        assert torch.equal(m.bias(), got[name].bias()), name
        assert (m.scale, m.zero_point) == (got[name].scale, got[name].zero_point), name
    assert compact.state_mismatches(int8, loaded) == []
    assert torch.equal(int8(x), loaded(x))
    _, meta = compact.read_compact(path)
    assert meta == {"sparsity": sparsity}


def test_model_codings_are_the_smallest_candidates(models, tmp_path):
    report = compact.save_compact(models[0.9], tmp_path / "m.pqdz")
    seen = set()
    for key, t in report["tensors"].items():
        c = t["candidates"]
        chosen = c["dense"] if t["positions"] == "dense" else c[t["positions"]] + c[t["values"]]
        options = [c[p] + c[v] for p in ("bitmask", "delta") for v in ("raw", "chshift")] + (
            [c["dense"]] if "dense" in c else []
        )
        assert chosen == t["bytes"] == min(options), key
        seen.add(t["positions"])
    assert {"bitmask", "delta"} <= seen, "a 90%-sparse ResNet has layers for both position codings"
    assert report["bytes"] == (tmp_path / "m.pqdz").stat().st_size


def _sparse_int8(n: int, density: float, seed: int = 0) -> np.ndarray:
    """Laplace-shaped int8 values (like quantized weights) with ``density`` of them non-zero."""
    g = np.random.default_rng(seed)
    q = np.clip(np.round(g.laplace(0, 25, n)), -128, 127).astype(np.int8)
    q[q == 0] = 1
    q[g.random(n) >= density] = 0
    return q


@pytest.mark.parametrize("density, expect", [(0.5, "bitmask"), (0.02, "delta"), (1.0, "dense")])
def test_each_position_coding_wins_where_it_is_smaller(density, expect):
    q = _sparse_int8(64 * 576, density)
    spec, streams, sizes = compact.encode_int8(q, 64)
    assert spec["positions"] == expect, sizes
    combos = {(p, v): sizes[p] + sizes[v] for p in ("bitmask", "delta") for v in ("raw", "chshift")}
    if "dense" in sizes:
        combos["dense", "raw"] = sizes["dense"]
    assert sum(len(s[1]) for s in streams) == min(combos.values()) == combos[spec["positions"], spec["values"]]


@pytest.mark.parametrize("positions", compact.POSITIONS)
@pytest.mark.parametrize("values", compact.VALUES)
@pytest.mark.parametrize("density", [0.0, 1e-4, 0.1, 0.9, 1.0])
def test_every_coding_decodes_exactly(positions, values, density):
    q = _sparse_int8(32 * 75, density, seed=int(density * 1e4))
    q[:3] = [-128, 127, 1] if density else 0  # int8's extremes, also through chshift
    spec, streams, _ = compact.encode_int8(q, 32, positions=positions, values=values)
    assert spec["positions"] == positions
    raw = [compact._decompress(data, c, n, 19) for c, data, n in streams]
    assert np.array_equal(compact.decode_int8(spec, raw, q.size), q)


def test_long_zero_runs_and_all_zero_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(16, 8, 3, 3)
    w[3, 1, 0, 0], w[15, 7, 2, 2] = 0.5, -0.25  # gaps far longer than one delta byte
    scales = torch.rand(16, dtype=torch.float64, generator=g) / 100 + 1e-3
    zps = torch.zeros(16, dtype=torch.int64)
    state = {
        "sparse": torch.quantize_per_channel(w, scales, zps, 0, torch.qint8),
        "all_zero": torch.quantize_per_channel(
            torch.zeros(64, 32, 3, 3),
            torch.ones(64, dtype=torch.float64),
            torch.zeros(64, dtype=torch.int64),
            0,
            torch.qint8,
        ),
        "dense_axis1": torch.quantize_per_channel(
            torch.randn(4, 6, generator=g),
            torch.full((6,), 0.02, dtype=torch.float64),
            torch.zeros(6, dtype=torch.int64),
            1,
            torch.qint8,
        ),
        "per_tensor_u8": torch.quantize_per_tensor(torch.rand(5, 5, generator=g), 0.01, 7, torch.quint8),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(0.125),
        "f64": torch.tensor([1 / 3, 1e-300], dtype=torch.float64),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "flags": torch.tensor([True, False]),
        "packed": (torch.quantize_per_tensor(torch.randn(3, generator=g), 0.1, 0, torch.qint8), None),
        "dtype": torch.qint8,
    }
    path = tmp_path / "s.pqdz"
    report = compact.save_compact(state, path)
    got, _ = compact.read_compact(path)
    assert compact.state_mismatches(state, got) == []
    assert report["tensors"]["all_zero"]["bytes"] == 0 and report["tensors"]["all_zero"]["positions"] == "delta"
    assert report["tensors"]["sparse"]["nnz"] == 2


def test_size_falls_with_sparsity(models, tmp_path):
    sizes = [compact.save_compact(models[s], tmp_path / f"{s}.pqdz")["bytes"] for s in SPARSITIES]
    assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    bound = compact.entropy_bound(models[0.9])
    assert bound["density"] == pytest.approx(0.1, abs=0.002)


@pytest.fixture(scope="module")
def valid_file(models, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("compact") / "ok.pqdz"
    compact.save_compact(models[0.9], path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b"", "truncated"),
        (lambda b: b + b"\0", "extra bytes"),
        (lambda b: b[:300] + bytes([b[300] ^ 1]) + b[301:], "checksum"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x80]), "checksum"),
        (lambda b: b"PK\3\4" + b[4:], "not a pqd compact file"),
    ],
)
def test_corrupt_or_truncated_file_is_refused(damage, message, valid_file, skeleton, tmp_path):
    path = tmp_path / "bad.pqdz"
    path.write_bytes(damage(valid_file))
    with pytest.raises(CheckpointError, match=message):
        compact.load_compact(path, skeleton)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        compact.read_compact(tmp_path / "missing.pqdz")


def _header(entries, blobs=None, **extra):
    return {
        "format": compact.FORMAT,
        "version": compact.VERSION,
        "codec": "zstd",
        "level": 19,
        "byteorder": "little",
        "meta": {},
        "blobs": blobs or [{"o": 0, "n": 4, "r": 4, "c": "raw"}],
        "entries": entries,
        **extra,
    }


@pytest.mark.parametrize(
    "header, message",
    [
        (
            _header([["w", {"t": "pickle", "data": "gASVAAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAJpZJSFlFKULg=="}]]),
            "refusing entry type 'pickle'",
        ),
        (_header([["w", {"t": "object", "cls": "torch.nn.Module"}]]), "refusing entry type 'object'"),
        (_header([["w", {"t": "tensor", "dtype": "object", "shape": [1], "at": [0, 4]}]]), "refusing dtype 'object'"),
        (_header([["w", {"t": "dtype", "name": "torch.jit.ScriptModule"}]]), "refusing dtype"),
        (_header([], blobs=[{"o": 0, "n": 4, "r": 4, "c": "pickle"}]), "codec 'pickle'"),
        (
            _header([["w", {"t": "tensor", "dtype": "float32", "shape": [1], "at": [0, 4]}]], codec="torch.load"),
            "refusing codec",
        ),
        (_header([["w", {"t": "tensor", "dtype": "float32", "shape": [1000], "at": [0, 4]}]]), "does not match"),
        (
            _header(
                [
                    [
                        "w",
                        {
                            "t": "qtensor",
                            "dtype": "qint8",
                            "shape": [4],
                            "qscheme": "per_tensor_affine",
                            "scale": 1.0,
                            "zero_point": 0,
                            "ints": {"positions": "dense", "values": "raw", "nnz": 4, "rows": 1, "streams": [7]},
                        },
                    ]
                ]
            ),
            "blob 7",
        ),
        ({"format": "pickle", "version": 1}, "header is not"),
    ],
)
def test_crafted_header_is_refused(header, message, tmp_path, monkeypatch):
    path = tmp_path / "crafted.pqdz"
    path.write_bytes(compact._pack(header, b"\0" * 4))  # a valid checksum: the attacker can compute one too

    def forbidden(*a, **k):
        raise AssertionError("a compact file must never reach pickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(CheckpointError, match=message):
        compact.read_compact(path)


def test_loading_never_touches_pickle(models, skeleton, tmp_path, monkeypatch):
    path = tmp_path / "m.pqdz"
    compact.save_compact(models[0.5], path)

    def forbidden(*a, **k):
        raise AssertionError("pickle used while loading")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert compact.state_mismatches(models[0.5], compact.load_compact(path, skeleton)) == []


def _partly_float(calibrate: bool) -> torch.nn.Module:
    """A small CNN whose last Linear stays FP32 (qconfig None), as a layer without an x86 integer kernel would."""
    from torch import nn
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(int(calibrate))
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Linear(8, 4),
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(
            model, get_default_qconfig_mapping("x86").set_module_name("7", None), (torch.zeros(2, 3, 8, 8),)
        )
        if calibrate:
            with torch.no_grad():
                prepared(torch.randn(16, 3, 8, 8))
        return convert_fx(prepared).eval()


def test_layers_left_fp32_round_trip(tmp_path):
    int8, skel = _partly_float(True), _partly_float(False)
    fc = int8.get_submodule("7")
    assert type(fc) is torch.nn.Linear and not fc.weight.is_quantized
    assert any(t.is_quantized for t in int8.state_dict().values() if isinstance(t, torch.Tensor))
    compact.save_compact(int8, tmp_path / "f.pqdz")
    assert compact.state_mismatches(int8, skel)
    loaded = compact.load_compact(tmp_path / "f.pqdz", skel)
    x = torch.randn(8, 3, 8, 8)
    assert compact.state_mismatches(int8, loaded) == [] and torch.equal(int8(x), loaded(x))
    assert torch.equal(loaded.get_submodule("7").weight, fc.weight)


def test_wrong_skeleton_is_refused_with_the_keys(models, skeleton, tmp_path):
    state = models[0.9].state_dict()
    state["fc._packed_params._packed_params"] = (state["fc._packed_params._packed_params"][0][:5], torch.zeros(5))
    compact.save_compact(state, tmp_path / "five.pqdz")
    with pytest.raises(CheckpointError, match=r"different dtype/shape: fc\._packed_params"):
        compact.load_compact(tmp_path / "five.pqdz", skeleton)
    compact.save_compact({"x": torch.zeros(2)}, tmp_path / "other.pqdz")
    with pytest.raises(CheckpointError, match="missing: .*unexpected: x"):
        compact.load_compact(tmp_path / "other.pqdz", skeleton)


def test_int8_module_rebuilt_from_a_run_dir(models, tmp_path):
    cfg = RunConfig.from_dict(
        {
            "stages": "Q:0",
            "model": {"name": "resnet18", "width": 0.125},
            "quantize": {"mode": "ptq"},
            "data": {"dataset": "digits"},
        }
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    int8 = models[0.9]
    compact.save_compact(int8, tmp_path / RunDir.COMPACT)  # no meta: facts come from metrics.json
    with pytest.raises(CheckpointError, match="number of classes"):
        load_int8_module(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"num_classes": 10}))
    loaded = load_int8_module(tmp_path)
    x = torch.randn(8, 3, 32, 32)
    assert compact.state_mismatches(int8, loaded) == [] and torch.equal(int8(x), loaded(x))


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"num_classes": 10**9, "image_shape": [3, 32, 32]}, "meta 'num_classes' = 1000000000 does not fit the file"),
        (
            {"num_classes": 10, "image_shape": [3, 10**6, 10**6]},
            "meta 'image_shape' = \\[3, 1000000, 1000000\\] is not an image shape",
        ),
        ({"num_classes": "10", "image_shape": [3, 32, 32]}, "meta 'num_classes' = 10 does not fit"),
    ],
)
def test_declared_sizes_are_checked_against_the_file_before_building(meta, message, tmp_path):
    """A crafted (self-consistent, checksummed) file whose meta declares a billion classes made
    load_run build a 240 GB classifier; it is refused from the file alone, before any model."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig.from_dict(
        {"stages": "Q:1", "model": {"name": "resnet18", "width": 0.125}, "data": {"dataset": "digits"}}
    )
    (run / RunDir.CONFIG).write_text(yaml.safe_dump(cfg.to_dict()))
    state = {"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}
    compact.save_compact(state, run / "model_int8.pqdz", meta=meta)
    with pytest.raises(CheckpointError, match=message):
        load_int8_module(run)
    with pytest.raises(CheckpointError, match=message):
        compact.read_compact(run / "model_int8.pqdz")
