"""``pqd tune``: run the ladder (:mod:`pqd.commands.tune.ladder`), each candidate a pqd run in
``TUNE_DIR/runs/<name>`` sharing the teacher, the data cache and the latency-model cache; evaluate
every candidate in the target runtime on the validation split (its pass/fail) and the test split
(reported); time every candidate with the dense FP32 and dense INT8 models in one interleaved run;
hand over the winner in ``TUNE_DIR/winner`` with a report.

State: ``TUNE_DIR/tune.json`` is rewritten atomically after every evaluated candidate, and each
candidate's run resumes on its own, so a killed tune resumes with the same command.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pqd.commands.bench import runtime_versions
from pqd.commands.export import export_run
from pqd.commands.sweep import Run, run_dir, run_local, run_ray
from pqd.commands.tune.config import TuneConfig
from pqd.commands.tune.ladder import (
    DENSE,
    Candidate,
    Choice,
    Measured,
    Outcome,
    choose,
    looks_memorised,
    passes,
    plan,
    qat_candidate,
    structured_candidate,
)
from pqd.commands.tune.report import write_report
from pqd.config import DataConfig
from pqd.data import Dataset, Splits, load_data
from pqd.data.stream import FileDataset
from pqd.deploy.deployable import normalized_callable
from pqd.deploy.onnx import run_logits
from pqd.deploy.runtimes import OpenVinoRunner, OrtRunner, require
from pqd.errors import ConfigError, PqdError
from pqd.measure import environment
from pqd.measure.latency import interleave
from pqd.measure.stats import correct_vector, paired_difference_interval, top1_record
from pqd.measure.workers import start_workers, workers_environment
from pqd.models import create_model
from pqd.run.config import RunConfig
from pqd.run.loader import load_run
from pqd.run.pipeline import run_pipeline
from pqd.run.rundir import RunDir, claim_dir, model_kwargs
from pqd.safety.fsguard import atomic_write_bytes
from pqd.structured.sensitivity import analyze

log = logging.getLogger("pqd.tune")

STATE = "tune.json"
STATE_SCHEMA = 1
RUNS = "runs"
EPOCH_OVERHEAD = 1.8  # QAT and KD epochs measured slower than plain FP32 ones; the budget estimate allows for it
# The candidate runs are this tune's own, built from the config the user gave (a resumed tune must be given the
# same one: State refuses another), so a model named by import path in that config may be imported to load them.
OWN_RUNS = True
CANDIDATE_MEASURE = {"runs": 20, "warmup": 5, "large_batch_runs": 5}  # each run's own timing: a quick look only


@dataclass(frozen=True)
class Budget:
    candidate_epochs: int
    epochs: int
    images_per_s: float
    minutes: float  # estimate for the whole budget on this machine

    def line(self) -> str:
        qat, s = qat_candidate(self.candidate_epochs).epochs, structured_candidate(0.5, self.candidate_epochs).epochs
        return (
            f"training budget {self.epochs} epochs over all candidates (QAT + KD: {qat}, each structured candidate: "
            f"{s}), about {max(self.minutes, 1):.0f} min on this machine (FP32 training measured at "
            f"{self.images_per_s:.0f} images/s, x{EPOCH_OVERHEAD} for QAT and KD)"
        )


def default_candidate_epochs(n_train: int) -> int:
    """Epochs per trained candidate: about 150,000 images seen, 1 to 10 epochs."""
    return max(1, min(10, round(150_000 / max(n_train, 1))))


def training_speed(config: RunConfig, data: Splits, *, steps: int = 3) -> float:
    """Images/s of a plain FP32 training step of the model at the run's batch size (after one warm-up step)."""
    model = create_model(config.model.name, num_classes=data.num_classes, **model_kwargs(config)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    bs = min(config.train.batch_size, len(data.train))
    x = torch.randn(bs, *data.image_shape)
    y = torch.randint(0, data.num_classes, (bs,))
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return steps * bs / max(time.perf_counter() - t0, 1e-9)


def plan_budget(tune: TuneConfig, n_train: int, images_per_s: float) -> Budget:
    c = tune.candidate_epochs or default_candidate_epochs(n_train)
    per_epoch_min = n_train / images_per_s * EPOCH_OVERHEAD / 60
    if tune.epochs is not None:
        epochs = tune.epochs
    elif tune.minutes is not None:
        epochs = int(tune.minutes / per_epoch_min)
    else:  # QAT + KD, every structured probe, one bisection step
        epochs = c * (2 + len(tune.fractions))
    return Budget(c, epochs, images_per_s, epochs * per_epoch_min)


# ----------------------------------------------------------------------------- candidate runs


def candidate_config(
    base: RunConfig, tune: TuneConfig, cand: Candidate, *, weights: Path, float_modules: Sequence[str], cache: Path
) -> RunConfig:
    """The pqd run config of one candidate: the user's config with the candidate's stages, the shared
    teacher weights and latency cache, the target's runtime, batch and threads."""
    d = base.to_dict()
    d["stages"] = cand.stages
    d["teacher"] = d["teacher"] | {"weights": str(weights)}
    d["measure"] = d["measure"] | {"threads": tune.threads, "batch_sizes": [tune.batch]} | CANDIDATE_MEASURE
    d["quantize"] = d["quantize"] | {
        "mode": "ptq" if cand.rung == "ptq" else "qat",
        "float_modules": list(float_modules),
    }
    if cand.fraction is not None:
        d["structured"] = d["structured"] | {
            "budget_fraction": cand.fraction,
            "budget_ms": None,
            "runtime": tune.runtime,
            "batch": tune.batch,
            "threads": tune.threads,
            "cache_dir": str(cache),
        }
    if cand.sparsity is not None:
        d["prune"] = d["prune"] | {"sparsity": cand.sparsity}
    return RunConfig.from_dict(d)


def _as_run(cand: Candidate, config: RunConfig) -> Run:
    return Run(cand.name, cand.name, "pipeline", config, (), "tune")


def deployed_file(run_path: Path, runtime: str) -> Path:
    """The file the target runtime loads: the INT8 QDQ ONNX file, or PyTorch's TorchScript INT8 model."""
    return run_path / ("model_int8.pt" if runtime == "pytorch" else "model_int8.onnx")


def runtime_model(
    run_path: Path, runtime: str, threads: int, loaded: Any, *, teacher: bool
) -> Callable[[torch.Tensor], Any]:
    """The candidate as the target runtime runs it (normalised float input), exported first if needed;
    ``teacher``: export the dense FP32 teacher beside it (the PTQ run's is every candidate's dense model)."""
    if runtime == "pytorch":
        return normalized_callable(loaded.deployed)
    export_run(run_path, check=False, run=loaded, runtimes=[runtime], allow_code=OWN_RUNS, teacher=teacher)
    cls = OpenVinoRunner if runtime == "openvino" else OrtRunner
    return cls(deployed_file(run_path, runtime), threads=threads)


def validation(data: Splits) -> Dataset | FileDataset:
    """The validation split every decision is taken on (a tune always has one: :func:`_with_val`)."""
    if data.val is None:
        raise ConfigError("pqd tune needs a validation split; set data.val_fraction or tune.val_fraction > 0")
    return data.val


@dataclass
class Reference:
    """The dense FP32 model's correctness vectors, the baseline of every paired drop."""

    val: Any
    test: Any
    tolerance: float  # points

    def record(self) -> dict:
        return {
            "val": top1_record(self.val),
            "test": top1_record(self.test),
            "tolerance_points": self.tolerance,
        }


def evaluate(run_path: Path, data: Splits, tune: TuneConfig, ref: Reference, *, teacher: bool) -> dict:
    """Validation and test top-1 in the target runtime, the paired drop against dense FP32, the size
    of the deployed file, and the run's own quick latency reading."""
    loaded = load_run(run_path, data=data, allow_code=OWN_RUNS)
    model = runtime_model(run_path, tune.runtime, tune.threads, loaded, teacher=teacher)
    out: dict[str, Any] = {}
    for split, dense in (("val", ref.val), ("test", ref.test)):
        ds = validation(data) if split == "val" else data.test
        correct = correct_vector(run_logits(model, ds, mean=data.mean, std=data.std), ds.y)
        diff = paired_difference_interval(dense, correct)
        out[split] = top1_record(correct) | {
            "drop_points": 100 * diff["difference"],
            "drop_ci_points": [100 * diff["ci_low"], 100 * diff["ci_high"]],
        }
    metrics = json.loads((run_path / RunDir.METRICS).read_text())
    lat = [r for r in metrics.get("latency", []) if r.get("model") != "teacher_fp32" and r.get("batch") == tune.batch]
    out["size_mb"] = deployed_file(run_path, tune.runtime).stat().st_size / 1e6
    out["run_latency_ms"] = lat[-1]["median_ms"] if lat else None
    out["floor_fraction"] = floor_fraction(metrics)
    out["passed"] = passes(
        out["val"]["drop_points"], out["val"]["drop_ci_points"][1], tolerance=ref.tolerance, rule=tune.rule
    )
    return out


# ----------------------------------------------------------------------------- state


class State:
    """``tune.json``: the configs, the dense reference, each candidate with its outcome and evaluation."""

    def __init__(self, path: Path, config: RunConfig, tune: TuneConfig):
        self.path = path
        self.data: dict[str, Any] = {
            "schema": STATE_SCHEMA,
            "config": config.to_dict(),
            "tune": tune.to_dict(),
            "candidates": [],
            "notes": [],
        }
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("schema") != STATE_SCHEMA:
                raise ConfigError(
                    f"{path} was written by another pqd version (schema {old.get('schema')}); tune into a new folder"
                )
            for key in ("config", "tune"):
                if old.get(key) != self.data[key]:
                    raise ConfigError(
                        f"{path.parent} holds a tune with another {key} section; resume it with the same config "
                        "or tune into a new folder"
                    )
            self.data = old

    def save(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.data, indent=2).encode())

    def done(self) -> list[tuple[Candidate, Outcome]]:
        return [(Candidate.from_dict(c["candidate"]), Outcome.from_dict(c["outcome"])) for c in self.data["candidates"]]

    def add(self, cand: Candidate, outcome: Outcome, evaluation: dict | None, note: str) -> None:
        self.data["candidates"].append(
            {"candidate": cand.to_dict(), "outcome": outcome.to_dict(), "eval": evaluation, "why": note}
        )
        self.save()


