"""Carry the chunked GPU study's state from one machine to the next within the device's limits.

    python tools/gpu/gpu_study_state.py pack   --root /tmp/pqd_gpu_study --name gpu_cifar10_s0 --out $OUT
    python tools/gpu/gpu_study_state.py unpack --root /tmp/pqd_gpu_study --name gpu_cifar10_s0 --parts runs/gpu_carry/state

State of one study ``ROOT/NAME``: ``teacher.safetensors`` (the bf16-rounded teacher written by
tools/gpu/gpu_teacher.py, kept only until the sweep's teacher run has loaded it) and ``sweep/``
(a ``pqd sweep --out`` directory). ``pack`` keeps the finished runs only (a run directory with a
metrics.json; unfinished runs restart in the next chunk) and, of those, the small files plus the
teacher run's weights (the other runs point at them); deployable models, stage checkpoints and the
final FP32 weights stay behind. It writes ``NAME.tar.zst.NN`` parts of at most ``--part-mb`` MiB
(the device returns at most 8 files of 16 MiB) and ``NAME-results.json`` (every finished run's
metrics, for docs/RESULTS.md). ``unpack`` joins and extracts them (refusing links and paths that
leave the root).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

KEEP = {"metrics.json", "config.yaml", "env.json", "log.txt"}
KEEP_SUFFIX = (".pqdz",)
TEACHER_WEIGHTS = "teacher.safetensors"


def _zstd():
    try:
        import zstandard
    except ImportError:
        sys.exit("gpu_study_state: needs the zstandard package (pip install zstandard, or the carried wheel)")
    return zstandard


def selected(study: Path) -> list[Path]:
    """The files of ``study`` (ROOT/NAME) that the next chunk needs, relative to ROOT."""
    sweep = study / "sweep"
    runs = sweep / "runs"
    finished = [d for d in sorted(runs.glob("*")) if (d / "metrics.json").is_file()] if runs.is_dir() else []
    files = [f for f in sorted(sweep.glob("*")) if f.is_file()]  # sweep.yaml, results.sqlite
    for d in finished:
        for f in sorted(d.iterdir()):
            if f.is_file() and (
                f.name in KEEP
                or f.name.endswith(KEEP_SUFFIX)
                or (d.name.startswith("teacher-") and f.name == TEACHER_WEIGHTS)
            ):
                files.append(f)
    teacher_loaded = any(d.name.startswith("teacher-") for d in finished)
    src = study / TEACHER_WEIGHTS
    if src.is_file() and not teacher_loaded:
        files.append(src)
    return [f.relative_to(study.parent) for f in files]


def pack(root: Path, name: str, out: Path, part_mb: float) -> list[Path]:
    zstd = _zstd()
    study = root / name
    files = selected(study)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for rel in files:
            tf.add(root / rel, arcname=str(rel), recursive=False)
    blob = zstd.ZstdCompressor(level=10, threads=-1).compress(buf.getvalue())
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}.tar.zst.*"):
        old.unlink()
    step = int(part_mb * 2**20)
    parts = []
    for i in range(0, max(len(blob), 1), step):
        p = out / f"{name}.tar.zst.{i // step:02d}"
        p.write_bytes(blob[i : i + step])
        parts.append(p)
    results = {}
    for rel in files:
        if rel.name == "metrics.json":
            results[rel.parent.name] = json.loads((root / rel).read_text())
    (out / f"{name}-results.json").write_text(json.dumps(results, indent=2))
    print(
        f"packed {len(files)} files of {study} ({len(results)} finished runs) into {len(parts)} part(s), {len(blob) / 1e6:.1f} MB"
    )
    if len(blob) > 60 * 2**20:
        print("warning: the state is over 60 MiB; it will not travel to the next chunk with the data", file=sys.stderr)
    return parts


def unpack(root: Path, name: str, parts_dir: Path) -> bool:
    parts = sorted(parts_dir.glob(f"{name}.tar.zst.*"))
    if not parts:
        print(f"no state for {name} under {parts_dir}: starting fresh")
        return False
    zstd = _zstd()
    blob = zstd.ZstdDecompressor().decompress(b"".join(p.read_bytes() for p in parts), max_output_size=2**31)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tf:
        members = tf.getmembers()
        for m in members:
            target = (root / m.name).resolve()
            if (
                not m.isfile()
                or not str(target).startswith(str(root.resolve()) + "/")
                or not m.name.startswith(f"{name}/")
            ):
                raise SystemExit(f"gpu_study_state: refusing archive member {m.name!r}")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(root, members=members, **safe)
    print(f"unpacked {len(members)} files of {name} into {root}")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("pack", "unpack"))
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", type=Path, help="pack: where the parts go")
    ap.add_argument("--parts", type=Path, help="unpack: the folder holding the parts")
    ap.add_argument("--part-mb", type=float, default=15.0)
    a = ap.parse_args(argv)
    if a.action == "pack":
        if a.out is None:
            ap.error("pack needs --out")
        pack(a.root, a.name, a.out, a.part_mb)
    else:
        if a.parts is None:
            ap.error("unpack needs --parts")
        unpack(a.root, a.name, a.parts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
