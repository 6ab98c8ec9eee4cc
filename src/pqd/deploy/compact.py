"""Compact sparse INT8 checkpoint (``.pqdz``): pqd's own file for a converted INT8 model.

``save_compact(int8_model, path)`` stores the whole ``state_dict`` of a model converted by
:func:`pqd.stages.convert` (FX flow) so that ``load_compact(path, skeleton)`` restores it
bit for bit into a *skeleton*: a converted model of the same architecture built on any
weights (:func:`pqd.run.loader.load_int8_module` builds one for a run directory). What is stored:

* quantized tensors (per-channel or per-tensor affine): scales (float64, kept as float32
  when that is exact) and zero points in a shared section; the integer values through a
  sparsity coding chosen **per tensor** by compressing every candidate and keeping the
  smallest (the choice and the candidates' sizes are recorded, see ``save_compact``'s
  report):

  - positions of the non-zeros: ``bitmask`` (1 bit per element) or ``delta`` (the number
    of zeros before each non-zero as a byte, 255 meaning "255 more zeros, continue");
    ``dense`` (no position stream, zeros stored as values) when density is above 1/2;
  - non-zero values: ``raw`` int8, or ``chshift``: per output channel (first dimension)
    the smallest non-zero magnitude ``m`` is stored once and each value is coded as
    ``2 * (|q| - m) + (q < 0)``. Magnitude pruning leaves a per-channel hole around zero
    whose width depends on the channel's scale; aligning the holes makes the values of
    all channels share one distribution (measured on ResNet-18: -5% value bytes with
    Laplace-distributed weights; ``raw`` is kept where it is smaller);

* everything else in the state (float biases, output scales / zero points, the input
  quantize node's scale / zero point, FP32 layers left unquantized, ``torch.dtype``
  entries and tuples such as ``Linear``'s packed params) in a raw little-endian section.

Entropy coder: **zstd level 19** per stream, chosen against lzma (raw LZMA2, preset 9e,
``lc=lp=pb=0``) and zstd-22 with ``benchmarks/compact_size.py``: file sizes within a percent
of each other, zstd much faster to compress and to decode, level 22 no better in practice
(figures: docs/BENCHMARKS.md, "Compact sparse INT8 checkpoint"). ``codec="lzma"`` stays
available. A stream that does not shrink is stored raw. How close this gets to the
per-tensor order-0 entropy bound (``chshift`` models what an order-0 coder cannot) is
measured there too.

File layout (no pickle anywhere; loading parses JSON and copies bytes, nothing else)::

    prelude   24 B   "PQDZ", u16 version, u8 header codec, u8 0, u32 header bytes,
                     u32 header raw bytes, u64 payload bytes   (little-endian)
    header           JSON (compressed): format, codec, meta, blobs [{o, n, r, c}],
                     entries [[key, spec], ...] in state_dict order, module_versions
                     (state_dict's per-module ``version``, which quantized modules read)
    payload          concatenated blobs (offset ``o``, ``n`` bytes, ``r`` bytes raw)
    sha256    32 B   of everything before it

A spec's ``t`` is one of ``tensor``, ``qtensor``, ``tuple``, ``dtype``, ``none``, ``int``,
``float``, ``bool``; dtypes come from a fixed list. Anything else is refused with
:class:`pqd.errors.CheckpointError`, as is a file that is truncated, fails its checksum,
declares sizes that do not add up, or does not fit the skeleton.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import struct
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pqd.errors import CheckpointError, ModelError

FORMAT = "pqd-compact"
VERSION = 1
SUFFIX = ".pqdz"
MAGIC = b"PQDZ"
_PRELUDE = struct.Struct("<4sHBBIIQ")
_DIGEST = 32
_HEADER_CODECS = {0: "raw", 1: "zstd", 2: "lzma"}
_CODECS = ("zstd", "lzma", "raw")
_LEVELS = {"zstd": 19, "lzma": 9}
_MAX_HEADER = 64 << 20
_MAX_RAW = 8 << 30  # refuse files that claim more than 8 GiB of raw tensor data
_DENSE_ABOVE = 0.5  # density above which ``dense`` is also tried (below it never won: Huffman spends >= 1 bit on zero)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_QDTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {  # quantized dtype -> (itself, its int_repr dtype)
    "qint8": (torch.qint8, torch.int8),
    "quint8": (torch.quint8, torch.uint8),
    "qint32": (torch.qint32, torch.int32),
}
_DTYPE_VALUES = {**{k: v for k, v in _DTYPES.items()}, **{k: v[0] for k, v in _QDTYPES.items()}}
_NAME_OF = {v: k for k, v in _DTYPE_VALUES.items()}
POSITIONS = ("dense", "bitmask", "delta")
VALUES = ("raw", "chshift")


# --------------------------------------------------------------------------- compression


def _lzma_filters(level: int) -> list[dict]:
    return [{"id": lzma.FILTER_LZMA2, "preset": level | lzma.PRESET_EXTREME, "lc": 0, "lp": 0, "pb": 0}]


def _compress(raw: bytes, codec: str, level: int) -> tuple[str, bytes]:
    """Compress one stream; a stream that does not shrink is kept raw."""
    if not raw or codec == "raw":
        return "raw", raw
    if codec == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    else:
        data = lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_lzma_filters(level))
    return (codec, data) if len(data) < len(raw) else ("raw", raw)


def _decompress(data: bytes, codec: str, raw_len: int, level: int) -> bytes:
    if codec == "raw":
        out = data
    elif codec == "zstd":
        import zstandard

        try:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise CheckpointError(f"a zstd section does not decompress ({exc})") from None
    elif codec == "lzma":
        try:
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_lzma_filters(level))
            out = dec.decompress(data, max_length=raw_len)
        except lzma.LZMAError as exc:
            raise CheckpointError(f"an lzma section does not decompress ({exc})") from None
        if not dec.eof:
            raise CheckpointError("an lzma section is longer than its declared size")
    else:
        raise CheckpointError(f"refusing unknown codec {codec!r}; pqd compact files use only {', '.join(_CODECS)}")
    if len(out) != raw_len:
        raise CheckpointError(f"a section decompresses to {len(out)} bytes, not the declared {raw_len}")
    return out


# --------------------------------------------------------------------------- int8 codings


def _delta_encode(flat: np.ndarray) -> bytes:
    pos = np.flatnonzero(flat)
    if pos.size == 0:
        return b""
    gaps = np.diff(pos, prepend=-1) - 1
    count = gaps // 255 + 1
    out = np.full(int(count.sum()), 255, np.uint8)
    out[np.cumsum(count) - 1] = gaps % 255
    return out.tobytes()


def _delta_positions(data: bytes, n: int, nnz: int) -> np.ndarray:
    b = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(b != 255)
    if ends.size != nnz or (b.size and (ends.size == 0 or ends[-1] != b.size - 1)):
        raise CheckpointError(f"a delta position stream holds {ends.size} positions, not the declared {nnz}")
    runs = np.diff(ends, prepend=-1) - 1
    pos = np.cumsum(runs.astype(np.int64) * 255 + b[ends] + 1) - 1
    if pos.size and pos[-1] >= n:
        raise CheckpointError(f"a delta position stream points past the end of its tensor ({pos[-1]} >= {n})")
    return pos


def _chshift_encode(flat: np.ndarray, rows: int) -> bytes:
    pos = np.flatnonzero(flat)
    offsets = np.zeros(rows, np.uint8)
    if pos.size == 0:
        return offsets.tobytes()
    mag = np.abs(flat[pos].astype(np.int16))
    row = pos // (flat.size // rows)
    starts = np.flatnonzero(np.diff(row, prepend=-1))
    offsets[row[starts]] = np.minimum.reduceat(mag, starts)
    sym = 2 * (mag - offsets[row]) + (flat[pos] < 0)
    return offsets.tobytes() + sym.astype(np.uint8).tobytes()


def _chshift_decode(data: bytes, pos: np.ndarray, n: int, rows: int) -> np.ndarray:
    if len(data) != rows + pos.size:
        raise CheckpointError(f"a chshift value stream has {len(data)} bytes, not {rows} + {pos.size}")
    raw = np.frombuffer(data, np.uint8)
    offsets, sym = raw[:rows].astype(np.int16), raw[rows:].astype(np.int16)
    mag = (sym >> 1) + offsets[pos // (n // rows)]
    if np.any(mag > 128) or np.any(mag == 0) or np.any((mag == 128) & (sym & 1 == 0)):
        raise CheckpointError("a chshift value stream decodes to values outside int8's non-zero range")
    return np.where(sym & 1, -mag, mag).astype(np.int8)


def encode_int8(
    flat: np.ndarray,
    rows: int,
    *,
    codec: str = "zstd",
    level: int | None = None,
    positions: str | None = None,
    values: str | None = None,
) -> tuple[dict, list[tuple[str, bytes, int]], dict[str, int]]:
    """Code a flat int8 array: try every candidate coding, keep the smallest.

    Returns ``(spec, streams, candidates)``: ``spec`` names the coding (``positions``,
    ``values``, ``nnz``, ``rows``), ``streams`` holds ``(codec, bytes, raw_len)`` for the
    position stream (if any) then the value stream, ``candidates`` the compressed bytes of
    every candidate tried. ``positions`` / ``values`` force a coding (tests, benchmarks).
    """
    level = _LEVELS.get(codec, 0) if level is None else level
    flat = np.ascontiguousarray(flat, dtype=np.int8).reshape(-1)
    n = flat.size
    rows = max(1, rows)
    if n % rows:
        raise ModelError(f"cannot split {n} values into {rows} rows")
    nz = flat != 0
    nnz = int(nz.sum())
    cand: dict[str, tuple[str, bytes, int]] = {}

    def put(name: str, raw: bytes) -> None:
        c, data = _compress(raw, codec, level)
        cand[name] = (c, data, len(raw))

    for name in POSITIONS[1:] if positions is None else (positions,):
        if name == "bitmask":
            put(name, np.packbits(nz, bitorder="little").tobytes())
        elif name == "delta":
            put(name, _delta_encode(flat))
    if positions == "dense" or (positions is None and n and nnz / n > _DENSE_ABOVE):
        put("dense", flat.tobytes())
    if positions != "dense":
        for name in VALUES if values is None else (values,):
            put(name, flat[nz].tobytes() if name == "raw" else _chshift_encode(flat, rows))
    sizes = {k: len(v[1]) for k, v in cand.items()}
    sparse_pos = min((p for p in POSITIONS[1:] if p in sizes), key=sizes.__getitem__, default=None)
    sparse_val = min((v for v in VALUES if v in sizes), key=sizes.__getitem__, default=None)
    sparse = sizes[sparse_pos] + sizes[sparse_val] if sparse_pos and sparse_val else math.inf
    if "dense" in sizes and sizes["dense"] <= sparse:
        spec = {"positions": "dense", "values": "raw", "nnz": nnz, "rows": rows}
        streams = [cand["dense"]]
    else:
        assert sparse_pos is not None and sparse_val is not None  # no dense candidate: sparse streams were encoded
        spec = {"positions": sparse_pos, "values": sparse_val, "nnz": nnz, "rows": rows}
        streams = [cand[sparse_pos], cand[sparse_val]]
    return spec, streams, sizes


def decode_int8(spec: Mapping, streams: list[bytes], n: int) -> np.ndarray:
    """Inverse of :func:`encode_int8` (``streams`` already decompressed)."""
    kind, vkind = spec.get("positions"), spec.get("values")
    nnz, rows = _int(spec, "nnz", 0, n), _int(spec, "rows", 1, max(n, 1))
    if kind not in POSITIONS or vkind not in VALUES:
        raise CheckpointError(f"refusing unknown int8 coding {kind!r}/{vkind!r}; known: {POSITIONS} / {VALUES}")
    if n % rows:
        raise CheckpointError(f"{n} values do not split into {rows} rows")
    if kind == "dense":
        if len(streams) != 1 or len(streams[0]) != n:
            raise CheckpointError(f"a dense int8 stream must hold {n} bytes")
        return np.frombuffer(streams[0], np.int8).copy()
    if len(streams) != 2:
        raise CheckpointError("a sparse int8 tensor needs a position and a value stream")
    if kind == "bitmask":
        if len(streams[0]) != (n + 7) // 8:
            raise CheckpointError(f"a bitmask for {n} values must hold {(n + 7) // 8} bytes, not {len(streams[0])}")
        mask = np.unpackbits(np.frombuffer(streams[0], np.uint8), count=n, bitorder="little").astype(bool)
        pos = np.flatnonzero(mask)
        if pos.size != nnz:
            raise CheckpointError(f"a bitmask holds {pos.size} non-zeros, not the declared {nnz}")
    else:
        pos = _delta_positions(streams[0], n, nnz)
    if vkind == "raw":
        if len(streams[1]) != nnz:
            raise CheckpointError(f"a value stream has {len(streams[1])} bytes, not {nnz}")
        vals = np.frombuffer(streams[1], np.int8)
        if np.any(vals == 0):
            raise CheckpointError("a sparse value stream holds zeros")
    else:
        vals = _chshift_decode(streams[1], pos, n, rows)
    out = np.zeros(n, np.int8)
    out[pos] = vals
    return out


# --------------------------------------------------------------------------- writing


class _Writer:
    def __init__(self, codec: str, level: int):
        self.codec, self.level = codec, level
        self.blobs: list[dict] = []
        self.chunks: list[bytes] = []
        self.offset = 0
        self.misc = bytearray()  # small raw tensors, compressed together as blob 0
        self.add(b"", "raw", 0)

    def add(self, data: bytes, codec: str, raw_len: int) -> int:
        self.blobs.append({"o": self.offset, "n": len(data), "r": raw_len, "c": codec})
        self.chunks.append(data)
        self.offset += len(data)
        return len(self.blobs) - 1

    def raw_tensor(self, t: torch.Tensor) -> dict:
        t = t.detach().cpu().contiguous()
        if t.dtype not in _NAME_OF or t.is_quantized:
            raise ModelError(f"cannot store a tensor of dtype {t.dtype} in a compact checkpoint")
        spec = {"t": "tensor", "dtype": _NAME_OF[t.dtype], "shape": list(t.shape)}
        if t.dtype == torch.float64 and t.numel() and torch.equal(t.float().double(), t):
            spec["stored"], t = "float32", t.float()  # e.g. per-channel scales, float32 values held as float64
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        spec["at"] = [len(self.misc), len(data)]
        self.misc += data
        return spec

    def finish(self) -> tuple[list[dict], bytes]:
        codec, data = _compress(bytes(self.misc), self.codec, self.level)
        self.blobs[0] = {"o": 0, "n": len(data), "r": len(self.misc), "c": codec}
        for b in self.blobs[1:]:
            b["o"] += len(data)
        return self.blobs, data + b"".join(self.chunks[1:])


def _encode_value(v: Any, w: _Writer, key: str, report: dict) -> dict:
    if isinstance(v, torch.Tensor):
        if not v.is_quantized:
            return w.raw_tensor(v)
        return _encode_qtensor(v, w, key, report)
    if isinstance(v, (tuple, list)):
        return {"t": "tuple", "items": [_encode_value(x, w, f"{key}[{i}]", report) for i, x in enumerate(v)]}
    if isinstance(v, torch.dtype):
        if v not in _NAME_OF:
            raise ModelError(f"{key}: cannot store dtype {v} in a compact checkpoint")
        return {"t": "dtype", "name": _NAME_OF[v]}
    if v is None:
        return {"t": "none"}
    if isinstance(v, bool):
        return {"t": "bool", "v": v}
    if isinstance(v, int):
        return {"t": "int", "v": v}
    if isinstance(v, float):
        return {"t": "float", "v": v}
    raise ModelError(
        f"{key}: cannot store a {type(v).__name__} in a compact checkpoint (tensors, dtypes, tuples and numbers only)"
    )


def _encode_qtensor(q: torch.Tensor, w: _Writer, key: str, report: dict) -> dict:
    q = q.detach().cpu()
    name = _NAME_OF.get(q.dtype)
    if name not in _QDTYPES:
        raise ModelError(f"{key}: quantized dtype {q.dtype} is not supported")
    spec: dict[str, Any] = {"t": "qtensor", "dtype": name, "shape": list(q.shape)}
    scheme = q.qscheme()
    if scheme == torch.per_channel_affine:
        spec.update(
            qscheme="per_channel_affine",
            axis=int(q.q_per_channel_axis()),
            scales=w.raw_tensor(q.q_per_channel_scales()),
            zero_points=w.raw_tensor(q.q_per_channel_zero_points()),
        )
    elif scheme == torch.per_tensor_affine:
        spec.update(qscheme="per_tensor_affine", scale=float(q.q_scale()), zero_point=int(q.q_zero_point()))
    else:
        raise ModelError(
            f"{key}: quantization scheme {scheme} is not supported (per-channel or per-tensor affine only)"
        )
    ints = q.int_repr().contiguous()
    n = ints.numel()
    if name == "qint8":
        rows = int(ints.shape[0]) if ints.dim() and n else 1
        coding, streams, cands = encode_int8(ints.numpy().reshape(-1), rows, codec=w.codec, level=w.level)
    else:  # quint8 / qint32: zeros mean nothing special, store the integers densely
        coding = {"positions": "raw", "values": "raw", "nnz": None, "rows": 1}
        raw = ints.reshape(-1).view(torch.uint8).numpy().tobytes() if n else b""
        c, data = _compress(raw, w.codec, w.level)
        streams, cands = [(c, data, len(raw))], {"raw": len(data)}
    coding["streams"] = [w.add(data, c, raw_len) for c, data, raw_len in streams]
    spec["ints"] = coding
    report[key] = {
        "numel": n,
        "nnz": coding["nnz"],
        "positions": coding["positions"],
        "values": coding["values"],
        "bytes": sum(len(s[1]) for s in streams),
        "candidates": cands,
    }
    return spec


def _pack(header: Mapping, payload: bytes, header_codec: str = "zstd") -> bytes:
    """Assemble a file from a header and payload (prelude, compressed JSON, payload, sha256)."""
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    codec, data = _compress(raw, header_codec, _LEVELS.get(header_codec, 0))
    code = {v: k for k, v in _HEADER_CODECS.items()}[codec]
    body = _PRELUDE.pack(MAGIC, VERSION, code, 0, len(data), len(raw), len(payload)) + data + payload
    return body + hashlib.sha256(body).digest()


def _state_of(model: nn.Module | Mapping[str, Any]) -> Mapping[str, Any]:
    return model.state_dict() if isinstance(model, nn.Module) else model


def save_compact(
    int8_model: nn.Module | Mapping[str, Any],
    path: str | Path,
    *,
    meta: Mapping[str, Any] | None = None,
    codec: str = "zstd",
    level: int | None = None,
) -> dict:
    """Write ``int8_model``'s whole state (or a state_dict) to ``path`` atomically.

    ``meta``: JSON-able facts stored with it (pqd's pipeline records model, width,
    num_classes, image_shape, quantize mode, mean/std). Returns a report: ``bytes`` (file
    size), ``header_bytes``, ``misc_bytes`` (the raw-tensor section), ``int_bytes`` and,
    per quantized tensor, the coding chosen and every candidate's compressed size.
    """
    if sys.byteorder != "little":
        raise ModelError("compact checkpoints are written on little-endian hosts only")
    if codec not in _CODECS:
        raise ModelError(f"codec {codec!r} is not one of {', '.join(_CODECS)}")
    level = _LEVELS.get(codec, 0) if level is None else int(level)
    try:
        meta_json = json.loads(json.dumps(dict(meta or {}), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"meta must be JSON-able ({exc})") from None
    w = _Writer(codec, level)
    tensors: dict[str, dict] = {}
    state = _state_of(int8_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entries = [[k, _encode_value(v, w, k, tensors)] for k, v in state.items()]
    blobs, payload = w.finish()
    header = {
        "format": FORMAT,
        "version": VERSION,
        "codec": codec,
        "level": level,
        "byteorder": "little",
        "meta": meta_json,
        "blobs": blobs,
        "entries": entries,
        "module_versions": _module_versions(state),
    }
    data = _pack(header, payload)
    from pqd.train.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, data)
    return {
        "bytes": len(data),
        "header_bytes": _PRELUDE.size + _prelude_header_len(data) + _DIGEST,
        "misc_bytes": blobs[0]["n"],
        "int_bytes": sum(t["bytes"] for t in tensors.values()),
        "codec": codec,
        "level": level,
        "tensors": tensors,
    }


def _module_versions(state: Mapping[str, Any]) -> dict[str, int]:
    """The per-module ``version`` numbers ``state_dict`` carries in ``_metadata``: quantized
    modules read their state differently by version (e.g. ``Linear`` before v3)."""
    md = getattr(state, "_metadata", None) or {}
    return {k: v["version"] for k, v in md.items() if isinstance(v, Mapping) and isinstance(v.get("version"), int)}


def _prelude_header_len(data: bytes) -> int:
    return _PRELUDE.unpack_from(data)[4]


# --------------------------------------------------------------------------- reading


def _int(spec: Mapping, key: str, lo: int, hi: int) -> int:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointError(f"header field {key!r} = {v!r} is not an integer in [{lo}, {hi}]")
    return v


def _shape(spec: Mapping) -> tuple[list[int], int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"header field 'shape' = {shape!r} is not a list of sizes")
    n = math.prod(shape)
    if n > _MAX_RAW:
        raise CheckpointError(f"a tensor of shape {shape} is larger than pqd compact files allow")
    return shape, n


class _Reader:
    def __init__(self, blobs: Any, payload: bytes, level: int):
        if not isinstance(blobs, list) or not blobs:
            raise CheckpointError("header field 'blobs' must be a non-empty list")
        self.blobs, self.payload, self.level = blobs, payload, level
        self.cache: dict[int, bytes] = {}
        total = 0
        for i, b in enumerate(blobs):
            if not isinstance(b, dict):
                raise CheckpointError(f"blob {i} is not a record")
            o, n = _int(b, "o", 0, len(payload)), _int(b, "n", 0, len(payload))
            total += _int(b, "r", 0, _MAX_RAW)
            if o + n > len(payload):
                raise CheckpointError(f"blob {i} ends past the payload ({o} + {n} > {len(payload)})")
            if b.get("c") not in _CODECS:
                raise CheckpointError(f"refusing blob {i}: codec {b.get('c')!r} is not one of {', '.join(_CODECS)}")
        if total > _MAX_RAW:
            raise CheckpointError(f"the file declares {total} bytes of raw data, over the {_MAX_RAW} limit")

    def blob(self, i: Any) -> bytes:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.blobs):
            raise CheckpointError(f"reference to blob {i!r}, which does not exist")
        if i not in self.cache:
            b = self.blobs[i]
            self.cache[i] = _decompress(self.payload[b["o"] : b["o"] + b["n"]], b["c"], b["r"], self.level)
        return self.cache[i]


def _dtype(name: Any, table: Mapping[str, Any], what: str) -> Any:
    if not isinstance(name, str) or name not in table:
        raise CheckpointError(f"refusing {what} {name!r}: a pqd compact file holds only {', '.join(table)}")
    return table[name]


def _raw_tensor(spec: Any, r: _Reader) -> torch.Tensor:
    if not isinstance(spec, dict) or spec.get("t") != "tensor":
        raise CheckpointError(f"expected a tensor record, found {str(spec)[:80]!r}")
    dtype = _dtype(spec.get("dtype"), _DTYPES, "dtype")
    stored = _dtype(spec.get("stored", spec.get("dtype")), _DTYPES, "dtype")
    shape, n = _shape(spec)
    at = spec.get("at")
    misc = r.blob(0)
    if not (
        isinstance(at, list)
        and len(at) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in at)
    ):
        raise CheckpointError(f"tensor record has a bad location {at!r}")
    off, nbytes = at
    if nbytes != n * stored.itemsize or off + nbytes > len(misc):
        raise CheckpointError(f"tensor of shape {shape} ({spec.get('dtype')}) does not match its {nbytes} stored bytes")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(misc[off : off + nbytes]), dtype=stored).reshape(shape)
    return t.to(dtype)


def _decode_value(spec: Any, r: _Reader, key: str) -> Any:
    if not isinstance(spec, dict):
        raise CheckpointError(f"{key}: entry is not a record")
    t = spec.get("t")
    if t == "tensor":
        return _raw_tensor(spec, r)
    if t == "qtensor":
        return _decode_qtensor(spec, r, key)
    if t == "tuple":
        items = spec.get("items")
        if not isinstance(items, list):
            raise CheckpointError(f"{key}: tuple record without items")
        return tuple(_decode_value(x, r, f"{key}[{i}]") for i, x in enumerate(items))
    if t == "dtype":
        return _dtype(spec.get("name"), _DTYPE_VALUES, "dtype")
    if t == "none":
        return None
    if t in ("int", "float", "bool"):
        v: Any = spec.get("v")  # untrusted: checked below
        ok = {
            "int": lambda x: isinstance(x, int) and not isinstance(x, bool),
            "bool": lambda x: isinstance(x, bool),
            "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
        }[t](v)
        if not ok:
            raise CheckpointError(f"{key}: {t} record holds {v!r}")
        return float(v) if t == "float" else v
    raise CheckpointError(
        f"{key}: refusing entry type {t!r}; a pqd compact file holds only tensors, "
        "quantized tensors, tuples, dtypes and numbers (never pickled objects or code)"
    )


def _decode_qtensor(spec: dict, r: _Reader, key: str) -> torch.Tensor:
    qdtype, idtype = _dtype(spec.get("dtype"), _QDTYPES, "quantized dtype")
    shape, n = _shape(spec)
    coding = spec.get("ints")
    if not isinstance(coding, dict) or not isinstance(coding.get("streams"), list):
        raise CheckpointError(f"{key}: quantized tensor without an integer coding")
    streams = [r.blob(i) for i in coding["streams"]]
    if qdtype == torch.qint8:
        ints = torch.from_numpy(decode_int8(coding, streams, n)).reshape(shape)
    else:
        if coding.get("positions") != "raw" or len(streams) != 1 or len(streams[0]) != n * idtype.itemsize:
            raise CheckpointError(f"{key}: bad dense integer stream")
        ints = (torch.frombuffer(bytearray(streams[0]), dtype=idtype) if n else torch.empty(0, dtype=idtype)).reshape(
            shape
        )
    scheme = spec.get("qscheme")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if scheme == "per_channel_affine":
            axis = _int(spec, "axis", 0, max(len(shape) - 1, 0))
            scales, zps = _raw_tensor(spec.get("scales"), r), _raw_tensor(spec.get("zero_points"), r)
            if (
                scales.dtype != torch.float64
                or zps.dtype != torch.int64
                or scales.shape != (shape[axis],)
                or zps.shape != scales.shape
            ):
                raise CheckpointError(
                    f"{key}: per-channel scales / zero points do not fit shape {shape} on axis {axis}"
                )
            return torch._make_per_channel_quantized_tensor(ints, scales, zps, axis)
        if scheme == "per_tensor_affine":
            scale, zp = spec.get("scale"), spec.get("zero_point")
            if (
                isinstance(scale, bool)
                or not isinstance(scale, (int, float))
                or isinstance(zp, bool)
                or not isinstance(zp, int)
            ):
                raise CheckpointError(f"{key}: bad per-tensor scale / zero point")
            q = torch._make_per_tensor_quantized_tensor(ints, float(scale), zp)
            if q.dtype != qdtype:
                raise CheckpointError(f"{key}: integer type does not give {spec.get('dtype')}")
            return q
    raise CheckpointError(f"{key}: refusing quantization scheme {scheme!r}")


_MAX_IMAGE_VALUES = 1 << 26  # values of one input image a meta may declare (e.g. 3 x 4096 x 4096 is 50M)


def _numel(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel()
    return sum(_numel(x) for x in v) if isinstance(v, (tuple, list)) else 0


def _check_meta_sizes(meta: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """The sizes a meta declares (a model is built from them before the state is loaded) must fit
    the file: ``num_classes`` outputs need at least as many stored weights, and ``image_shape``
    must be a plausible image. A crafted meta would otherwise make the skeleton allocate any size."""
    stored = sum(_numel(v) for v in state.values())
    c = meta.get("num_classes")
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= max(stored, 1)):
        raise CheckpointError(
            f"meta 'num_classes' = {str(c)[:40]} does not fit the file, which stores {stored:,} weights in all; "
            "the file is damaged or was not written by pqd: export it again from its run"
        )
    shape = meta.get("image_shape")
    if shape is not None:
        ok = (
            isinstance(shape, list)
            and 1 <= len(shape) <= 4
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        )
        if not ok or math.prod(shape) > _MAX_IMAGE_VALUES:
            raise CheckpointError(
                f"meta 'image_shape' = {str(shape)[:60]} is not an image shape pqd can build a model for "
                f"(1 to 4 positive sizes, at most {_MAX_IMAGE_VALUES:,} values); the file is damaged or was "
                "not written by pqd: export it again from its run"
            )


def read_compact(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and decode a compact file into ``(state_dict, meta)``; nothing is executed. The sizes
    its meta declares (classes, image shape) are checked against the file before anyone builds a
    model from them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"compact checkpoint {str(path)!r} does not exist")
    data = path.read_bytes()
    where = f"compact checkpoint {str(path)!r}"
    if len(data) < _PRELUDE.size + _DIGEST:
        raise CheckpointError(f"{where} is truncated ({len(data)} bytes); write it again")
    magic, version, hcodec, _, hlen, hraw, plen = _PRELUDE.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError(f"{where} is not a pqd compact file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise CheckpointError(f"{where} has format version {version}; this pqd reads version {VERSION}")
    want = _PRELUDE.size + hlen + plen + _DIGEST
    if len(data) != want:
        kind = "truncated" if len(data) < want else "followed by extra bytes"
        raise CheckpointError(f"{where} is {kind} ({len(data)} bytes, its prelude declares {want}); write it again")
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise CheckpointError(f"{where} fails its sha256 checksum (corrupt file); write it again")
    if hcodec not in _HEADER_CODECS or hraw > _MAX_HEADER:
        raise CheckpointError(f"{where}: refusing header codec {hcodec} / size {hraw}")
    try:
        raw = _decompress(
            data[_PRELUDE.size : _PRELUDE.size + hlen],
            _HEADER_CODECS[hcodec],
            hraw,
            _LEVELS.get(_HEADER_CODECS[hcodec], 0),
        )
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
            raise CheckpointError(f"header is not a {FORMAT} v{VERSION} header")
        if header.get("byteorder") != "little" or sys.byteorder != "little":
            raise CheckpointError("only little-endian data on little-endian hosts is supported")
        if header.get("codec") not in _CODECS:
            raise CheckpointError(f"refusing codec {header.get('codec')!r}; known: {', '.join(_CODECS)}")
        level = _int(header, "level", 0, 22)
        reader = _Reader(header.get("blobs"), data[_PRELUDE.size + hlen : -_DIGEST], level)
        entries, meta = header.get("entries"), header.get("meta", {})
        if not isinstance(entries, list) or not isinstance(meta, dict):
            raise CheckpointError("header 'entries' must be a list and 'meta' a record")
        versions = header.get("module_versions", {})
        if not isinstance(versions, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in versions.values()
        ):
            raise CheckpointError("header 'module_versions' must map module paths to integers")
        state: dict[str, Any] = OrderedDict()
        state._metadata = OrderedDict((k, {"version": v}) for k, v in versions.items())  # type: ignore[attr-defined]
        for item in entries:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise CheckpointError(f"entry {str(item)[:80]!r} is not a [key, record] pair")
            if item[0] in state:
                raise CheckpointError(f"entry {item[0]!r} appears twice")
            state[item[0]] = _decode_value(item[1], reader, item[0])
        _check_meta_sizes(meta, state)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        OverflowError,
        RuntimeError,
        RecursionError,
        UnicodeDecodeError,
    ) as exc:
        raise CheckpointError(f"{where} has a malformed header ({type(exc).__name__}: {str(exc)[:200]})") from None
    return state, meta


# --------------------------------------------------------------------------- comparing and loading


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.is_quantized != b.is_quantized or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if not a.is_quantized:
            return torch.equal(a.cpu(), b.cpu())
        if a.qscheme() != b.qscheme() or not torch.equal(a.int_repr(), b.int_repr()):
            return False
        if a.qscheme() == torch.per_tensor_affine:
            return a.q_scale() == b.q_scale() and a.q_zero_point() == b.q_zero_point()
        return (
            a.q_per_channel_axis() == b.q_per_channel_axis()
            and torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
            and torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def state_mismatches(a: nn.Module | Mapping[str, Any], b: nn.Module | Mapping[str, Any]) -> list[str]:
    """Keys whose values differ in any bit (int values, scales, zero points, axis, dtype,
    shape), plus keys present on one side only. Empty when the states are identical."""
    sa, sb = _state_of(a), _state_of(b)
    out = sorted(set(sa) ^ set(sb))
    return out + [k for k in sa if k in sb and not _same(sa[k], sb[k])]


def verify_compact(path: str | Path, model: nn.Module | Mapping[str, Any]) -> None:
    """Decode ``path`` and check it equals ``model``'s state bit for bit (cheap: no rebuild)."""
    state, _ = read_compact(path)
    bad = state_mismatches(model, state)
    if bad:
        raise CheckpointError(f"compact checkpoint {str(path)!r} does not round-trip: {', '.join(bad[:8])}")