# ----------------------------------------------------------------------------- the tune


def tune(
    config: RunConfig,
    out_dir: str | Path,
    *,
    tune_config: TuneConfig | None = None,
    executor: str = "local",
    address: str | None = None,
) -> dict:
    """Find the fastest deployable INT8 model within ``tune_config.max_drop`` of the dense model
    (see the module docstring); resumes a killed tune in ``out_dir``. Returns the tune record."""
    tc = tune_config or TuneConfig()
    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor {executor!r} is not valid; choose 'local' or 'ray'")
    if tc.runtime != "pytorch":
        require("onnx"), require("onnxscript"), require("onnxruntime" if tc.runtime == "onnxruntime" else "openvino")
    out = Path(out_dir)
    with claim_dir(out, kind="tune"):
        return _tune(config, tc, out, executor=executor, address=address)


def _with_val(config: RunConfig, tc: TuneConfig) -> RunConfig:
    if config.data.val_fraction > 0:
        return config
    if tc.val_fraction <= 0:
        raise ConfigError("tune.val_fraction: pqd tune judges candidates on a validation split; give a fraction > 0")
    data: DataConfig = replace(config.data, val_fraction=tc.val_fraction)
    return replace(config, data=data)


def _teacher_weights(config: RunConfig, out: Path) -> Path:
    if config.teacher.weights:
        return Path(config.teacher.weights).resolve()
    log.info("no teacher.weights given: training the dense teacher (%d epochs) first", config.teacher.epochs)
    teacher_dir = out / "teacher"
    run_pipeline(config, teacher_dir)
    return RunDir(teacher_dir).teacher_path.resolve()


