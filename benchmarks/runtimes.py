"""CPU latency of every runtime pqd deploys to, dense vs 90% unstructured sparsity.

    pip install -e '.[onnx,openvino]'
    python benchmarks/runtimes.py                      # ~10 min on 2 cores
    python benchmarks/runtimes.py --models resnet18 --runs 100
    python benchmarks/runtimes.py --widths wrn_28_10=1.0 --write-docs docs/BENCHMARKS.md

For each model (32x32 inputs, or ``--image-size``; 10 classes; untrained weights: this is about speed) and each
sparsity: global magnitude pruning (``compute_masks`` + ``apply_masks``) of every conv and
linear layer, PTQ calibration on 4 random batches of 16 (``prepare(mode="ptq")`` +
``convert``), TorchScript freezing, and ONNX export of the FP32 model and of the INT8 model
(QDQ, int8 initializers; :mod:`pqd.deploy.onnx`). Then all variants of one model, both
sparsities, are timed at a fixed thread count, each variant in a worker process of its
own (:mod:`pqd.measure.worker`; ONNX Runtime and OpenVINO workers never import torch), interleaved
in rotating rounds of one block per variant (50 ms untimed, then 25 timed calls at batch
1; :func:`pqd.measure.latency.interleave`, the harness of ``pqd bench``):

    pytorch_fp32_eager, pytorch_int8 (FX-converted, TorchScript-frozen),
    onnxruntime_fp32 / _int8 (CPU EP, ORT defaults but threads), openvino_fp32 / _int8 (precision hint f32)

Ratios: "x FP32" = PyTorch FP32 eager of the same model and sparsity / this (>1 faster);
"x dense FP32" = the dense model's PyTorch FP32 eager / this. The proxy column is the MACs
that touch a non-zero weight, per image (:mod:`pqd.measure.proxies`).

Writes ``benchmarks/results/runtimes.{json,md}`` (``--out``) and, with ``--write-docs``,
replaces the section between ``<!-- runtimes:begin -->`` and ``<!-- runtimes:end -->`` of
that markdown file (appending it when absent), so a re-run on a quiet machine updates the
published table in place.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pqd.compress.qat import fx_modules, prepare, to_torchscript
from pqd.compress.sparsity import prunable_layers
from pqd.compress.student import Student, convert_student
from pqd.deploy.onnx import export_onnx, reference_int8
from pqd.deploy.runtimes import OpenVinoRunner, OrtRunner, available
from pqd.measure import environment
from pqd.measure.latency import interleave
from pqd.measure.proxies import proxies
from pqd.measure.workers import start_workers
from pqd.models.registry import create_model
from pqd.stages.prune import compute_masks
from pqd.train.checkpoint import save_checkpoint
from pqd.train.loop import apply_masks

DEFAULT_MODELS = ("resnet18", "vgg16_bn", "wrn_28_10")
DEFAULT_WIDTHS = {"wrn_28_10": 0.5}  # full width (36.5 M params, 5.2 GMACs) alone takes ~10 min here
SHAPE = [3, 32, 32]  # CIFAR input; --image-size sets the height and width (e.g. 224 for the imagenet_* models)
BEGIN, END = "<!-- runtimes:begin -->", "<!-- runtimes:end -->"


def build(
    name: str, width: float, sparsity: float, work: Path, runtimes: list[str], batch_sizes: list[int], seed: int = 0
) -> tuple[dict, dict]:
    """(variants name -> worker spec without threads, info) for one model at one sparsity; files go to ``work``."""
    torch.manual_seed(seed)
    kw = {"width": width} if width != 1.0 else {}
    model = create_model(name, num_classes=10, **kw).eval()
    masks = {}
    if sparsity > 0:
        masks = compute_masks(model, prunable_layers(model), sparsity)
        apply_masks(model, masks)
    t0 = time.perf_counter()
    prepared = prepare(model, torch.zeros(2, *SHAPE), mode="ptq")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(16, *SHAPE, generator=g))
    prepared.apply(fx_modules()[0].disable_observer)
    student = Student(prepared, masks, "ptq")
    int8 = to_torchscript(convert_student(student), torch.zeros(1, *SHAPE))
    quant_s = time.perf_counter() - t0
    info = {
        "model": name,
        "width": width,
        "sparsity": sparsity,
        "proxies": proxies(model, tuple(SHAPE)),
        "quantize_s": round(quant_s, 1),
    }
    tag = f"{name}_w{width}_s{int(round(sparsity * 100))}"
    save_checkpoint(work / f"{tag}_fp32.safetensors", model.state_dict(), {})
    torch.jit.save(int8, str(work / f"{tag}_int8.pt"))
    base = {"input_shape": list(SHAPE), "batch_sizes": list(batch_sizes), "seed": seed}
    variants = {
        "pytorch_fp32_eager": base
        | {
            "kind": "eager",
            "model": name,
            "kwargs": kw,
            "num_classes": 10,
            "weights": str(work / f"{tag}_fp32.safetensors"),
        },
        "pytorch_int8": base | {"kind": "torchscript", "path": str(work / f"{tag}_int8.pt")},
    }
    if "onnxruntime" in runtimes or "openvino" in runtimes:
        t0 = time.perf_counter()
        fp32_rec = export_onnx(model, work / f"{tag}_fp32.onnx", SHAPE, fold=False)
        int8_rec = export_onnx(reference_int8(student), work / f"{tag}_int8.onnx", SHAPE)
        info["export_s"] = round(time.perf_counter() - t0, 1)
        info["onnx_bytes"] = {"fp32": fp32_rec["bytes"], "int8": int8_rec["bytes"]}
        # sanity: the exports compute what PyTorch computes (random inputs, untrained weights)
        x = torch.randn(32, *SHAPE, generator=g)
        with torch.inference_mode():
            ref = {"fp32": model(x), "int8": int8(x)}
        info["agreement_vs_pytorch"] = {}
        for rt, cls in (("onnxruntime", OrtRunner), ("openvino", OpenVinoRunner)):
            if rt in runtimes:
                for prec in ("fp32", "int8"):
                    variants[f"{rt}_{prec}"] = base | {"kind": rt, "path": str(work / f"{tag}_{prec}.onnx")}
                    y = torch.as_tensor(cls(work / f"{tag}_{prec}.onnx", threads=1)(x))
                    info["agreement_vs_pytorch"][f"{rt}_{prec}"] = (
                        (y.argmax(1) == ref[prec].argmax(1)).float().mean().item()
                    )
    return variants, info


def bench_model(
    name: str, width: float, sparsities: list[float], args, work: Path, runtimes: list[str]
) -> tuple[list[dict], list[dict]]:
    all_variants, infos = {}, []
    for s in sparsities:
        print(f"[{time.strftime('%H:%M:%S')}] {name} width {width} sparsity {s:.0%}: prune, PTQ, export", flush=True)
        variants, info = build(name, width, s, work, runtimes, args.batch_sizes)
        infos.append(info)
        for k, spec in variants.items():
            all_variants[f"{k}@{s}"] = spec
    rows = []
    for t in args.threads:
        print(
            f"[{time.strftime('%H:%M:%S')}] {name}: timing {len(all_variants)} variants, {t} threads, one worker process each",
            flush=True,
        )
        with start_workers({k: spec | {"threads": t} for k, spec in all_variants.items()}) as workers:
            recs = interleave(
                workers,
                batch_sizes=tuple(args.batch_sizes),
                threads=t,
                warmup=args.warmup,
                runs=args.runs,
                large_batch_runs=args.large_batch_runs,
            )
        for r in recs:
            variant, s = r["model"].split("@")
            s = float(s)
            same = next(x for x in recs if x["model"] == f"pytorch_fp32_eager@{s}" and x["batch"] == r["batch"])
            dense = next(
                x for x in recs if x["model"] == f"pytorch_fp32_eager@{sparsities[0]}" and x["batch"] == r["batch"]
            )
            info = next(i for i in infos if i["sparsity"] == s)
            rows.append(
                r
                | {
                    "name": name,
                    "width": width,
                    "sparsity": s,
                    "variant": variant,
                    "x_vs_fp32_eager": same["median_ms"] / r["median_ms"],
                    "x_vs_dense_fp32_eager": dense["median_ms"] / r["median_ms"],
                    "nonzero_macs": info["proxies"]["nonzero_macs"],
                    "macs": info["proxies"]["macs"],
                }
            )
    return rows, infos


def _m(n: int) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M"


def markdown(result: dict) -> str:
    env, a = result["env"], result["args"]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"Machine (`pqd.measure.environment()`): {env['cpu_model']}, {env['logical_cpus']} logical CPUs, flags "
        f"{' / '.join(env['cpu_flags'])}; {env['platform']}; Python {env['python']}, torch {env['torch']} "
        f"({env['quantized_engine']} engine), "
        + ", ".join(f"{k} {v}" for k, v in env["runtimes"].items() if v)
        + f"; git {(env.get('git_commit') or '?')[:7]}. Taken {result['date']}"
        + (
            f"; load average {result['loadavg'][0]:.1f} at the start, {result['loadavg_end'][0]:.1f} at the end."
            if result.get("loadavg")
            else "."
        ),
        "",
        f"Median / p90 of {a['runs']} timed batch-1 runs per variant"
        + (f" ({a['large_batch_runs']} at larger batches)" if any(b > 1 for b in a["batch_sizes"]) else "")
        + " after "
        f"{a['warmup']} warm-up runs; all variants of one model (both sparsities) each in its own worker process, interleaved in rotating rounds of one block per variant (50 ms of untimed calls, then consecutive timed calls); "
        f"untrained weights, {a.get('image_size', 32)}x{a.get('image_size', 32)} inputs, 10 classes. *x FP32*: PyTorch FP32 eager of the same model and sparsity ÷ this "
        "(>1 is faster); *x dense*: the dense model's PyTorch FP32 eager ÷ this. *MACs (non-zero)*: multiply-accumulates "
        "per image that touch a non-zero weight (conv/linear).",
        "",
        "| model | sparsity | threads | batch | runtime | median ms | p90 ms | x FP32 | x dense | MACs (non-zero) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        w = "" if r["width"] == 1.0 else f" (width {r['width']})"
        lines.append(
            f"| {r['name']}{w} | {r['sparsity']:.0%} | {r['threads']} | {r['batch']} | {r['variant']} | {r['median_ms']:.2f} | "
            f"{r['p90_ms']:.2f} | {r['x_vs_fp32_eager']:.2f}x | {r['x_vs_dense_fp32_eager']:.2f}x | {_m(r['nonzero_macs'])} |"
        )
    lines += ["", summary(result)]
    return "\n".join(lines)


def summary(result: dict) -> str:
    """What the table says about unstructured sparsity, computed from the rows (not assumed)."""
    rows = result["rows"]
    sp = sorted({r["sparsity"] for r in rows})
    if len(sp) < 2 or sp[0] != 0.0:
        return ""
    hi = sp[-1]
    ratios = []  # sparse median / dense median, per (model, runtime, threads, batch)
    for r in rows:
        if r["sparsity"] == hi:
            d = next(
                x
                for x in rows
                if x["sparsity"] == 0.0
                and x["name"] == r["name"]
                and x["variant"] == r["variant"]
                and x["threads"] == r["threads"]
                and x["batch"] == r["batch"]
            )
            ratios.append(r["median_ms"] / d["median_ms"])
    lo_r, hi_r, med_r = min(ratios), max(ratios), statistics.median(ratios)
    fracs = {}
    for r in rows:
        if r["sparsity"] == hi:
            fracs[r["name"]] = r["nonzero_macs"] / r["macs"]
    frac_txt = ", ".join(f"{f:.0%} ({n})" for n, f in fracs.items())
    int8 = {}
    for r in rows:
        if (
            r["variant"].endswith("int8")
            and r["sparsity"] == 0.0
            and r["batch"] == 1
            and r["threads"] == max(x["threads"] for x in rows)
        ):
            int8.setdefault(r["name"], []).append(f"{r['variant']} {r['x_vs_fp32_eager']:.1f}x")
    int8_txt = "; ".join(f"{n}: {', '.join(v)}" for n, v in int8.items())
    outside = sum(not 0.85 < x < 1 / 0.85 for x in ratios)
    if not outside:
        verdict = "within ±15% of dense everywhere, i.e. no runtime turned the zeros into speed"
    else:
        load = result.get("loadavg") or [0.0]
        verdict = f"{outside} of {len(ratios)} rows differ from dense by more than 15%" + (
            f"; with a load average of {load[0]:.1f} on {result['env']['logical_cpus']} CPUs during this run, "
            "treat them as unconfirmed until a quiet re-run (compare the p90 column)"
            if load[0] > 0.5 * result["env"]["logical_cpus"]
            else "; look at their p90 before reading them as an effect of sparsity"
        )
    agree = [v for i in result["models"] for v in (i.get("agreement_vs_pytorch") or {}).values()]
    span = (
        f"{min(agree):.0%}"
        if agree and min(agree) == max(agree)
        else (f"{min(agree):.0%}-{max(agree):.0%}" if agree else "")
    )
    agree_txt = (
        f" Sanity check: the ONNX exports agree with PyTorch of the same precision on {span} of 32 random "
        "inputs (top-1)."
        if agree
        else ""
    )
    return (
        f"**Unstructured sparsity and latency.** At {hi:.0%} global unstructured sparsity the MACs per image that touch "
        f"a non-zero weight fall to {frac_txt} of the dense count (less than the weight sparsity suggests: global "
        f"magnitude pruning empties the wide low-resolution layers first, and the high-resolution early layers carry "
        f"most MACs). The measured latency of the {hi:.0%}-sparse models is {med_r:.2f}x the dense models' (median; "
        f"range {lo_r:.2f}-{hi_r:.2f}x over every model, runtime, thread count and batch): {verdict}. Nor do the "
        "kernels give a reason to expect a speed-up: PyTorch (fbgemm/oneDNN), ONNX Runtime (MLAS) and OpenVINO (oneDNN) all run dense "
        "convolutions and GEMMs and multiply a zero like any other weight. Unstructured sparsity buys bytes on disk "
        "(compressed or compact checkpoints), not CPU latency; latency comes from INT8 kernels (dense models, batch 1, "
        f"x vs FP32 eager: {int8_txt}) and from smaller or structurally pruned models." + agree_txt
    )


def write_docs(path: Path, md: str) -> None:
    block = (
        f"{BEGIN}\n### CPU runtimes: PyTorch, ONNX Runtime, OpenVINO (dense vs 90% sparse)\n\n"
        f"Generated by `benchmarks/runtimes.py --write-docs`; re-run it to replace this section.\n\n{md}\n{END}"
    )
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _widths(text: str) -> dict[str, float]:
    out = dict(DEFAULT_WIDTHS)
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        out[k] = float(v)
    return out


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument(
        "--widths", default="", help="per-model width, e.g. wrn_28_10=1.0 (default: wrn_28_10=0.5, others 1.0)"
    )
    ap.add_argument("--sparsities", default="0,0.9")
    ap.add_argument("--image-size", type=int, default=32, help="input height and width (224 for the imagenet_* models)")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: all cores)")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--large-batch-runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--runtimes", default="pytorch,onnxruntime,openvino")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtimes"), help="writes OUT.json and OUT.md")
    ap.add_argument("--work", type=Path, default=None, help="keep the ONNX files here (default: a temporary directory)")
    ap.add_argument(
        "--write-docs", type=Path, default=None, metavar="MARKDOWN", help="also (re)write the section in this file"
    )
    args = ap.parse_args()
    SHAPE[1:] = [args.image_size, args.image_size]
    warnings.filterwarnings("ignore")
    from pqd.commands.bench import default_threads, runtime_versions

    args.threads = [int(x) for x in args.threads.split(",")] if args.threads else [max(default_threads())]
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    sparsities = sorted(float(x) for x in args.sparsities.split(","))
    widths = _widths(args.widths)
    runtimes = [r for r in args.runtimes.split(",") if r]
    for rt, mod in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        if rt in runtimes and not (available(mod) and available("onnx") and available("onnxscript")):
            print(
                f"skipping {rt}: not installed (pip install 'pqd[{'onnx' if rt == 'onnxruntime' else 'openvino'}]')",
                file=sys.stderr,
            )
            runtimes.remove(rt)
    start, load0 = time.strftime("%Y-%m-%d %H:%M"), _loadavg()
    t0 = time.perf_counter()
    rows, infos = [], []
    with tempfile.TemporaryDirectory(prefix="pqd_runtimes_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            r, i = bench_model(name, widths.get(name, 1.0), sparsities, args, work, runtimes)
            rows += r
            infos += i
            gc.collect()
    result = {
        "command": "python benchmarks/runtimes.py " + " ".join(sys.argv[1:]),
        "date": start,
        "loadavg": load0,
        "loadavg_end": _loadavg(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "args": {
            "models": args.models,
            "widths": widths,
            "sparsities": sparsities,
            "threads": args.threads,
            "batch_sizes": args.batch_sizes,
            "runs": args.runs,
            "large_batch_runs": args.large_batch_runs,
            "warmup": args.warmup,
            "runtimes": runtimes,
            "image_size": args.image_size,
        },
        "env": environment(max(args.threads)) | {"runtimes": runtime_versions()},
        "models": infos,
        "rows": rows,
    }
    md = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(md + "\n")
    if args.write_docs:
        write_docs(args.write_docs, md)
    print(md)
    print(
        f"\n{result['wall_s']:.0f} s; wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}"
        + (f", {args.write_docs}" if args.write_docs else "")
    )


if __name__ == "__main__":
    main()