def _signature(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (str(v.dtype), tuple(v.shape))
    if isinstance(v, (tuple, list)):
        return tuple(_signature(x) for x in v)
    return type(v).__name__


def load_compact(path: str | Path, skeleton: nn.Module) -> nn.Module:
    """Restore a compact file into ``skeleton`` (a converted model of the same
    architecture, any weights) and return it in eval mode."""
    state, _ = read_compact(path)
    have = skeleton.state_dict()
    missing, extra = sorted(set(have) - set(state)), sorted(set(state) - set(have))
    wrong = [k for k in state if k in have and _signature(state[k]) != _signature(have[k])]
    if missing or extra or wrong:
        parts = [
            f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("different dtype/shape", wrong))
            if keys
        ]
        raise CheckpointError(
            f"compact checkpoint {str(path)!r} does not fit the skeleton {type(skeleton).__name__} "
            f"({'; '.join(parts)}); build the skeleton with the run's model, width, classes and quantize mode"
        )
    if not getattr(state, "_metadata", None):
        state._metadata = getattr(have, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    try:
        skeleton.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"compact checkpoint {str(path)!r} does not fit the skeleton: {str(exc)[:400]}") from None
    return skeleton.eval()


# --------------------------------------------------------------------------- entropy bound


def _h2(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _h(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) if p.size else 0.0


def entropy_bound(model: nn.Module | Mapping[str, Any]) -> dict[str, float]:
    """Order-0 entropy bound (bytes) of the qint8 tensors' integers: positions of non-zeros
    at the measured density (``n * H2(density)``) plus the empirical entropy of the
    non-zero values. ``per_tensor`` uses each tensor's density and value histogram (the
    bound a per-tensor order-0 coder faces), ``global`` one density and one histogram for
    all tensors (the textbook figure). Coders that model context (e.g. ``chshift``) can go
    below either."""
    ints = []

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor) and v.is_quantized and v.dtype == torch.qint8:
            ints.append(v.int_repr().reshape(-1).numpy())
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x)

    for v in _state_of(model).values():
        walk(v)
    mask_t = val_t = 0.0
    n_all = nnz_all = 0
    hist = np.zeros(256, np.int64)
    for q in ints:
        nz = q[q != 0]
        h = np.bincount(nz.astype(np.int16) + 128, minlength=256)
        mask_t += q.size * _h2(nz.size / max(q.size, 1)) / 8
        val_t += nz.size * _h(h) / 8
        n_all, nnz_all, hist = n_all + q.size, nnz_all + nz.size, hist + h
    mask_g, val_g = n_all * _h2(nnz_all / max(n_all, 1)) / 8, nnz_all * _h(hist) / 8
    return {
        "numel": n_all,
        "nnz": nnz_all,
        "density": nnz_all / max(n_all, 1),
        "value_entropy_bits": _h(hist),
        "per_tensor": mask_t + val_t,
        "per_tensor_mask": mask_t,
        "per_tensor_values": val_t,
        "global": mask_g + val_g,
        "global_mask": mask_g,
        "global_values": val_g,
    }