def _tune(config: RunConfig, tc: TuneConfig, out: Path, *, executor: str, address: str | None) -> dict:
    config = _with_val(config, tc)
    state = State(out / STATE, config, tc)
    state.save()
    weights = _teacher_weights(config, out)
    data = load_data(config.data, seed=config.seed)
    log.info(
        "%s, %d train / %d validation / %d test images",
        data.name,
        len(data.train),
        len(validation(data)),
        len(data.test),
    )
    budget = _budget(state, config, tc, data)
    log.info("%s", budget.line())
    runs_dir = out / RUNS
    cache = out / "cache"
    ref: Reference | None = None
    sensitive: list[str] | None = state.data.get("sensitive_layers")
    latency_cap = tc.latency_budget_fraction
    while True:
        done = state.done()
        if ref is None and any(c.name == "ptq" and o.ok for c, o in done):  # a resumed tune
            ref = _reference(runs_dir / "ptq", data, tc)
        if latency_cap is None and tc.latency_budget_ms is not None and ref is not None:
            latency_cap = _budget_fraction(state, out, tc, data)
        step = plan(
            tc,
            done,
            candidate_epochs=budget.candidate_epochs,
            budget_epochs=budget.epochs,
            latency_cap=latency_cap,
            parallel=executor == "ray",
        )
        if not step.candidates:
            if not state.data["notes"] or state.data["notes"][-1] != step.note:
                state.data["notes"].append(step.note)
            log.info("ladder stopped: %s", step.note)
            break
        if any(c.fallback for c in step.candidates) and sensitive is None:
            sensitive = _sensitive_layers(runs_dir / "ptq", data, config)
            state.data["sensitive_layers"] = sensitive
            state.save()
        configs = {
            c.name: candidate_config(
                config, tc, c, weights=weights, float_modules=(sensitive or [])[: c.fallback], cache=cache
            )
            for c in step.candidates
        }
        for c in step.candidates:
            log.info("[%s] %s: %s (%s, %d epochs)", c.rung, c.name, step.note, c.stages, c.epochs)
        finished = _execute(step.candidates, configs, out, executor=executor, address=address)
        if finished.get("ptq"):
            raise PqdError(
                f"tune: the dense PTQ candidate failed ({finished['ptq']}); every other candidate is compared with "
                f"it. Its log: {runs_dir / 'ptq' / 'log.txt'}"
            )
        for c in step.candidates:
            err = finished.get(c.name)
            if err is not None:
                log.error("%s failed: %s", c.name, err)
                state.add(c, Outcome(ok=False, error=err), None, step.note)
                continue
            if ref is None:
                ref = _reference(runs_dir / "ptq", data, tc)
            ev = evaluate(run_dir(out, _as_run(c, configs[c.name])), data, tc, ref, teacher=c.name == "ptq")
            outcome = Outcome(
                ok=True,
                passed=ev["passed"],
                drop=ev["val"]["drop_points"],
                size_mb=ev["size_mb"],
                floor_fraction=ev["floor_fraction"],
            )
            log.info(
                "%s: validation top-1 %.2f%%, drop %+.2f points [%+.2f, %+.2f]: %s",
                c.name,
                100 * ev["val"]["top1"],
                ev["val"]["drop_points"],
                *ev["val"]["drop_ci_points"],
                "within the tolerance" if ev["passed"] else "outside the tolerance",
            )
            state.add(c, outcome, ev, step.note)
    if ref is None:
        raise PqdError(
            "tune: the dense PTQ candidate did not finish; nothing to compare against (see runs/ptq/log.txt)"
        )
    state.data["dense"] = ref.record()
    dense = state.data["dense"]
    dense["val_looks_seen"] = looks_memorised(dense["val"], dense["test"])
    if dense["val_looks_seen"]:
        log.warning(
            "the dense model scores %.2f%% on the validation split but %.2f%% on the test split: its validation "
            "images look like part of its training data, so the drops measured there overstate those on unseen "
            "images (the test drop is reported beside; docs/TUNE.md)",
            100 * dense["val"]["top1"],
            100 * dense["test"]["top1"],
        )
    result = _finish(state, config, tc, data, out, weights)
    return result


