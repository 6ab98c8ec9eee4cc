"""From a converged teacher (docs/RESULTS.md): every arm's test top-1 in OpenVINO, one interleaved timing per
budget, and the claims C1-C5 of docs/RESULTS_TEMPLATE.md.

    pqd sweep configs/sweeps/converged_r18x05.yaml --set data.root=../shared/data/cifar10-jpeg.tar.gz --out runs/converged
    pqd sweep configs/sweeps/converged_r18x05.yaml --set data.root=... --out runs/converged_scratch --only scratch
    pqd sweep configs/sweeps/converged_r18x05.yaml --set data.root=... --set structured.cache_dir=NEW_CACHE \\
        --out runs/converged_quiet --only S --only U        # the searches again, on a quiet machine
    python benchmarks/converged_study.py runs/converged runs/converged_quiet runs/converged_scratch \\
        --data ../shared/data/cifar10-jpeg.tar.gz --out benchmarks/results/converged_r18x05 \\
        --plot docs/results/converged_r18x05.png

A later sweep folder's arms replace an earlier one's of the same label and seed.

Accuracy: every INT8 model is exported (QDQ ONNX) and run by OpenVINO on the full 10,000-image test split
(NNCF's IR as NNCF wrote it); per-image correctness is cached under each run's SWEEP/study/ so a second call only times.
Latency: one interleaved run per group (the structured budgets, and the dense arms), each model in its own
worker in the controlled environment: dense FP32 (OpenVINO FP32), dense INT8 (pqd PTQ) and the floor model
(8 channels per group) beside the arms; OpenVINO at batch 1 and 64 (throughput), ONNX Runtime at batch 1;
2 threads. Run it on a quiet machine. Writes OUT.json, OUT.md and the plot of accuracy vs measured latency (--plot).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_common import ALPHA, paired_comparison, verdict

from pqd.commands.bench import runtime_versions
from pqd.commands.sweep import read_table
from pqd.commands.tune.runner import runtime_model
from pqd.compress.channels.graph import ChannelGraph, prune_to_widths
from pqd.config import DataConfig
from pqd.data import load_data
from pqd.deploy.onnx import run_logits
from pqd.measure import environment
from pqd.measure.latency import interleave
from pqd.measure.stats import correct_vector, holm, wilson_interval
from pqd.measure.workers import start_workers, workers_environment
from pqd.models import create_model
from pqd.run.config import RunConfig, read_config_file
from pqd.run.loader import load_run
from pqd.run.rundir import model_kwargs
from pqd.structured import latency_model as L
from pqd.train.checkpoint import load_weights

BUDGETS = (0.75, 0.5, 0.35)
DENSE_ARMS = ("ptq", "nncf_ptq", "QD", "PQD", "QPD")
SCRATCH = {0.5: ("scratch", "U0.5_same_widths")}  # budget -> the trained-from-scratch arm and its pruned twin
LATENCY_MATCH = 0.05  # C4: S and uniform count as timed at the same latency when their same-run ratios differ by <= 5%
THREADS = 2


def label_of(row: dict) -> str:
    axes = json.loads(row.get("axes_json") or "{}")
    frac = axes.get("structured.budget_fraction")
    return row["variant"] if frac is None else f"{row['variant']}{frac:g}"


def arms(sweeps: list[Path]) -> dict[str, dict[int, Path]]:
    """label -> seed -> run folder, finished runs only (the first sweep's teacher run of seed 0 is 'dense').

    A later sweep's arm replaces an earlier one's of the same label and seed. The scratch arm's pruned twin, the run
    whose widths it trained from scratch (its ``structured.widths_from``), is kept as ``U0.5_same_widths``: C5
    compares the two at the same architecture even when a later sweep re-ran U0.5.
    """
    out: dict[str, dict[int, Path]] = {}
    for i, sweep in enumerate(sweeps):
        for r in read_table(sweep):
            if r["kind"] == "teacher" and (r["seed"] != 0 or i > 0):
                continue
            run = sweep / r["run_dir"]
            out.setdefault(label_of(r), {})[int(r["seed"])] = run
            if r["variant"] == "scratch":
                twin = Path(read_config_file(run / "config.yaml")["structured"]["widths_from"])
                out.setdefault("U0.5_same_widths", {})[int(r["seed"])] = twin
    return out


def test_correctness(label: str, run: Path, data) -> np.ndarray:
    """Per-image correctness on the test split in OpenVINO (cached in the run's own sweep folder, SWEEP/study/)."""
    cache = run.parent.parent / "study"
    f = cache / f"{run.name}.npy"
    if f.exists():
        return np.load(f)
    if label == "nncf_ptq":
        from pqd.deploy.runtimes import OpenVinoRunner

        model = OpenVinoRunner(run / "nncf_int8.xml", threads=THREADS)
    elif label == "dense":
        model = runtime_model_fp32(run, data)
    else:
        model = runtime_model(run, "openvino", THREADS, load_run(run, data=data, allow_code=False))
    correct = correct_vector(run_logits(model, data.test, mean=data.mean, std=data.std), data.test.y)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(f, correct)
    return correct


def runtime_model_fp32(teacher_run: Path, data):
    """The dense FP32 teacher as OpenVINO runs it (its FP32 ONNX file, written by the dense INT8 run's export)."""
    from pqd.deploy.runtimes import OpenVinoRunner

    onnx = fp32_onnx(teacher_run.parent)
    return OpenVinoRunner(onnx, threads=THREADS)


def fp32_onnx(runs: Path) -> Path:
    p = runs / "ptq__seed0" / "teacher_fp32.onnx"
    if not p.exists():
        raise SystemExit(f"{p} is missing: run this script once the ptq arm has finished (its export writes it)")
    return p


def floor_onnx(ptq_run: Path, data, workdir: Path, runtime: str) -> Path:
    """The floor model (every group at 8 channels) as an INT8 file: timed beside every group (weights do not matter)."""
    config = RunConfig.from_dict(read_config_file(ptq_run / "config.yaml"))
    model = create_model(config.model.name, num_classes=data.num_classes, **model_kwargs(config))
    model.load_state_dict(load_weights(ptq_run / "teacher.safetensors"))
    example = torch.zeros(2, *data.image_shape)
    graph = ChannelGraph(model, example)
    floor = prune_to_widths(model.eval(), L.floor_widths(graph), example=example, round_to=1)
    return Path(L.export_int8(floor, example, runtime, workdir / "floor", target=L.Target(runtime))["path"])


def time_group(files: dict[str, dict], data, *, runs: int) -> list[dict]:
    """One interleaved timing of ``files`` ({name: {'openvino': path, 'onnxruntime': path or None}})."""
    recs = []
    base = {"input_shape": list(data.image_shape), "seed": 0, "threads": THREADS}
    for runtime, batches in (("openvino", (1, 64)), ("onnxruntime", (1,))):
        specs = {
            n: base | {"kind": runtime, "path": str(f[runtime]), "batch_sizes": list(batches)}
            for n, f in files.items()
            if f.get(runtime)
        }
        with start_workers(specs) as workers:
            env = workers_environment(workers)
            for r in interleave(workers, batch_sizes=batches, threads=THREADS, runs=runs, large_batch_runs=20):
                recs.append(r | {"runtime": runtime, "latency_env": env})
    return recs


def macs_of(run: Path) -> tuple[int | None, int | None]:
    m = json.loads((run / "metrics.json").read_text())
    for s in m.get("stage_records") or []:
        rec = s.get("records") or {}
        if "macs" in rec:
            return rec["macs"], rec["dense_macs"]
    return None, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", help="the sweep folder, then any more (e.g. the scratch arm's)")
    ap.add_argument("--data", required=True, help="CIFAR-10 (the sweep's data.root)")
    ap.add_argument("--out", required=True, help="path without suffix")
    ap.add_argument("--plot", default=None, help="the frontier plot (default: OUT.png)")
    ap.add_argument("--runs", type=int, default=200, help="timed batch-1 calls per model and runtime")
    ap.add_argument("--no-latency", action="store_true", help="accuracy and claims only (reuses OUT.json's timing)")
    a = ap.parse_args(argv)
    sweeps, out = [Path(p) for p in a.sweeps], Path(a.out)
    sweep = sweeps[0]
    data = load_data(DataConfig(dataset="cifar10", root=a.data))
    found = arms(sweeps)
    runs_dir = sweep / "runs"
    correct = {lab: {s: test_correctness(lab, p, data) for s, p in seeds.items()} for lab, seeds in found.items()}
    result: dict = {
        "command": "python benchmarks/converged_study.py " + " ".join(argv or sys.argv[1:]),
        "sweeps": [str(p) for p in sweeps],
        "arms": {},
        "claims": {},
    }
    for lab, seeds in correct.items():
        k, n = sum(int(c.sum()) for c in seeds.values()), sum(len(c) for c in seeds.values())
        per_seed = {s: float(c.mean()) for s, c in seeds.items()}
        lo, hi = wilson_interval(k, n)
        macs, dense_macs = macs_of(next(iter(found[lab].values())))
        result["arms"][lab] = {
            "seeds": sorted(seeds),
            "top1_pooled": k / n,
            "top1_ci": [lo, hi],
            "top1_per_seed": per_seed,
            "n": n,
            "macs": macs,
            "dense_macs": dense_macs,
            "runs": {s: str(p) for s, p in found[lab].items()},
        }
    if a.no_latency:
        prior = out.with_suffix(".json")
        before = json.loads(prior.read_text()) if prior.exists() else {}
        result["latency"] = before.get("latency", {"groups": {}})
        result["latency_command"] = before.get("latency_command", before.get("command"))
    else:
        result["latency"] = measure_all(found, data, runs_dir, a.runs)
        result["latency_command"] = result["command"]
    decide(result, correct)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(to_markdown(result))
    plot(result, Path(a.plot) if a.plot else out.with_suffix(".png"))
    print(to_markdown(result))
    return 0


def measure_all(found, data, runs_dir: Path, runs: int) -> dict:
    groups = {"dense arms": [lab for lab in DENSE_ARMS if lab in found]}
    for b in BUDGETS:
        groups[f"{b:g}x"] = [lab for lab in (f"S{b:g}", f"U{b:g}", *SCRATCH.get(b, ())) if lab in found]
    ptq = found["ptq"][0]
    with tempfile.TemporaryDirectory(prefix="pqd_study_") as tmp:
        floor_file = floor_onnx(ptq, data, Path(tmp), "openvino")  # the same QDQ ONNX file runs in both runtimes
        floor = {"openvino": floor_file, "onnxruntime": floor_file}
        refs = {
            "dense_fp32": {"openvino": fp32_onnx(runs_dir), "onnxruntime": fp32_onnx(runs_dir)},
            "dense_int8": {"openvino": ptq / "model_int8.onnx", "onnxruntime": ptq / "model_int8.onnx"},
            "floor": floor,
        }
        timing = {"env": environment(THREADS), "runtimes": runtime_versions(), "groups": {}}
        for name, labels in groups.items():
            files = dict(refs)
            for lab in labels:
                if lab == "ptq":
                    continue
                for s, run in sorted(found[lab].items()):
                    if lab == "nncf_ptq":
                        files[f"{lab}/{s}"] = {"openvino": run / "nncf_int8.xml"}
                    else:
                        files[f"{lab}/{s}"] = {
                            "openvino": run / "model_int8.onnx",
                            "onnxruntime": run / "model_int8.onnx",
                        }
            print(f"timing group {name}: {len(files)} models", file=sys.stderr)
            timing["groups"][name] = time_group(files, data, runs=runs)
    return timing


def median(latency: dict, group: str, model: str, runtime: str = "openvino", batch: int = 1) -> float | None:
    for r in latency["groups"].get(group, []):
        if r["model"] == model and r["runtime"] == runtime and r["batch"] == batch:
            return r["median_ms"]
    return None


def arm_latency(latency: dict, lab: str) -> dict:
    """An arm's medians (mean over seeds) and its ratios to dense INT8 and FP32 in the same group's run."""
    group = next(
        (g for g, recs in latency["groups"].items() if any(r["model"].split("/")[0] == lab for r in recs)), None
    )
    if lab == "ptq":
        group, names = "dense arms", ["dense_int8"]
    elif group is None:
        return {}
    else:
        names = sorted({r["model"] for r in latency["groups"][group] if r["model"].split("/")[0] == lab})
    out = {"group": group}
    for rt, b in (("openvino", 1), ("openvino", 64), ("onnxruntime", 1)):
        ms = [m for m in (median(latency, group, n, rt, b) for n in names) if m is not None]
        if not ms:
            continue
        v = float(np.mean(ms))
        int8, fp32 = median(latency, group, "dense_int8", rt, b), median(latency, group, "dense_fp32", rt, b)
        key = f"{rt}_b{b}"
        out[key] = {"median_ms": v, "x_vs_dense_int8": int8 / v if int8 else None, "x_vs_dense_fp32": fp32 / v}
        if b > 1:
            out[key]["images_per_s"] = 1000 * b / v
    return out


def decide(result: dict, correct: dict) -> None:
    lat = result["latency"]
    for lab in result["arms"]:
        result["arms"][lab]["latency"] = arm_latency(lat, lab)
    ptq = correct.get("ptq", {}).get(0)

    def vs(a: str, b: str) -> dict | None:
        """A vs B pooled over A's seeds; a deterministic single-seed B (PTQ, NNCF) is paired with every seed of A."""
        if a not in correct or b not in correct:
            return None
        ca, cb = correct[a], correct[b]
        if len(cb) == 1 and len(ca) > 1:
            cb = {s: next(iter(cb.values())) for s in ca}
        rec = paired_comparison(ca, cb)
        return None if rec is None else rec | {"a": a, "b": b}

    def family(pairs) -> list[dict]:
        recs = [r for r in (vs(a, b) for a, b in pairs) if r]
        for r, adj in zip(recs, holm([r["p"] for r in recs]), strict=True):
            r["p_holm"] = adj
            r["verdict"] = verdict(r["difference"], adj, r["ci"][1], r["seeds_b_better"])
        return recs

    # C1: every S and U arm vs dense INT8: 2x faster (same run) within 1 point (pooled drop, point estimate)
    c1 = []
    for lab in [f"{v}{b:g}" for b in BUDGETS for v in ("S", "U")]:
        r = vs(lab, "ptq") if ptq is not None else None
        x = result["arms"].get(lab, {}).get("latency", {}).get("openvino_b1", {}).get("x_vs_dense_int8")
        if r is None or x is None:
            continue
        drop = -100 * r["difference"]
        drop_hi = -100 * r["ci"][0]
        fast = x >= 2.0
        status = ("met" if drop_hi <= 1.0 else "met, not significantly") if fast and drop <= 1.0 else "not met"
        c1.append(
            r
            | {
                "x_vs_dense_int8": x,
                "drop_points": drop,
                "drop_ci_points": [-100 * r["ci"][1], drop_hi],
                "status": status,
            }
        )
    within = [r for r in c1 if r["drop_points"] <= 1.0]
    result["claims"]["C1"] = {
        "rows": c1,
        "fastest_within_1_point": max(within, key=lambda r: r["x_vs_dense_int8"])["a"] if within else None,
        "verdict": "met"
        if any(r["status"] == "met" for r in c1)
        else ("met, not significantly" if any(r["status"].startswith("met") for r in c1) else "not met"),
    }
    result["claims"]["C2"] = {"rows": family([("PQD", "ptq"), ("PQD", "nncf_ptq")]), "reported": [vs("QPD", "PQD")]}
    result["claims"]["C3"] = {"rows": family([("QD", "ptq")])}
    c4 = family([(f"S{b:g}", f"U{b:g}") for b in BUDGETS])
    for r in c4:  # the rule compares the two at the same measured latency, within the measurement's spread
        xa, xb = (result["arms"][k]["latency"].get("openvino_b1", {}).get("x_vs_dense_int8") for k in (r["a"], r["b"]))
        r["x_pair_vs_dense_int8"] = [xa, xb]
        if xa and xb and abs(xa / xb - 1) > LATENCY_MATCH:
            r["verdict"] = f"not decided: latency not matched ({xa:.2f}x vs {xb:.2f}x dense INT8)"
            if r["p_holm"] < ALPHA:  # reported beside the rule: one arm both faster and more accurate
                faster_better = (xa > xb) == (r["difference"] > 0)
                r["dominance"] = (
                    f"{r['a'] if r['difference'] > 0 else r['b']} is faster and more accurate"
                    if faster_better
                    else None
                )
                if faster_better:
                    r["verdict"] += f"; {r['dominance']}"
    holds = sum(r["verdict"] == "holds" for r in c4)
    loses = sum(r["difference"] < 0 and r["p_holm"] < ALPHA and not r["verdict"].startswith("not decided") for r in c4)
    result["claims"]["C4"] = {
        "rows": c4,
        "verdict": c4_verdict(c4, holds, loses),
    }
    result["claims"]["C5"] = {"rows": family([("S0.5", "scratch"), ("U0.5_same_widths", "scratch")])}
    if not result["claims"]["C5"]["rows"]:
        result["claims"]["C5"]["verdict"] = "not run: no trained-from-scratch arm in the sweep"


def c4_verdict(rows: list[dict], holds: int, loses: int) -> str:
    """C4 overall: holds at >= 2 budgets and loses at none; budgets whose arms were not timed alike decide nothing,
    so the claim is undecided only while they could still make it hold."""
    if not rows:
        return "not run"
    if holds >= 2 and loses == 0:
        return "holds"
    undecided = sum(r["verdict"].startswith("not decided") for r in rows)
    if loses or holds + undecided < 2:
        return "does not hold"
    if undecided:
        return "not decided: the arms were not timed at the same latency"
    return "not resolved at this scale"


def _f(v, fmt=".2f") -> str:
    return "–" if v is None else format(v, fmt)


def to_markdown(r: dict) -> str:
    lines = [f"Command: `{r['command']}`", ""]
    if r.get("latency_command") and r["latency_command"] != r["command"]:
        lines += [f"Latency from: `{r['latency_command']}`", ""]
    lat = r["latency"]
    env = lat.get("env", {})
    lines += [
        f"CPU: {env.get('cpu_model', '?')}; {THREADS} threads; runtimes: "
        + ", ".join(f"{k} {v}" for k, v in (lat.get("runtimes") or {}).items()),
        "",
        "| arm | seeds | test top-1 % (pooled) [95% CI] | per seed | OV b1 ms | x vs dense INT8 | x vs FP32 | ORT b1 ms "
        "| ORT x vs INT8 | OV b64 img/s | MACs (M) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lab, a in r["arms"].items():
        la = a.get("latency", {})
        ov, ort, b64 = la.get("openvino_b1", {}), la.get("onnxruntime_b1", {}), la.get("openvino_b64", {})
        lines.append(
            f"| {lab} | {len(a['seeds'])} | {100 * a['top1_pooled']:.2f} [{100 * a['top1_ci'][0]:.1f}, "
            f"{100 * a['top1_ci'][1]:.1f}] | "
            + " / ".join(f"{100 * v:.2f}" for v in a["top1_per_seed"].values())
            + f" | {_f(ov.get('median_ms'), '.3f')} | {_f(ov.get('x_vs_dense_int8'))} | {_f(ov.get('x_vs_dense_fp32'))} "
            f"| {_f(ort.get('median_ms'), '.3f')} | {_f(ort.get('x_vs_dense_int8'))} | {_f(b64.get('images_per_s'), '.0f')} "
            f"| {_f(a['macs'] / 1e6 if a.get('macs') else None, '.1f')} |"
        )
    lines += ["", "Reference models per timing group (OpenVINO batch 1 median ms): "]
    for g in lat.get("groups", {}):
        refs = ", ".join(f"{n} {_f(median(lat, g, n), '.3f')}" for n in ("dense_fp32", "dense_int8", "floor"))
        lines.append(f"- {g}: {refs}")
    for name, claim in r["claims"].items():
        lines += ["", f"### {name}" + (f": {claim['verdict']}" if "verdict" in claim else ""), ""]
        lines += [
            "| A | B | A - B, points [95% CI] | McNemar p | Holm p | seeds A/B better | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in claim["rows"] + [y for y in claim.get("reported", []) if y]:
            lines.append(
                f"| {x['a']} | {x['b']} | {100 * x['difference']:+.2f} [{100 * x['ci'][0]:+.2f}, {100 * x['ci'][1]:+.2f}] "
                f"| {x['p']:.3g} | {_f(x.get('p_holm'), '.3g')} | {x['seeds_a_better']}/{x['seeds_b_better']} "
                f"| {x.get('status') or x.get('verdict') or 'reported'}"
                + (f" ({x['x_vs_dense_int8']:.2f}x)" if "x_vs_dense_int8" in x else "")
                + " |"
            )
        if name == "C1":
            lines.append(f"\nFastest arm within 1 point of dense INT8: {claim['fastest_within_1_point'] or 'none'}")
    return "\n".join(lines) + "\n"


def colour(label: str) -> str:
    """S arms blue, uniform orange, the trained-from-scratch arm red, the dense arms green."""
    return "C3" if label == "scratch" else "C0" if label.startswith("S") else "C1" if label.startswith("U") else "C2"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lab, a in r["arms"].items():
        x = a.get("latency", {}).get("openvino_b1", {}).get("x_vs_dense_int8")
        if x is None:
            continue
        for t in a["top1_per_seed"].values():
            ax.scatter(x, 100 * t, color=colour(lab), s=18)
        ax.annotate(lab, (x, 100 * a["top1_pooled"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if "ptq" in r["arms"]:
        ax.axhline(100 * r["arms"]["ptq"]["top1_pooled"] - 1, ls="--", lw=0.8, color="grey")
    ax.set_xlabel("speed-up over dense INT8, OpenVINO batch 1, 2 threads (same run)")
    ax.set_ylabel("test top-1 % (10,000 images)")
    ax.set_title(
        "From a converged ResNet-18 x0.5 teacher (blue: S, orange: uniform, red: trained from scratch,\n"
        "green: dense INT8 arms)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
