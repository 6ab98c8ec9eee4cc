"""Bytes on disk of pqd's compact sparse INT8 checkpoint against the other ways to ship a model.

    python benchmarks/compact_size.py [--models resnet18,vgg16_bn,wrn_28_10]
        [--sparsities 0,0.5,0.9,0.95] [--weights init,laplace] [--codecs-at 0.9] [--threads 2]
        [--out benchmarks/results/compact_size]
    python benchmarks/compact_size.py --run-dir RUN_DIR [--out ...]

``--run-dir`` measures a finished pipeline run instead (trained weights): the bytes of its
``teacher.safetensors``, ``model_int8.pt``, that file through zstd-19, and
``model_int8.pqdz`` (decoded through ``pqd.run.loader.load_int8_module`` and checked to predict exactly
as ``model_int8.pt`` on random inputs), with the entropy bound of its int8 weights.

For every model, weight source and sparsity: global magnitude pruning
(``pqd.stages.prune.compute_masks`` + ``pqd.train.apply_masks``) of an untrained model, PTQ
calibration on random data (4 batches of 16), ``convert``; then the bytes of

* ``fp32_safetensors``: the dense FP32 state_dict as safetensors (the size baseline; pruning
  does not change it), and ``fp32_torch_save`` for reference;
* ``int8_ts``: the INT8 TorchScript deployable (``to_torchscript``, as ``model_int8.pt``);
* ``int8_ts_zstd19``: that file through ``zstandard`` level 19;
* ``compact``: ``pqd.deploy.compact.save_compact`` (zstd-19), split into ``compact_ints`` (position
  + value streams of the int8 weights), ``compact_misc`` (biases, scales, zero points, ...)
  and ``compact_header`` (prelude + compressed JSON header + sha256);
* ``bound_per_tensor`` / ``bound_global``: order-0 entropy bound of the int8 weights
  (``pqd.deploy.compact.entropy_bound``), per-tensor densities and histograms or global ones.

At ``--codecs-at`` sparsities the compact file is also written with lzma and zstd-22, to
justify the codec. Every compact file is decoded and checked bit for bit against the model,
and loaded into a separately built skeleton whose predictions must equal the original's.

Weight sources: ``init`` is the model's own (PyTorch default) initialisation: uniform,
scaled by 1/sqrt(fan_in). Global magnitude pruning of those weights removes whole layers
(the widest layers' bound is the smallest), and uniform survivors make low-entropy int8
values, so ``laplace`` replaces every conv/linear weight with i.i.d. Laplace draws of
He scale (std sqrt(2/fan_in)): heavy-tailed like trained weights, every layer keeps some
weights. Neither is a trained model; see docs/BENCHMARKS.md for what this means.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import zstandard
from safetensors.torch import save as st_save

from pqd.compress.qat import prepare, to_torchscript
from pqd.compress.sparsity import prunable_layers
from pqd.compress.student import Student, convert_student
from pqd.deploy import compact
from pqd.measure import environment
from pqd.models.registry import create_model
from pqd.run.loader import load_int8_module
from pqd.run.rundir import RunDir
from pqd.stages.prune import compute_masks
from pqd.train import apply_masks


def _laplace_(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                b = (2.0 / fan_in) ** 0.5 / 2**0.5  # Laplace(0, b) has std b * sqrt(2)
                u = torch.rand(m.weight.shape, generator=gen) - 0.5
                m.weight.copy_(-b * torch.sign(u) * torch.log1p(-2 * u.abs()))


def _int8(
    name: str, weights: str, sparsity: float, seed: int, calib: list[torch.Tensor]
) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10).eval()
    if weights == "laplace":
        _laplace_(model, torch.Generator().manual_seed(seed))
    layers = prunable_layers(model)
    masks = compute_masks(model, layers, sparsity) if sparsity else {}
    apply_masks(model, masks)
    dens = {p: float(masks[p].float().mean()) for p in layers} if masks else {p: 1.0 for p in layers}
    prepared = prepare(model, calib[0][:2], mode="ptq")
    with torch.no_grad():
        for x in calib:
            prepared(x)
    return model, convert_student(Student(prepared, form="ptq")).eval(), dens


def _skeleton(name: str) -> torch.nn.Module:
    model = create_model(name, num_classes=10).eval()
    return convert_student(Student(prepare(model, torch.zeros(2, 3, 32, 32), mode="ptq"), form="ptq")).eval()


def _compact(
    int8: torch.nn.Module, tmp: Path, codec: str = "zstd", level: int | None = None
) -> tuple[dict, Path, float]:
    path = tmp / f"m.{codec}{level or ''}.pqdz"
    t = time.perf_counter()
    rep = compact.save_compact(int8, path, codec=codec, level=level)
    return rep, path, time.perf_counter() - t


def run(args: argparse.Namespace) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 32, 32, generator=gen) for _ in range(4)]
    probe = torch.randn(8, 3, 32, 32, generator=gen)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in args.models:
            skeleton = _skeleton(name)
            for weights in args.weights:
                for sp in args.sparsities:
                    t0 = time.perf_counter()
                    fp32, int8, dens = _int8(name, weights, sp, args.seed, calib)
                    build_s = time.perf_counter() - t0
                    fp32_bytes = len(
                        st_save({k: v.contiguous() for k, v in create_model(name, num_classes=10).state_dict().items()})
                    )
                    buf = io.BytesIO()
                    torch.save(fp32.state_dict(), buf)
                    ts = io.BytesIO()
                    torch.jit.save(to_torchscript(int8, calib[0][:1]), ts)
                    ts_bytes = ts.getvalue()
                    ts_z = len(zstandard.ZstdCompressor(level=19).compress(ts_bytes))
                    rep, path, save_s = _compact(int8, tmp)
                    t = time.perf_counter()
                    compact.verify_compact(path, int8)
                    loaded = compact.load_compact(path, skeleton)
                    load_s = time.perf_counter() - t
                    with torch.no_grad():
                        same = torch.equal(int8(probe), loaded(probe))
                    if not same:
                        raise SystemExit(f"{name} {weights} {sp}: predictions differ after the compact round trip")
                    bound = compact.entropy_bound(int8)
                    codings = Counter(f"{t['positions']}+{t['values']}" for t in rep["tensors"].values())
                    row = {
                        "model": name,
                        "weights": weights,
                        "sparsity": sp,
                        "int8_sparsity": 1 - bound["density"],
                        "value_entropy_bits": round(bound["value_entropy_bits"], 3),
                        "all_zero_layers": sum(1 for v in dens.values() if v == 0.0),
                        "layers": len(dens),
                        "min_layer_density": round(min(dens.values()), 4),
                        "fp32_safetensors": fp32_bytes,
                        "fp32_torch_save": len(buf.getvalue()),
                        "int8_ts": len(ts_bytes),
                        "int8_ts_zstd19": ts_z,
                        "compact": rep["bytes"],
                        "compact_ints": rep["int_bytes"],
                        "compact_misc": rep["misc_bytes"],
                        "compact_header": rep["header_bytes"],
                        "bound_per_tensor": round(bound["per_tensor"]),
                        "bound_global": round(bound["global"]),
                        "bound_per_tensor_mask": round(bound["per_tensor_mask"]),
                        "bound_per_tensor_values": round(bound["per_tensor_values"]),
                        "fp32_over_compact": fp32_bytes / rep["bytes"],
                        "ts_zstd19_over_compact": ts_z / rep["bytes"],
                        "ints_over_bound": rep["int_bytes"] / bound["per_tensor"] if bound["per_tensor"] else None,
                        "codings": dict(codings),
                        "save_s": round(save_s, 2),
                        "load_s": round(load_s, 2),
                        "build_s": round(build_s, 1),
                        "round_trip": "bit-exact, identical predictions",
                    }
                    if sp in args.codecs_at:
                        for codec, level in (("lzma", 9), ("zstd", 22)):
                            r2, p2, s2 = _compact(int8, tmp, codec, level)
                            compact.verify_compact(p2, int8)
                            row[f"compact_{codec}{level}"], row[f"save_s_{codec}{level}"] = r2["bytes"], round(s2, 2)
                    rows.append(row)
                    print(
                        f"{name:10s} {weights:7s} {sp:4.2f}  fp32 {fp32_bytes:>10,}  ts {len(ts_bytes):>10,}  ts.zst {ts_z:>10,}  "
                        f"compact {rep['bytes']:>10,}  bound {bound['per_tensor']:>12,.0f}  {fp32_bytes / rep['bytes']:5.1f}x  "
                        f"{ts_z / rep['bytes']:4.2f}x vs ts.zst  ({save_s:.1f}s save){'  ' + str({k: v for k, v in row.items() if k.startswith('compact_lzma') or k.startswith('compact_zstd')}) if sp in args.codecs_at else ''}",
                        flush=True,
                    )
    return {
        "rows": rows,
        "env": {**environment(args.threads), "zstandard": zstandard.__version__},
        "command": args.command,
    }


def markdown(result: dict) -> str:
    head = (
        "| model | weights | sparsity | FP32 safetensors | INT8 TorchScript | TS + zstd-19 | compact | ints / misc / header "
        "| bound (per-tensor / global) | FP32 ÷ compact | TS.zst ÷ compact | ints ÷ bound |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in result["rows"]:
        ratio = f"{r['ints_over_bound']:.3f}" if r["ints_over_bound"] else "–"
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['sparsity']:.0%} | {r['fp32_safetensors']:,} | {r['int8_ts']:,} | {r['int8_ts_zstd19']:,} "
            f"| **{r['compact']:,}** | {r['compact_ints']:,} / {r['compact_misc']:,} / {r['compact_header']:,} "
            f"| {r['bound_per_tensor']:,} / {r['bound_global']:,} | {r['fp32_over_compact']:.1f}× | {r['ts_zstd19_over_compact']:.2f}× | {ratio} |"
        )
    return head + "\n".join(lines) + "\n"


def run_dir_sizes(run_dir: Path, seed: int = 0) -> dict:
    """Bytes of a finished run's files and the compact checkpoint's ratios (see the module docstring)."""
    ts_bytes = (run_dir / "model_int8.pt").read_bytes()
    ts_z = len(zstandard.ZstdCompressor(level=19).compress(ts_bytes))
    fp32 = (run_dir / "teacher.safetensors").stat().st_size
    pqdz = (run_dir / RunDir.COMPACT).stat().st_size
    model = load_int8_module(run_dir)  # decodes and rebuilds; must predict exactly as the TorchScript file
    jit = torch.jit.load(str(run_dir / "model_int8.pt"))
    x = torch.randn(32, *model_input_shape(run_dir), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        same = bool(torch.equal(model(x), jit(x)))
    bound = compact.entropy_bound(model)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "run_dir": str(run_dir),
        "model": metrics["model"],
        "width": metrics["width"],
        "stages": metrics["stages"],
        "sparsity_int8": metrics["sparsity"]["achieved_int8"],
        "final_top1": metrics["accuracy"]["final_top1"],
        "fp32_safetensors": fp32,
        "int8_ts": len(ts_bytes),
        "int8_ts_zstd19": ts_z,
        "compact": pqdz,
        "bound_per_tensor": round(bound["per_tensor"]),
        "fp32_over_compact": fp32 / pqdz,
        "ts_zstd19_over_compact": ts_z / pqdz,
        "fp32_over_ts_zstd19": fp32 / ts_z,
        "compact_predicts_as_torchscript": same,
    }


def model_input_shape(run_dir: Path) -> tuple[int, ...]:
    return (
        tuple(json.loads((run_dir / "bench.json").read_text())["input_shape"])
        if (run_dir / "bench.json").is_file()
        else (3, 32, 32)
    )


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18", type=lambda s: s.split(","))
    ap.add_argument("--sparsities", default="0,0.5,0.9,0.95", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--weights", default="init,laplace", type=lambda s: s.split(","))
    ap.add_argument("--codecs-at", default="0.9", type=lambda s: [float(x) for x in s.split(",") if x])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compact_size"))
    ap.add_argument("--run-dir", type=Path, default=None, help="measure a finished run's files instead")
    args = ap.parse_args()
    args.command = "python benchmarks/compact_size.py " + " ".join(sys.argv[1:])
    if args.run_dir:
        r = run_dir_sizes(args.run_dir, args.seed) | {"command": args.command, "env": environment(args.threads)}
        md = (
            "| run | sparsity (int8) | FP32 safetensors | INT8 TorchScript | TS + zstd-19 | compact | bound | FP32 ÷ compact "
            "| TS.zst ÷ compact | compact predicts as TS |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
            f"| {r['model']} ×{r['width']} {r['stages']} | {r['sparsity_int8']:.1%} | {r['fp32_safetensors']:,} | {r['int8_ts']:,} "
            f"| {r['int8_ts_zstd19']:,} | **{r['compact']:,}** | {r['bound_per_tensor']:,} | {r['fp32_over_compact']:.1f}× "
            f"| {r['ts_zstd19_over_compact']:.2f}× | {r['compact_predicts_as_torchscript']} |\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(r, indent=2))
        args.out.with_suffix(".md").write_text(md)
        print(md)
        return
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