def _budget(state: State, config: RunConfig, tc: TuneConfig, data: Splits) -> Budget:
    if "budget" in state.data:
        b = state.data["budget"]
        return Budget(b["candidate_epochs"], b["epochs"], b["images_per_s"], b["minutes"])
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    budget = plan_budget(tc, len(data.train), training_speed(config, data))
    state.data["budget"] = asdict(budget) | {"stated": budget.line()}
    state.save()
    return budget


def _execute(
    cands: Sequence[Candidate], configs: dict[str, RunConfig], out: Path, *, executor: str, address: str | None
) -> dict[str, str | None]:
    """Run the candidates (resuming any that started); name -> None when finished, else the error."""
    results: dict[str, str | None] = {}

    def done(run: Run, metrics: dict) -> None:
        results[run.run_id] = None

    def fail(run: Run, exc: BaseException) -> None:
        results[run.run_id] = f"{type(exc).__name__}: {str(exc)[:500]}"

    runs = [_as_run(c, configs[c.name]) for c in cands]
    if executor == "ray":
        run_ray(runs, str(out), done, fail, address=address, cpus_per_run=None)
    else:
        run_local(runs, str(out), done, fail)
    return results


def _reference(ptq_dir: Path, data: Splits, tc: TuneConfig) -> Reference:
    """The dense FP32 model (the teacher every candidate shares), evaluated in PyTorch on both splits."""
    teacher = load_run(ptq_dir, data=data, allow_code=OWN_RUNS).teacher.eval()
    val_ds = validation(data)
    val = correct_vector(run_logits(teacher, val_ds, mean=data.mean, std=data.std), val_ds.y)
    test = correct_vector(run_logits(teacher, data.test, mean=data.mean, std=data.std), data.test.y)
    return Reference(val, test, tc.max_drop_points(float(val.mean())) if tc.relative else tc.max_drop)


