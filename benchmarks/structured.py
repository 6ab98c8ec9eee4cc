"""Structured pruning under measured INT8 latency budgets vs uniform width scaling and MACs-chosen pruning.

    python benchmarks/structured.py --data ../shared/data/cifar10-jpeg.tar.gz            # the full study (hours on 2 cores)
    python benchmarks/structured.py --data ../shared/data/cifar10-jpeg.tar.gz --quick    # minutes: plumbing check

For each model (ResNet-18, VGG-16-BN): a dense FP32 teacher is trained (or loaded with
``--teacher-weights``); the latency model of its widths is measured on the target (OpenVINO
INT8, batch 1, 2 threads by default); for each budget (0.75 / 0.5 / 0.35 × the dense INT8
latency) the search chooses widths and corrects them until the measured latency meets the
budget. Two baselines get the same training: (a) uniform width scaling (every group keeps
the same ratio), the ratio whose measured latency is nearest the structured model's in the
final interleaved run (a measured curve of ratios picks three candidates); (b) widths
chosen by MACs alone, at the structured model's MACs. Every architecture's INT8 latency is
then measured in one interleaved run, and every variant (dense included) is trained the
same way from the teacher: KD fine-tuning in FP32, QAT, KD under fake quantization; top-1
is of the converted INT8 model on the test split.

Results: benchmarks/results/structured.{json,md} (``--quick`` writes structured_quick.*).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import bench_ranker, validation_images

from pqd.compress.channels.graph import ChannelGraph, prune_to_widths
from pqd.compress.channels.importance import group_scores, uniform_widths
from pqd.compress.student import Student, convert_student
from pqd.config import DataConfig, TrainConfig
from pqd.data import load_data
from pqd.measure.accuracy import predict, top1
from pqd.measure.env import environment
from pqd.measure.stats import mcnemar_pooled, wilson_interval
from pqd.models.registry import create_model
from pqd.stages.distill import DistillConfig, distill
from pqd.stages.quantize import QuantizeConfig, quantize
from pqd.structured import latency_model as L
from pqd.structured.search import Budget, SearchOptions, Selection, cost_function, greedy_widths, search
from pqd.train.checkpoint import load_checkpoint, save_checkpoint
from pqd.train.loop import train

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench.structured")


def macs_model() -> L.LatencyModel:
    lm = L.LatencyModel(key={"proxy": "macs"}, pad=1)
    lm.coef = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # features are MACs in millions
    return lm


def uniform_curve(teacher, graph, scores, example, target, shape, args, chosen: dict) -> tuple[list[dict], dict]:
    """Measured INT8 latency of uniformly width-scaled models (keep ratio 0.25 .. 0.95) and of the
    ``chosen`` widths, in one interleaved run.

    The uniform baseline is matched to the structured model on *measured* latency from the same
    run, not on the latency model's prediction: the model's error would otherwise decide the comparison.
    """
    ratios = [round(float(r), 2) for r in np.arange(0.25, 0.96, 0.05)]
    ws = {f"u{r:.2f}": uniform_widths(graph.widths(), r, round_to=args.round_to) for r in ratios} | chosen
    models = {k: prune_to_widths(teacher, w, example=example, round_to=1, scores=scores) for k, w in ws.items()}
    ms = L.measure_int8(models, target=target, input_shape=shape, runs=args.runs)
    return [{"keep_ratio": r, "widths": ws[f"u{r:.2f}"], "measured_ms": ms[f"u{r:.2f}"]} for r in ratios], {
        k: ms[k] for k in chosen
    }


def closest(curve: list[dict], ms: float) -> dict:
    """The point of the measured uniform curve whose latency is nearest ``ms``."""
    return min(curve, key=lambda c: abs(c["measured_ms"] - ms))


def paired(a: list, b: list) -> dict:
    """Pooled McNemar over seeds: ``a`` vs ``b`` (lists of per-image correctness, one per seed)."""
    return mcnemar_pooled([(int((x & ~y).sum()), int((~x & y).sum())) for x, y in zip(a, b, strict=True)])


def finetune_and_quantize(model, teacher, data, args, seed: int) -> float:
    """KD fine-tune (FP32) -> QAT -> KD (fake quant); top-1 of the converted INT8 model on the test split."""
    tc = TrainConfig(batch_size=args.batch_size, progress=False, threads=args.threads_train)
    st = Student(copy.deepcopy(model))
    dcfg = DistillConfig(lr=args.ft_lr)
    if args.ft_epochs:
        st = distill(st, dcfg, teacher=teacher, data=data, epochs=args.ft_epochs, train_config=tc, seed=seed)
    st = quantize(st, QuantizeConfig(), data=data, epochs=args.qat_epochs, train_config=tc, seed=seed)
    if args.kd_epochs:
        st = distill(st, DistillConfig(), teacher=teacher, data=data, epochs=args.kd_epochs, train_config=tc, seed=seed)
    int8 = convert_student(st)
    return predict(int8, data.test, mean=data.mean, std=data.std).argmax(1) == data.test.y  # per-image correctness


def run_model(name: str, data, args, partial=None) -> dict:
    """``partial(rows)`` is called after each variant, so a cut-off run keeps what it measured."""
    t0 = time.time()
    correct_by_variant: dict[str, list] = {}
    kwargs = {"width": args.width} if args.width != 1.0 else {}
    torch.manual_seed(0)
    teacher = create_model(name, num_classes=data.num_classes, **kwargs)
    cached = (
        Path(args.cache_dir)
        / f"teacher_{name}_w{args.width}_n{args.train_subset}_e{args.teacher_epochs}_lr{args.teacher_lr:g}.safetensors"
        if args.cache_dir
        else None
    )  # a re-run after a cut-off reuses the teacher
    if args.teacher_weights or (cached and cached.exists()):
        teacher.load_state_dict(load_checkpoint(args.teacher_weights or cached)[0])
    elif args.no_train and args.image_size:  # latency only at another input size: the weights' values do not matter
        log.info(
            "%s: latency only at %dx%d: untrained weights (L1 importance of the initialisation)",
            name,
            args.image_size,
            args.image_size,
        )
    else:
        train(
            teacher,
            data,
            epochs=args.teacher_epochs,
            lr=args.teacher_lr,
            config=TrainConfig(batch_size=args.batch_size, progress=False, threads=args.threads_train),
            tag="teacher",
        )
        if cached:
            save_checkpoint(cached, teacher.state_dict(), {"model": name, "epochs": args.teacher_epochs})
    teacher.eval()
    teacher_top1 = top1(predict(teacher, data.test, mean=data.mean, std=data.std), data.test.y)
    shape = (data.image_shape[0], args.image_size, args.image_size) if args.image_size else data.image_shape
    example = torch.zeros(2, *shape)
    graph = ChannelGraph(copy.deepcopy(teacher), example)
    scores = group_scores(graph, "l1")
    sensitivity = None
    if (
        args.criterion == "sensitivity"
    ):  # measured accuracy drop per group and keep ratio, on images the teacher never saw
        from dataclasses import replace

        from pqd.structured.sensitivity import analyze

        sensitivity = analyze(
            teacher,
            replace(data, val=validation_images(data, args)),
            keep_ratios=(0.75, 0.5, 0.25),
            quantize=False,
            max_images=args.val_images,
        )
    recipes = rank = None
    if (
        args.select == "adapted_bn"
    ):  # several recipes per target, ranked by top-1 after re-estimating BN (pqd.structured.select)
        from pqd.structured.select import width_recipes

        recipes = width_recipes(
            graph,
            scores,
            cost=cost_function(graph, scores, sensitivity),
            round_to=args.round_to,
            min_keep=args.min_keep,
        )
        rank = bench_ranker(teacher, scores, example, data, args)
    target = L.Target(args.runtime, args.batch, args.threads)
    lm = L.build(
        teacher,
        graph,
        target=target,
        input_shape=shape,
        samples=args.samples,
        runs=args.runs,
        round_to=args.round_to,
        cache_dir=args.cache_dir,
    )
    calib_loo = L.report(lm, graph)
    dense_ms = lm.dense_ms(graph)
    variants = {"dense": (graph.widths(), {})}
    searches = {}
    for b in args.budgets:
        pruned, rec = search(
            teacher,
            lm,
            graph,
            target=target,
            input_shape=shape,
            dense_ms=dense_ms,
            budget=Budget(fraction=b, margin=args.margin),
            selection=Selection(scores=scores, sensitivity=sensitivity, recipes=recipes, rank=rank),
            options=SearchOptions(
                round_to=args.round_to,
                min_keep=args.min_keep,
                max_iters=args.max_iters,
                runs=args.runs,
                cache_dir=args.cache_dir,
            ),
        )
        searches[b] = rec
        variants[f"structured@{b}"] = (rec["widths"], {"budget": b})
        if "macs" in args.baselines:
            cost = cost_function(graph, scores, None)
            variants[f"macs@{b}"] = (
                greedy_widths(graph, macs_model(), cost, rec["macs"] / 1e6, round_to=args.round_to),
                {"budget": b},
            )
    ucurve, same_run = uniform_curve(
        teacher,
        graph,
        scores,
        example,
        target,
        shape,
        args,
        {f"structured@{b}": searches[b]["widths"] for b in args.budgets},
    )
    candidates = {}  # the nearest uniform point and its neighbours go into the final run; the match is made there
    for b in args.budgets:
        i = ucurve.index(closest(ucurve, same_run[f"structured@{b}"]))
        for u in ucurve[max(0, i - 1) : i + 2]:
            candidates[f"uniform?{b}?{u['keep_ratio']}"] = (u["widths"], {"budget": b, "keep_ratio": u["keep_ratio"]})
    variants = {
        k: variants[k]
        for k in ["dense"] + [f"{kind}@{b}" for b in args.budgets for kind in ("structured", "macs")]
        if k in variants
    }
    models = {
        k: prune_to_widths(teacher, w, example=example, round_to=1, scores=scores)
        for k, (w, _) in (variants | candidates).items()
    }
    refs = L.reference_models(
        teacher, graph, example=example, round_to=args.round_to
    )  # the floor model anchors predictions
    measured = L.measure_int8(
        models | {k: v for k, v in refs.items() if k not in models},
        target=target,
        input_shape=shape,
        runs=args.final_runs,
    )
    for b in args.budgets:  # the uniform model whose latency in this run is nearest the structured model's
        best = min(
            (k for k in candidates if k.startswith(f"uniform?{b}?")),
            key=lambda k: abs(measured[k] - measured[f"structured@{b}"]),
        )
        variants[f"uniform@{b}"], models[f"uniform@{b}"], measured[f"uniform@{b}"] = (
            candidates[best],
            models[best],
            measured[best],
        )
    variants = {
        k: variants[k]
        for k in ["dense"] + [f"{kind}@{b}" for b in args.budgets for kind in ("structured", "uniform", "macs")]
        if k in variants and (k.split("@")[0] in ("dense", "structured") or k.split("@")[0] in args.baselines)
    }
    rows = []
    for k, (w, extra) in variants.items():
        pred = lm.predict(graph, w)
        pred_run = lm.predict_in_run(graph, w, dense_ms=measured["dense"], floor_ms=measured.get("floor"))
        row = {
            "model": name,
            "variant": k,
            **extra,
            "measured_ms": measured[k],
            "predicted_ms": pred,
            "prediction_error": pred / measured[k] - 1,
            "predicted_ms_same_run": pred_run,
            "prediction_error_same_run": pred_run / measured[k] - 1,
            "ratio_to_dense": measured[k] / measured["dense"],
            "macs": sum(r.macs for r in graph.layer_shapes(w)),
            "dense_macs": sum(r.macs for r in graph.layers),
            "params": sum(p.numel() for p in models[k].parameters()),
            "widths": w,
        }
        if "budget" in extra:
            row["budget_ms_search"] = searches[extra["budget"]]["budget_ms"]
            row["meets_budget_final"] = measured[k] <= extra["budget"] * measured["dense"]
        correct = (
            [finetune_and_quantize(models[k], teacher, data, args, seed) for seed in args.seeds]
            if not args.no_train
            else []
        )
        accs = [float(c.float().mean()) for c in correct]
        row["int8_top1"] = accs
        row["int8_top1_ci95"] = [list(wilson_interval(int(c.sum()), len(c))) for c in correct]
        row["int8_top1_mean"] = float(np.mean(accs)) if accs else None
        if correct:
            correct_by_variant[k] = correct
            if k != "dense" and "dense" in correct_by_variant:  # paired vs the dense INT8 model, same seeds, pooled
                row["vs_dense_mcnemar"] = paired(correct_by_variant["dense"], correct)
            s_key = f"structured@{extra.get('budget')}"
            if k != s_key and s_key in correct_by_variant:  # the baseline vs the structured model at its budget
                row["structured_vs_this_mcnemar"] = paired(correct_by_variant[s_key], correct)
        rows.append(row)
        if partial is not None:
            partial(rows)
        log.info("%s %s: %.3f ms (pred %.3f), top1 %s", name, k, measured[k], pred, accs)
    return {
        "model": name,
        "width": args.width,
        "teacher_top1": teacher_top1,
        "criterion": args.criterion,
        "select": args.select,
        "sensitivity": sensitivity,
        "dense_int8_ms_calibration": dense_ms,
        "floor_ms_final": measured.get("floor"),
        "latency_model": calib_loo,
        "uniform_curve": [{k: v for k, v in c.items() if k != "widths"} for c in ucurve],
        "searches": {str(b): r for b, r in searches.items()},
        "rows": rows,
        "seconds": time.time() - t0,
    }


def to_markdown(result: dict) -> str:
    a = result["args"]
    out = [
        f"# Structured pruning under measured INT8 latency budgets ({'quick' if a['quick'] else 'full'})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Target: {a['runtime']} INT8, batch {a['batch']}, {a['threads']} threads; CPU {result['env']['cpu_model']}; "
        f"train subset {a['train_subset']}, test subset {a['test_subset']}, teacher {a['teacher_epochs']} ep, "
        f"KD fine-tune {a['ft_epochs']} + QAT {a['qat_epochs']} + KD {a['kd_epochs']} ep; seeds {a['seeds']}"
        f"{'; search margin ' + format(a['margin'], 'g') if a.get('margin') else ''}.",
        "",
    ]
    for m in result["models"]:
        lm = m["latency_model"]
        out += [
            f"## {m['model']} (width {m['width']}), teacher FP32 top-1 {m['teacher_top1']:.4f}, "
            f"structured widths chosen by {m.get('criterion', 'l1')}"
            + (", recipes ranked by top-1 after adaptive BN" if m.get("select") == "adapted_bn" else ""),
            "",
            f"Latency model: {lm['samples']} samples, leave-one-out |error| mean {lm['loo_abs_error_mean']:.3f}, "
            f"max {lm['loo_abs_error_max']:.3f}.",
            "",
            "INT8 top-1: mean over seeds, each seed's 95% Wilson interval; p: pooled McNemar over seeds "
            "(vs dense INT8; for baselines, structured model vs this one; `+` = structured better).",
            "",
            "Pred. error: the latency model's prediction at its median reference readings / measured − 1; same run: "
            "predicted in this run's own readings of the dense and floor models (a model fitted before the floor "
            "model was timed: the predicted ratio to dense × this run's dense reading), / measured − 1."
            + (
                f" Floor model (every group at {a['round_to']} channels) in this run: {m['floor_ms_final']:.3f} ms."
                if m.get("floor_ms_final")
                else ""
            ),
            "",
            "| variant | measured ms | predicted ms | pred. error | same-run error | × dense | meets budget | MACs (M) | INT8 top-1 (per seed, 95% CI) | p vs dense | p structured vs this |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        dense_row = next(r for r in m["rows"] if r["variant"] == "dense")
        for r in m["rows"]:
            anchored = r.get(
                "prediction_error_same_run",
                r["predicted_ms"] / dense_row["predicted_ms"] * dense_row["measured_ms"] / r["measured_ms"] - 1,
            )
            acc = f"{r['int8_top1_mean']:.4f}" if r["int8_top1_mean"] is not None else "-"
            if r["int8_top1"]:
                acc += (
                    " ("
                    + "; ".join(
                        f"{t:.4f} [{lo:.4f}, {hi:.4f}]"
                        for t, (lo, hi) in zip(r["int8_top1"], r["int8_top1_ci95"], strict=True)
                    )
                    + ")"
                )
            meets = {True: "yes", False: "no"}.get(r.get("meets_budget_final"), "")

            def pv(rec, sign=False):
                if not rec:
                    return ""
                mark = ("+" if rec["b"] > rec["c"] else "-" if rec["c"] > rec["b"] else "=") if sign else ""
                return f"{rec['p_value']:.3g}{mark}"

            out.append(
                f"| {r['variant']} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | {r['prediction_error']:+.3f} | {anchored:+.3f} | "
                f"{r['ratio_to_dense']:.3f} | {meets} | {r['macs'] / 1e6:.1f} | {acc} | {pv(r.get('vs_dense_mcnemar'))} | "
                f"{pv(r.get('structured_vs_this_mcnemar'), True)} |"
            )
        if m.get("uniform_curve"):
            out += [
                "",
                "Uniform baseline, measured INT8 latency by keep ratio (the baseline at each budget is the point nearest "
                "the structured model's measured latency): "
                + ", ".join(f"{c['keep_ratio']:.2f} → {c['measured_ms']:.3f} ms" for c in m["uniform_curve"]),
            ]
        out += ["", "Search iterations (target → predicted / measured ms):", ""]
        for b, s in m["searches"].items():
            its = "; ".join(
                f"{i['target_ms']:.3f} → {i['predicted_ms']:.3f} / {i['measured_ms']:.3f}" for i in s["iterations"]
            )
            out.append(f"- budget {b} × dense = {s['budget_ms']:.3f} ms: met={s['met']}; {its}")
            if s.get("choice_test"):
                t = s["choice_test"]
                out.append(
                    f"  - choice: best {t['best']} vs {t['vs']}, {t['difference']:+.4f}, McNemar p = {t['p_value']:.3g} "
                    f"(α {t['alpha']}): chose {s['recipe']}"
                )
            if s.get("candidates"):
                out.append(
                    "  - recipes ranked by top-1 after adaptive BN (predicted ms): "
                    + ", ".join(
                        f"{'**' if c['recipe'] == s['recipe'] else ''}{c['recipe']} {c['score']:.3f} ({c['predicted_ms']:.3f})"
                        f"{'**' if c['recipe'] == s['recipe'] else ''}"
                        for c in s["candidates"]
                    )
                )
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    p.add_argument("--models", nargs="+", default=["resnet18", "vgg16_bn"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.35])
    p.add_argument("--runtime", default="openvino", choices=L.RUNTIMES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--threads-train", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--test-subset", type=int, default=None, help="default: the full 10,000-image test split")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--teacher-lr", type=float, default=0.1, help="VGG-16-BN on a small subset needs less (0.02)")
    p.add_argument("--teacher-weights")
    p.add_argument("--ft-epochs", type=int, default=3)
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--kd-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--final-runs", type=int, default=300)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--max-iters", type=int, default=4)
    p.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="structured.margin: correct until the measured latency is at most (1 - margin) x the budget",
    )
    p.add_argument("--cache-dir")
    p.add_argument(
        "--criterion",
        default="l1",
        choices=["l1", "sensitivity"],
        help="l1: retained L1 importance per predicted ms; sensitivity: measured accuracy drop per group (pqd analyze) "
        "on --val-images training images outside the training subset",
    )
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument(
        "--select",
        default="greedy",
        choices=["greedy", "adapted_bn"],
        help="adapted_bn: several width recipes per target (uniform among them), ranked by top-1 after re-estimating BN "
        "statistics on --select-images training images, on --val-images held-out training-split images",
    )
    p.add_argument("--select-images", type=int, default=512)
    p.add_argument(
        "--min-keep", type=float, default=0.1, help="the search keeps at least this share of every group's channels"
    )
    p.add_argument("--baselines", nargs="*", default=["uniform", "macs"], choices=["uniform", "macs"])
    p.add_argument("--no-train", action="store_true", help="latency only: skip fine-tuning and accuracy")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="with --no-train: time models at this input size (e.g. 224 for the imagenet_* models) instead of the data's",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny: ResNet-18 x0.25, 400 train / 200 test images, 1 epoch each, 6 samples",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--stem", default=None, help="result file name stem (default: structured / structured_quick)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown next to a result JSON this script wrote")
    a = p.parse_args(argv)
    if a.render:
        src = Path(a.render)
        src.with_suffix(".md").write_text(to_markdown(json.loads(src.read_text())))
        return 0
    if a.quick:
        a.models, a.width, a.train_subset, a.test_subset = ["resnet18"], 0.25, 400, 200
        a.teacher_epochs, a.ft_epochs, a.qat_epochs, a.kd_epochs, a.seeds = 1, 1, 1, 0, [0]
        a.samples, a.runs, a.final_runs, a.budgets = 6, 40, 60, [0.75, 0.5]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads_train)
    data = load_data(DataConfig(dataset="cifar10", root=a.data, train_subset=a.train_subset, test_subset=a.test_subset))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "structured_quick" if a.quick else "structured"
    if a.image_size and not a.no_train:
        p.error("--image-size is for latency-only runs (--no-train): training data stays at its own size")
    if a.stem:
        stem = a.stem
    result = {
        "command": "python benchmarks/structured.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(a),
        "env": {k: v for k, v in environment(a.threads).items() if k != "cpu_flags"},
        "models": [],
    }

    def partial(rows):  # rows measured so far, for a run cut off before the end
        (out / f"{stem}.partial.json").write_text(json.dumps(result | {"partial_rows": rows}, indent=1, default=str))

    for m in a.models:  # a finished model stays in the partial file if a later one is cut off
        result["models"].append(run_model(m, data, a, partial))
        partial([])
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{stem}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