def floor_fraction(metrics: dict) -> float | None:
    """The fraction of dense INT8 latency a structured run's floor model measured at, when its S stage missed the
    budget because every group was at its floor (None otherwise)."""
    for rec in metrics.get("stage_records", []):
        r = rec.get("records") or {}
        if r.get("met") is False and "floor" in str(r.get("missed_because", "")) and r.get("dense_ms_same_run"):
            return float(r["measured_ms"]) / float(r["dense_ms_same_run"])
    return None


def _sensitive_layers(ptq_dir: Path, data: Splits, config: RunConfig) -> list[str]:
    """Layers ranked by the validation top-1 lost when each alone is INT8 (``pqd analyze``'s rows), worst first."""
    teacher = load_run(ptq_dir, data=data, allow_code=OWN_RUNS).teacher
    log.info("ranking layers by their INT8 sensitivity (each quantized alone, validation split)")
    rows = analyze(teacher, data, prune=False, quantize=True, batch_size=config.train.eval_batch_size)
    return [r["layer"] for r in sorted(rows, key=lambda r: -r["drop"])]


def _budget_fraction(state: State, out: Path, tc: TuneConfig, data: Splits) -> float:
    """``tune.latency_budget_ms`` as a fraction of dense INT8 latency, timed once in the target runtime."""
    if "dense_int8_ms" not in state.data:
        path = deployed_file(out / RUNS / "ptq", tc.runtime)
        spec = {
            "kind": "torchscript" if tc.runtime == "pytorch" else tc.runtime,
            "path": str(path),
            "input_shape": list(data.image_shape),
            "batch_sizes": [tc.batch],
            "seed": 0,
            "threads": tc.threads,
        }
        with start_workers({"ptq": spec}) as workers:
            rec = interleave(workers, batch_sizes=(tc.batch,), threads=tc.threads, runs=50, large_batch_runs=10)[0]
        state.data["dense_int8_ms"] = rec["median_ms"]
        state.save()
    fraction = min(1.0, float(tc.latency_budget_ms or 0) / state.data["dense_int8_ms"])
    log.info(
        "latency budget %.3f ms = %.2f of dense INT8 (%.3f ms)",
        tc.latency_budget_ms or 0,
        fraction,
        state.data["dense_int8_ms"],
    )
    return fraction


# ----------------------------------------------------------------------------- final timing and hand-over


def latency_specs(state: State, out: Path, tc: TuneConfig, config: RunConfig, data: Splits, weights: Path) -> dict:
    """Worker specs (:mod:`pqd.measure.worker`): the dense FP32 model first (the baseline), then every
    evaluated candidate, each from the file the target runtime loads."""
    base = {"input_shape": list(data.image_shape), "batch_sizes": [tc.batch], "seed": 0, "threads": tc.threads}
    ptq = out / RUNS / "ptq"
    if tc.runtime == "pytorch":
        dense = {
            "kind": "eager",
            "model": config.model.name,
            "kwargs": model_kwargs(config),
            "num_classes": data.num_classes,
            "weights": str(ptq / RunDir.TEACHER),
        }
    else:
        dense = {"kind": tc.runtime, "path": str(ptq / RunDir.TEACHER_ONNX)}
    specs = {DENSE: base | dense}
    for c in state.data["candidates"]:
        if c["outcome"]["ok"]:
            path = deployed_file(out / RUNS / c["candidate"]["name"], tc.runtime)
            kind = "torchscript" if tc.runtime == "pytorch" else tc.runtime
            specs[c["candidate"]["name"]] = base | {"kind": kind, "path": str(path)}
    return specs


def _finish(state: State, config: RunConfig, tc: TuneConfig, data: Splits, out: Path, weights: Path) -> dict:
    specs = latency_specs(state, out, tc, config, data, weights)
    log.info(
        "timing %d models in one interleaved run (%s, batch %d, %d threads)",
        len(specs),
        tc.runtime,
        tc.batch,
        tc.threads,
    )
    with start_workers(specs) as workers:
        lat_env = workers_environment(workers)
        recs = interleave(workers, batch_sizes=(tc.batch,), threads=tc.threads, runs=tc.runs, large_batch_runs=tc.runs)
    by = {r["model"]: r for r in recs}
    dense_int8 = by.get("ptq")
    state.data["latency"] = {
        "records": recs,
        "latency_env": lat_env,
        "env": environment(tc.threads),
        "runtimes": runtime_versions(),
        "runtime": tc.runtime,
        "batch": tc.batch,
        "threads": tc.threads,
    }
    rows = []
    for c in state.data["candidates"]:
        name = c["candidate"]["name"]
        if not c["outcome"]["ok"] or name not in by:
            continue
        c["latency"] = {
            "median_ms": by[name]["median_ms"],
            "p90_ms": by[name]["p90_ms"],
            "x_vs_dense_fp32": by[DENSE]["median_ms"] / by[name]["median_ms"],
            "x_vs_dense_int8": dense_int8["median_ms"] / by[name]["median_ms"] if dense_int8 else None,
        }
        rows.append(
            Measured(
                name,
                bool(c["outcome"]["passed"]),
                c["eval"]["val"]["drop_points"],
                by[name]["median_ms"],
                c["eval"]["size_mb"],
            )
        )
    dense = state.data["dense"]
    base = by["dense_fp32"]
    dense["size_mb"] = dense_file(out, tc.runtime).stat().st_size / 1e6
    dense["latency"] = {
        "median_ms": base["median_ms"],
        "p90_ms": base["p90_ms"],
        "x_vs_dense_fp32": 1.0,
        "x_vs_dense_int8": dense_int8["median_ms"] / base["median_ms"] if dense_int8 else None,
    }
    # the dense FP32 model is the ladder's first rung: on a model too small for INT8 kernels to pay, it is the fastest
    rows.insert(0, Measured(DENSE, True, 0.0, base["median_ms"], dense["size_mb"]))
    budget_ms = tc.latency_budget_ms
    if budget_ms is None and tc.latency_budget_fraction is not None and dense_int8:
        budget_ms = tc.latency_budget_fraction * dense_int8["median_ms"]
    choice = choose(rows, latency_budget_ms=budget_ms, size_budget_mb=tc.size_budget_mb)
    for c in state.data["candidates"]:
        c["verdict"] = choice.verdicts.get(c["candidate"]["name"], f"failed: {c['outcome'].get('error')}")
    dense["verdict"] = choice.verdicts.get(DENSE, "")
    state.data["choice"] = {"winner": choice.winner, "met": choice.met, "message": choice.message}
    if choice.winner is not None:
        state.data["choice"]["files"] = hand_over(out, choice.winner, tc.runtime)
    state.save()
    paths = write_report(state.data, out)
    _announce(choice, state.data, paths)
    return state.data


def dense_file(out: Path, runtime: str) -> Path:
    """The dense FP32 model as the target runtime loads it (the teacher's ONNX file, or its weights for PyTorch)."""
    ptq = out / RUNS / "ptq"
    return ptq / (RunDir.TEACHER if runtime == "pytorch" else RunDir.TEACHER_ONNX)


def hand_over(out: Path, winner: str, runtime: str) -> list[str]:
    """Copy the winner's deployables into ``out/winner``: for an INT8 winner the TorchScript INT8 model with
    its preprocessing (``pqd predict``), the ONNX file and, for OpenVINO, its IR; for the dense FP32 model
    its ONNX file (with the preprocessing record ``pqd predict`` reads) and IR. Returns the file names."""
    dest = out / "winner"
    dest.mkdir(parents=True, exist_ok=True)
    if winner == DENSE:
        src_dir, form, copies = out / RUNS / "ptq", "fp32", {"model_fp32.onnx": RunDir.TEACHER_ONNX}
    else:
        src_dir, form = out / RUNS / winner, "int8"
        copies = {"model_int8.pt": "model_int8.pt"} | (
            {} if runtime == "pytorch" else {"model_int8.onnx": "model_int8.onnx"}
        )
    for name, src in copies.items():
        atomic_write_bytes(dest / name, (src_dir / src).read_bytes())
    names = list(copies)
    if runtime == "openvino":
        ov = require("openvino")
        model = ov.convert_model(str(dest / f"model_{form}.onnx"))
        ov.save_model(model, str(dest / f"model_{form}.xml"), compress_to_fp16=False)
        names += [f"model_{form}.xml", f"model_{form}.bin"]
    shutil.copy2(src_dir / RunDir.CONFIG, dest / "run_config.yaml")
    return names + ["run_config.yaml"]


def _announce(choice: Choice, record: dict, paths: dict[str, Path]) -> None:
    dense = record["dense"]
    if choice.winner == DENSE:
        lat, ev = dense["latency"], {"val": {"drop_points": 0.0}, "test": dense["test"], "size_mb": dense["size_mb"]}
    else:
        winner = next((c for c in record["candidates"] if c["candidate"]["name"] == choice.winner), None)
        if winner is None:
            log.error("%s", choice.message)
            return
        lat, ev = winner["latency"], winner["eval"]
    speed = f"{lat['x_vs_dense_fp32']:.2f}x faster than dense FP32"
    if lat.get("x_vs_dense_int8"):
        speed += f", {lat['x_vs_dense_int8']:.2f}x than dense INT8"
    (log.info if choice.met else log.warning)(
        "%s. %s: %.3f ms (%s, same runtime), validation drop %+.2f points, test top-1 %.2f%%, %.2f MB. "
        "Files: winner/ (pqd predict winner IMAGE...). Report: %s",
        choice.message,
        choice.winner,
        lat["median_ms"],
        speed,
        ev["val"]["drop_points"],
        100 * ev["test"]["top1"],
        ev["size_mb"],
        paths.get("md"),
    )
