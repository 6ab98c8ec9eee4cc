"""Sweeps: one YAML file → many runs → one results table.

A sweep file holds a base config, named variants (overrides of the base) and grid axes::

    base: {...}                 # a RunConfig mapping, or a path to a config YAML (relative to the sweep file)
    grid: {seed: [0, 1]}        # axes applied to every variant (cartesian product); dotted keys
    variants:
      dense: {stages: ""}       # empty stages = the FP32 dense teacher alone (see below)
      pqd: {stages: "P:1,Q:2,D:2"}
      ptq: {stages: "Q:0", quantize.mode: ptq}     # dotted keys or nested mappings
      sparsity:
        stages: "P:1,Q:2,D:2"
        grid: {prune.sparsity: [0.5, 0.9], seed: [0]}   # per-variant axes replace global ones of the same name
      nncf_ptq: {peer: nncf_ptq}                  # a peer baseline (pqd.commands.peers) of the variant's teacher

Expansion: every variant × the cartesian product of its axes is one run (a :class:`RunConfig`).
Values are applied in this order: base (with ``--set`` overrides) ← variant ← axis values.

Teachers are trained once and shared. A run's *teacher identity* is its seed and its model,
data, train and teacher sections (``train.progress`` aside). Each distinct identity becomes a
*teacher run* (``runs/teacher-<hash>``) that trains (or loads) the teacher and measures it as the
dense FP32 baseline; every pipeline run of that identity gets ``teacher.weights`` pointed at the
teacher run's ``teacher.safetensors``. A variant with empty ``stages`` does not add a run: it names
the teacher run of its identity. Teacher runs are dense runs (``stages: ""``) of the ordinary
pipeline (:func:`pqd.run.pipeline.run_pipeline`), finalized and timed by the same harness as every
other run; their final model is the teacher's weights, so their latency table times the teacher
against itself, interleaved, which shows the measurement's noise floor.

Layout of ``--out DIR``::

    DIR/sweep.yaml          the expanded sweep (for the record)
    DIR/runs/<run_id>/      one pqd run directory each (config.yaml, metrics.json, log.txt, ...)
    DIR/results.sqlite      table ``runs``: flat key columns + full config and metrics as JSON

A run counts as finished when its ``metrics.json`` exists (and its config matches); finished
runs are skipped, unfinished ones resume where they stopped (``run_pipeline`` is resumable),
so re-running the same command after a kill finishes only what is missing.

Peer runs: a variant with ``peer: NAME`` (one of :data:`pqd.commands.peers.PEERS`, e.g. ``nncf_ptq``)
is another tool's compression of the teacher of its identity (``stages`` is ignored), run by
:func:`pqd.commands.peers.peer_run` after that teacher: evaluated on the same test split and timed by
pqd's worker harness in the peer's runtime (OpenVINO FP32 teacher vs NNCF INT8). Its table row
says so in ``lat_runtime``; without the optional extra (``pip install 'pqd[peers]'``) the run
fails with that message and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pqd.config import apply_overrides
from pqd.errors import ConfigError, PqdError, StorageError
from pqd.run.config import RunConfig
from pqd.run.metrics import Metrics
from pqd.run.rundir import RunDir, claim_dir, comparable_config, with_teacher_base
from pqd.safety.fsguard import atomic_output, record_written, safe_replace, storage_errors
from pqd.safety.safeyaml import MAX_GRID, grid_size_guard, load_yaml

log = logging.getLogger("pqd.sweep")

DENSE = ""  # the stage string of a teacher / dense run
_TOP_KEYS = {"name", "base", "grid", "variants", "description"}
_TEACHER_TRAIN_IGNORED = ("progress",)


# --------------------------------------------------------------------------------------------
# sweep file → runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep. ``kind`` is 'pipeline', 'teacher' (dense FP32 teacher only) or
    'peer' (another tool's compression of the teacher: :attr:`peer` names it)."""

    run_id: str
    variant: str
    kind: str
    config: RunConfig  # a teacher run's config has no stages (a dense run)
    axes: tuple[tuple[str, Any], ...]
    teacher_id: str
    peer: str | None = None

    def config_dict(self) -> dict:
        d = self.config.to_dict()
        if self.kind == "peer":
            d = d | {"stages": DENSE, "peer": self.peer}
        return d


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    runs: tuple[Run, ...]

    def teachers(self) -> list[Run]:
        return [r for r in self.runs if r.kind == "teacher"]

    def pipelines(self) -> list[Run]:
        return [r for r in self.runs if r.kind == "pipeline"]

    def peers(self) -> list[Run]:
        return [r for r in self.runs if r.kind == "peer"]

    def ordered(self) -> list[Run]:
        """Execution order: each teacher, then the runs that use it (sweep-file order)."""
        out = []
        for t in self.teachers():
            out.append(t)
            out += [r for r in self.runs if r.kind != "teacher" and r.teacher_id == t.teacher_id]
        return out


def _dotted_to_nested(d: Mapping[str, Any], where: str) -> dict:
    """``{'prune.sparsity': 0.5, 'quantize': {'mode': 'ptq'}}`` → nested dict (deep-merged)."""
    out: dict = {}
    for key, value in d.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: keys must be non-empty strings, got {key!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {key!r} sets inside {p!r}, which is not a section")
        if isinstance(value, Mapping):
            _merge_into(node.setdefault(leaf, {}), _dotted_to_nested(value, f"{where}.{key}"))
        else:
            node[leaf] = value
    return out


def _merge_into(dst: dict, src: Mapping) -> dict:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge_into(dst[k], v)
        else:
            dst[k] = json.loads(json.dumps(v)) if isinstance(v, (Mapping, list)) else v
    return dst


def _is_dense(stages: Any) -> bool:
    return (
        stages is None or stages == [] or (isinstance(stages, str) and stages.strip().lower() in ("", "dense", "none"))
    )


def _fmt_axis(key: str, value: Any) -> str:
    leaf = key.split(".")[-1]
    v = json.dumps(value) if not isinstance(value, str) else value
    return f"{leaf}{v}".replace("/", "_").replace(" ", "")


def teacher_identity(cfg: Mapping[str, Any]) -> str:
    """Hash of what determines the teacher's weights: seed, model, data, train, teacher."""
    train = {k: v for k, v in cfg["train"].items() if k not in _TEACHER_TRAIN_IGNORED}
    key = {"seed": cfg["seed"], "model": cfg["model"], "data": cfg["data"], "train": train, "teacher": cfg["teacher"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _validated(data: dict, where: str) -> RunConfig:
    try:
        return RunConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Read a sweep YAML file; ``base`` may be a path (relative to the sweep file). ``overrides`` apply to the base."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {str(p)!r} does not exist")
    spec = load_yaml(p, where=f"sweep file {str(p)!r}") or {}  # bounded: YAML bombs are refused
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {str(p)!r} must hold a mapping with 'base' and 'variants'")
    base = spec.get("base") or {}
    if isinstance(base, str):
        bp = (p.parent / base) if not Path(base).is_absolute() else Path(base)
        if not bp.is_file():
            raise ConfigError(f"sweep base config {str(bp)!r} does not exist")
        base = load_yaml(bp, where=f"sweep base config {str(bp)!r}") or {}
    spec = dict(spec, base=_user_weights_absolute(apply_overrides(_dotted_to_nested(base, "base"), overrides)))
    variants = spec.get("variants")
    if isinstance(variants, Mapping):
        spec["variants"] = {n: _user_weights_absolute(o) if isinstance(o, Mapping) else o for n, o in variants.items()}
    spec.setdefault("name", p.stem)
    return spec


def _user_weights_absolute(config: Mapping[str, Any]) -> dict:
    """``config`` with a relative ``teacher.weights`` the user wrote resolved against the working directory,
    as ``pqd run`` reads it; relative paths in a sweep's own run configs are its teacher runs' files,
    relative to the sweep folder (:func:`pqd.run.rundir.with_teacher_base`)."""
    out = dict(config)
    if isinstance(out.get("teacher.weights"), str) and out["teacher.weights"]:  # a variant's dotted override
        out["teacher.weights"] = str(Path(out["teacher.weights"]).absolute())
    teacher = out.get("teacher")
    if isinstance(teacher, Mapping) and isinstance(teacher.get("weights"), str) and teacher["weights"]:
        out["teacher"] = dict(teacher, weights=str(Path(teacher["weights"]).absolute()))
    return out


def expand(spec: Mapping[str, Any], out_dir: str | Path | None = None) -> Sweep:
    """Expand a sweep spec (see module doc) into teacher runs and pipeline runs.

    With ``out_dir`` the pipeline runs' ``teacher.weights`` point at the teacher runs' files
    under ``out_dir/runs``; without it they are left as in the spec (for inspection).
    """
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"sweep: unknown top-level key(s) {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}")
    base = spec.get("base") or {}
    if not isinstance(base, Mapping):
        raise ConfigError("sweep.base must be a mapping (a RunConfig) or a path to a config YAML")
    base = _dotted_to_nested(base, "base")
    global_grid = _grid(spec.get("grid") or {}, "grid")
    variants = spec.get("variants")
    if not isinstance(variants, Mapping) or not variants:
        raise ConfigError(
            "sweep.variants must be a non-empty mapping of name -> overrides, e.g. {pqd: {stages: 'P:1,Q:2,D:2'}}"
        )

    expanded: list[tuple[str, tuple, dict, str | None]] = []  # (variant, axes, config dict, peer)
    total = 0
    for vname, over in variants.items():
        if not isinstance(vname, str) or not vname.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"sweep.variants: name {vname!r} must be letters, digits, '_' or '-'")
        if over is not None and not isinstance(over, Mapping):
            raise ConfigError(
                f"sweep.variants.{vname}: expected a mapping of overrides, e.g. {{stages: 'P:1,Q:2,D:2'}}, got {over!r}"
            )
        over = dict(over or {})
        peer = over.pop("peer", None)
        if peer is not None:
            from pqd.commands.peers import PEERS  # no heavy import: NNCF itself is imported when a peer runs

            if peer not in PEERS:
                raise ConfigError(
                    f"sweep.variants.{vname}.peer: {peer!r} is not a known peer baseline; choose one of "
                    f"{', '.join(map(repr, PEERS))}"
                )
            over["stages"] = DENSE  # a peer run has no stages of its own: it starts from the teacher
        vgrid = dict(global_grid)
        vgrid.update(_grid(over.pop("grid", None) or {}, f"variants.{vname}.grid"))
        merged = _merge_into(json.loads(json.dumps(base)), _dotted_to_nested(over, f"variants.{vname}"))
        total += grid_size_guard(vgrid, where=f"sweep variants.{vname}.grid")
        if total > MAX_GRID:
            raise ConfigError(
                f"sweep: {total:,} runs in all, more than the limit of {MAX_GRID:,}; split the sweep into several files"
            )
        keys = list(vgrid)
        for values in itertools.product(*(vgrid[k] for k in keys)):
            axes = tuple(zip(keys, values, strict=True))
            cfg = _merge_into(json.loads(json.dumps(merged)), _dotted_to_nested(dict(axes), f"variants.{vname}.grid"))
            expanded.append((vname, axes, cfg, peer))

    runs: list[Run] = []
    teachers: dict[str, Run] = {}
    dense_names: dict[str, str] = {}
    seen: dict[str, str] = {}
    for vname, axes, cfg, peer in expanded:
        where = f"variant {vname!r}" + (f" ({', '.join(f'{k}={v}' for k, v in axes)})" if axes else "")
        dense = peer is None and _is_dense(cfg.get("stages", "x"))
        rc = _validated(cfg, where)
        full = rc.to_dict()
        tid = teacher_identity(full)
        if tid not in teachers:
            teachers[tid] = Run(f"teacher-{tid}", "teacher", "teacher", _teacher_config(rc), axes, tid)
        if dense:
            dense_names.setdefault(tid, vname)
            continue
        run_id = "__".join([vname] + [_fmt_axis(k, v) for k, v in axes])
        fp = json.dumps(full | ({"peer": peer} if peer else {}), sort_keys=True)
        if fp in seen:
            raise ConfigError(f"sweep: {where} expands to the same config as run {seen[fp]!r}; drop one of them")
        seen[fp] = run_id
        if any(r.run_id == run_id for r in runs):
            raise ConfigError(f"sweep: two runs are both named {run_id!r}; rename a variant")
        runs.append(Run(run_id, vname, "peer" if peer else "pipeline", rc, axes, tid, peer))

    teacher_runs = []
    for tid, t in teachers.items():
        name = dense_names.get(tid, "teacher")
        teacher_runs.append(dataclasses.replace(t, variant=name))
    if out_dir is not None:
        runs = [_share_teacher(r, Path(out_dir)) for r in runs]
    return Sweep(str(spec.get("name") or "sweep"), tuple(teacher_runs + runs))


def _teacher_config(rc: RunConfig) -> RunConfig:
    """The teacher run's config: the identity sections and ``measure``; stage settings at defaults."""
    return RunConfig(
        seed=rc.seed, stages=(), model=rc.model, data=rc.data, train=rc.train, teacher=rc.teacher, measure=rc.measure
    )


def _grid(grid: Any, where: str) -> dict[str, list]:
    if not isinstance(grid, Mapping):
        raise ConfigError(f"sweep.{where} must map dotted keys to lists of values, e.g. {{seed: [0, 1]}}")
    out = {}
    for k, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"sweep.{where}.{k}: expected a non-empty list of values, got {vals!r}")
        out[str(k)] = vals
    return out


def _share_teacher(run: Run, out: Path) -> Run:
    # relative to the sweep folder (resolved by execute): a copied or moved sweep folder resumes
    weights = f"runs/teacher-{run.teacher_id}/teacher.safetensors"
    cfg = dataclasses.replace(run.config, teacher=dataclasses.replace(run.config.teacher, weights=weights))
    return dataclasses.replace(run, config=cfg)


# --------------------------------------------------------------------------------------------
# executing one run (top-level functions: picklable for Ray workers)


def run_dir(sweep_dir: str | Path, run: Run) -> Path:
    return Path(sweep_dir) / "runs" / run.run_id


def finished_metrics(sweep_dir: str | Path, run: Run) -> dict | None:
    """The run's metrics if it finished with this config; None if it has not finished."""
    d = RunDir(run_dir(sweep_dir, run))
    if not d.metrics_path.is_file():
        return None
    try:
        saved = d.saved_config_dict()
    except ConfigError as exc:  # a garbled config.yaml in one run does not block the sweep
        log.warning("%s: treated as not finished (%s)", d.path, exc)
        return None
    if saved is None or (
        comparable_config(saved, teacher_base=sweep_dir) != comparable_config(run.config_dict(), teacher_base=sweep_dir)
    ):
        raise ConfigError(
            f"{d.path} holds a finished run with a different config; the sweep file changed. "
            "Use a new --out directory, or delete that run directory to redo it"
        )
    metrics = d.read_metrics()
    if not isinstance(metrics, dict) or not isinstance(metrics.get("accuracy"), dict):
        log.warning("%s: its %s is unreadable; treated as not finished", d.path, d.METRICS)
        return None
    return metrics


def execute(run: Run, sweep_dir: str) -> dict:
    """Run (or resume, or skip) one run; return its metrics. Logs go to the run's log.txt."""
    done = finished_metrics(sweep_dir, run)
    if done is not None:
        return done
    out = run_dir(sweep_dir, run)
    with claim_dir(out, kind="run"):  # before log.txt: run_pipeline claims it again (re-entrant)
        return _execute(run, out, sweep_dir)


def _execute(run: Run, out: Path, sweep_dir: str | Path) -> dict:
    handler = logging.FileHandler(RunDir(out).log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("pqd")
    old = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False  # a run's log goes to its log.txt, not to the console under the progress bar
    try:
        if run.kind == "peer":
            return _execute_peer(run, out, sweep_dir)
        from pqd.run.pipeline import run_pipeline  # teacher runs too: a dense run of the same pipeline

        return run_pipeline(run.config, out, teacher_base=sweep_dir)
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old[0])
        root.propagate = old[1]


def _execute_peer(run: Run, out: Path, sweep_dir: str | Path) -> dict:
    from pqd.commands.peers import peer_run
    from pqd.train.checkpoint import atomic_write_bytes

    assert run.peer is not None  # kind "peer"
    d = RunDir(out)
    saved = d.saved_config_dict()
    if saved is not None and (
        comparable_config(saved, teacher_base=sweep_dir) != comparable_config(run.config_dict(), teacher_base=sweep_dir)
    ):
        raise ConfigError(f"{d.path} holds a peer run with a different config; use a new --out directory or delete it")
    atomic_write_bytes(d.config_path, yaml.safe_dump(run.config_dict(), sort_keys=False).encode())
    return peer_run(with_teacher_base(run.config, sweep_dir), out, peer=run.peer)


# --------------------------------------------------------------------------------------------
# results table


TIMING_COLUMNS = (
    "lat_b1_teacher_ms",
    "lat_b1_final_ms",
    "lat_b1_speedup",
    "lat_bmax_teacher_ms",
    "lat_bmax_final_ms",
    "lat_bmax_speedup",
    "wall_time_s",
    "recorded_at",
    "metrics_json",
)
COLUMNS = (
    ("run_id", "TEXT PRIMARY KEY"),
    ("variant", "TEXT"),
    ("kind", "TEXT"),
    ("teacher_id", "TEXT"),
    ("model", "TEXT"),
    ("width", "REAL"),
    ("dataset", "TEXT"),
    ("stages", "TEXT"),
    ("stage_order", "TEXT"),
    ("seed", "INTEGER"),
    ("sparsity_target", "REAL"),
    ("sparsity_achieved", "REAL"),
    ("prune_criterion", "TEXT"),
    ("quantize_mode", "TEXT"),
    ("final_form", "TEXT"),
    ("teacher_epochs", "INTEGER"),
    ("teacher_top1", "REAL"),
    ("final_top1", "REAL"),
    ("size_teacher_bytes", "INTEGER"),
    ("size_final_bytes", "INTEGER"),
    ("size_compact_bytes", "INTEGER"),
    ("lat_b1_teacher_ms", "REAL"),
    ("lat_b1_final_ms", "REAL"),
    ("lat_b1_speedup", "REAL"),
    ("lat_bmax", "INTEGER"),
    ("lat_bmax_teacher_ms", "REAL"),
    ("lat_bmax_final_ms", "REAL"),
    ("lat_bmax_speedup", "REAL"),
    ("wall_time_s", "REAL"),
    ("axes_json", "TEXT"),
    ("config_json", "TEXT"),
    ("metrics_json", "TEXT"),
    ("run_dir", "TEXT"),
    ("recorded_at", "TEXT"),
    # evidence (schema-3 metrics): intervals, the test set, and what the latency ratio compares
    ("teacher_top1_ci_low", "REAL"),
    ("teacher_top1_ci_high", "REAL"),
    ("final_top1_ci_low", "REAL"),
    ("final_top1_ci_high", "REAL"),
    ("test_n", "INTEGER"),
    ("test_full_split", "INTEGER"),
    ("lat_teacher_label", "TEXT"),
    ("lat_final_label", "TEXT"),
    ("lat_speedup_kind", "TEXT"),
    ("peer", "TEXT"),
)

# lat_* columns: what each side is (every ratio in the table names both sides and runtime)
PIPELINE_LATENCY = {
    "int8": ("teacher FP32 @ PyTorch eager", "INT8 @ PyTorch TorchScript", "pytorch_eager_vs_compiled"),
    "fp32": ("teacher FP32 @ PyTorch eager", "FP32 @ PyTorch eager", "same_runtime"),
}


def _ci_columns(acc: Mapping[str, Any]) -> dict:
    out = {}
    for key in ("teacher_top1", "final_top1"):
        ci = acc.get(f"{key}_ci") or {}
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = ci.get("ci_low"), ci.get("ci_high")
    full = acc.get("test_full_split")
    return out | {"test_n": acc.get("test_n"), "test_full_split": None if full is None else int(bool(full))}


def _peer_row(run: Run, metrics: Mapping[str, Any]) -> dict:
    """A peer run's row: its metrics.json is :func:`pqd.commands.peers.peer_run`'s (OpenVINO FP32 teacher vs the peer's INT8)."""
    cfg = run.config_dict()
    acc = metrics.get("accuracy") or {}
    lat = metrics.get("latency") or []
    threads = {r.get("threads") for r in lat}
    thr = min(threads) if threads and None not in threads else None  # the run's measure.threads (one value)
    recs = [r for r in lat if r.get("threads") == thr]
    base = next((r for r in recs if r.get("precision") == "fp32"), None)
    peer = next((r for r in recs if r.get("precision") == "int8"), None)

    def ms(rec_name: str | None, batch: int | None) -> float | None:
        return next((r["median_ms"] for r in recs if r["model"] == rec_name and r["batch"] == batch), None)

    from pqd.measure.speedup import RUNTIME_LABELS

    runtime = RUNTIME_LABELS.get((base or peer or {}).get("runtime", ""), "?")
    tname, pname = (base or {}).get("model"), (peer or {}).get("model")
    bmax = max((r["batch"] for r in recs), default=None)
    b1t, b1f = ms(tname, 1), ms(pname, 1)
    bmt, bmf = (ms(tname, bmax), ms(pname, bmax)) if bmax and bmax != 1 else (None, None)
    return {
        "run_id": run.run_id,
        "variant": run.variant,
        "kind": run.kind,
        "teacher_id": run.teacher_id,
        "peer": run.peer,
        "model": metrics.get("model"),
        "width": metrics.get("width"),
        "dataset": metrics.get("dataset"),
        "stages": "",
        "stage_order": f"peer:{run.peer}",
        "seed": cfg["seed"],
        "sparsity_target": 0.0,
        "sparsity_achieved": None,
        "prune_criterion": None,
        "quantize_mode": "ptq",
        "final_form": metrics.get("final_form", "int8"),
        "teacher_epochs": cfg["teacher"]["epochs"],
        "teacher_top1": acc.get("teacher_top1"),
        "final_top1": acc.get("final_top1"),
        "size_teacher_bytes": None,
        "size_final_bytes": (metrics.get("size_bytes") or {}).get("final"),
        "size_compact_bytes": None,
        "lat_b1_teacher_ms": b1t,
        "lat_b1_final_ms": b1f,
        "lat_b1_speedup": (b1t / b1f) if b1t and b1f else None,
        "lat_bmax": bmax if bmt is not None else None,
        "lat_bmax_teacher_ms": bmt,
        "lat_bmax_final_ms": bmf,
        "lat_bmax_speedup": (bmt / bmf) if bmt and bmf else None,
        "lat_teacher_label": f"teacher FP32 @ {runtime}",
        "lat_final_label": f"{run.peer} INT8 @ {runtime}",
        "lat_speedup_kind": "same_runtime",
        "wall_time_s": metrics.get("wall_time_s"),
        "axes_json": json.dumps(dict(run.axes)),
        "config_json": json.dumps(cfg, sort_keys=True),
        "metrics_json": json.dumps(metrics, sort_keys=True),
        "run_dir": str(Path("runs") / run.run_id),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    } | _ci_columns(acc)


def row_for(run: Run, metrics: Mapping[str, Any], sweep_dir: str | Path) -> dict:
    """One table row, read from the typed metrics (:class:`pqd.run.metrics.Metrics`) and the run's config.

    ``lat_*``: the run's own timing, teacher FP32 in PyTorch eager vs the final model (INT8 in
    TorchScript: a PyTorch-eager-vs-compiled ratio, ``lat_speedup_kind``); a peer run's are
    in its runtime (``lat_teacher_label`` / ``lat_final_label`` name both sides)."""
    if run.kind == "peer" or metrics.get("kind") == "peer":
        return _peer_row(run, metrics)
    cfg = run.config_dict()
    m = Metrics.from_dict(metrics)
    final = m.final_model_name
    bmax = max((r.batch for r in m.latency), default=None)
    b1t, b1f = m.median_ms("teacher_fp32", 1), m.median_ms(final, 1)
    bmt, bmf = (m.median_ms("teacher_fp32", bmax), m.median_ms(final, bmax)) if bmax and bmax != 1 else (None, None)
    criterion = m.prune_criterion
    return {
        "run_id": run.run_id,
        "variant": run.variant,
        "kind": run.kind,
        "teacher_id": run.teacher_id,
        "model": m.model,
        "width": m.width,
        "dataset": m.dataset,
        "stages": m.stages,
        "stage_order": m.stage_label,
        "seed": cfg["seed"],
        "sparsity_target": m.sparsity.target,
        "sparsity_achieved": m.sparsity.achieved,
        "prune_criterion": criterion,
        "quantize_mode": m.quantize_mode,
        "final_form": m.final_form,
        "teacher_epochs": cfg["teacher"]["epochs"],
        "teacher_top1": m.accuracy.teacher_top1,
        "final_top1": m.accuracy.final_top1,
        "size_teacher_bytes": m.size_bytes.teacher_fp32,
        "size_final_bytes": m.size_bytes.final,
        "size_compact_bytes": m.size_bytes.compact_int8,
        "lat_b1_teacher_ms": b1t,
        "lat_b1_final_ms": b1f,
        "lat_b1_speedup": (b1t / b1f) if b1t and b1f else None,
        "lat_bmax": bmax if bmt is not None else None,
        "lat_bmax_teacher_ms": bmt,
        "lat_bmax_final_ms": bmf,
        "lat_bmax_speedup": (bmt / bmf) if bmt and bmf else None,
        "wall_time_s": m.wall_time_s,
        "axes_json": json.dumps(dict(run.axes)),
        "config_json": json.dumps(cfg, sort_keys=True),
        "metrics_json": json.dumps(metrics, sort_keys=True),
        "run_dir": str(Path("runs") / run.run_id),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "lat_teacher_label": PIPELINE_LATENCY[m.final_form][0],
        "lat_final_label": PIPELINE_LATENCY[m.final_form][1],
        "lat_speedup_kind": PIPELINE_LATENCY[m.final_form][2],
        "peer": None,
    } | _ci_columns(metrics.get("accuracy") or {})


class ResultTable:
    """SQLite table ``runs`` in ``DIR/results.sqlite`` (stdlib only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with storage_errors(self.path):  # disk full / read-only / locked: a clear StorageError
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():  # made under a temporary name: a full disk never leaves a 0-byte table
                with atomic_output(self.path) as tmp, contextlib.closing(sqlite3.connect(tmp)) as conn, conn as db:
                    db.execute(f"CREATE TABLE runs ({', '.join(f'{n} {t}' for n, t in COLUMNS)})")
            with contextlib.closing(self._connect()) as conn, conn as db:
                db.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(f'{n} {t}' for n, t in COLUMNS)})")
                have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
                for n, t in COLUMNS:  # a table written by an older pqd: add the new columns
                    if n not in have:
                        db.execute(f"ALTER TABLE runs ADD COLUMN {n} {t}")
        record_written(self.path)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def upsert(self, row: Mapping[str, Any]) -> None:
        names = [n for n, _ in COLUMNS]
        with storage_errors(self.path), contextlib.closing(self._connect()) as conn, conn as db:
            db.execute(
                f"INSERT OR REPLACE INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [row.get(n) for n in names],
            )
        record_written(self.path)

    def rows(self) -> list[dict]:
        return read_table(self.path)


def read_table(path: str | Path) -> list[dict]:
    """All rows of a results table as dicts (ordered by run_id)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.sqlite"
    if not p.is_file():
        raise PqdError(f"no results table at {p}; run 'pqd sweep SWEEP.yaml --out DIR' first")
    with storage_errors(p, action="reading"):
        db = sqlite3.connect(p)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY run_id")]
        finally:
            db.close()


# --------------------------------------------------------------------------------------------
# executors


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="sweep runs", unit="run", disable=not enabled, dynamic_ncols=True)


def run_local(
    todo: list[Run], sweep_dir: str, on_done: Callable[[Run, dict], None], on_fail: Callable[[Run, BaseException], None]
) -> None:
    failed_teachers: set[str] = set()
    for run in todo:
        if run.kind != "teacher" and run.teacher_id in failed_teachers:
            on_fail(run, PqdError(f"its teacher run teacher-{run.teacher_id} failed"))
            continue
        try:
            metrics = execute(run, sweep_dir)
        except Exception as exc:  # one failed run does not stop the sweep; KeyboardInterrupt does
            if run.kind == "teacher":
                failed_teachers.add(run.teacher_id)
            on_fail(run, exc)
            continue
        on_done(run, metrics)


def run_ray(
    todo: list[Run],
    sweep_dir: str,
    on_done: Callable[[Run, dict], None],
    on_fail: Callable[[Run, BaseException], None],
    *,
    address: str | None,
    cpus_per_run: float | None,
) -> None:
    try:
        import ray
    except ImportError:
        raise PqdError("--executor ray needs Ray: pip install 'pqd[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
        started = True
    try:
        remote = ray.remote(_ray_execute)
        refs: dict[Any, Run] = {}
        teacher_refs: dict[str, Any] = {}
        for run in todo:  # teachers first: pipeline runs depend on their teacher's task
            cpus = cpus_per_run or float(max(run.config.measure.threads, run.config.train.threads or 1))
            if run.kind == "teacher":
                ref = remote.options(num_cpus=cpus).remote(run, sweep_dir, None)
                teacher_refs[run.teacher_id] = ref
            else:
                ref = remote.options(num_cpus=cpus).remote(run, sweep_dir, teacher_refs.get(run.teacher_id))
            refs[ref] = run
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    metrics = ray.get(ref)
                except Exception as exc:  # the task (or the teacher task it waited for) raised
                    on_fail(refs[ref], exc)
                else:
                    on_done(refs[ref], metrics)
    finally:
        if started:
            ray.shutdown()


def _ray_execute(run: Run, sweep_dir: str, teacher_done: Any) -> dict:
    # teacher_done: the teacher task's result; Ray resolves it first, which orders the tasks.
    return execute(run, sweep_dir)


def run_sweep(
    spec: Mapping[str, Any],
    out_dir: str | Path,
    *,
    executor: str = "local",
    address: str | None = None,
    cpus_per_run: float | None = None,
    only: Iterable[str] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Expand ``spec`` and run everything not yet finished into ``out_dir``; return the table rows.

    ``executor``: 'local' (one run after another in this process) or 'ray' (tasks on a Ray
    cluster at ``address``, or a local Ray instance; ``out_dir`` must be on a filesystem every
    node sees). ``only``: variant names to restrict to (their teachers run too).
    """
    out = Path(out_dir).resolve()
    sweep = expand(spec, out)
    runs = sweep.ordered()
    if only is not None:
        keep = set(only)
        unknown = keep - {r.variant for r in runs}
        if unknown:
            raise ConfigError(
                f"--only: no variant named {sorted(unknown)}; variants: {sorted({r.variant for r in runs})}"
            )
        tids = {r.teacher_id for r in runs if r.variant in keep}
        runs = [r for r in runs if r.variant in keep or (r.kind == "teacher" and r.teacher_id in tids)]
    with claim_dir(out, kind="sweep"):
        return _run_sweep(
            spec, out, sweep, runs, executor=executor, address=address, cpus_per_run=cpus_per_run, progress=progress
        )


def _run_sweep(
    spec: Mapping[str, Any],
    out: Path,
    sweep: Sweep,
    runs: list[Run],
    *,
    executor: str,
    address: str | None,
    cpus_per_run: float | None,
    progress: bool,
) -> list[dict]:
    # never over a user's file: in a folder pqd did not write, sweep.yaml is refused (pqd.safety.fsguard)
    safe_replace(out / "sweep.yaml", yaml.safe_dump(json.loads(json.dumps(dict(spec))), sort_keys=False).encode())
    table = ResultTable(out / "results.sqlite")
    todo = []
    for run in runs:
        m = finished_metrics(out, run)
        if m is None:
            todo.append(run)
        else:
            table.upsert(row_for(run, m, out))
    log.info("sweep %s: %d runs, %d finished, %d to do", sweep.name, len(runs), len(runs) - len(todo), len(todo))
    bar = _progress(len(runs), len(runs) - len(todo), progress)

    def on_done(run: Run, metrics: dict) -> None:
        try:
            table.upsert(row_for(run, metrics, out))
        except StorageError as exc:  # the run's metrics.json is the record; the next invocation upserts it again
            log.error("run %s finished, but its table row could not be written: %s", run.run_id, exc)
            failures.append((run.run_id, f"table write failed: {exc}"))
        bar.set_postfix_str(f"{run.run_id}: top1 {100 * metrics['accuracy']['final_top1']:.1f}%", refresh=False)
        bar.update(1)

    failures: list[tuple[str, str]] = []

    def on_fail(run: Run, exc: BaseException) -> None:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.error("run %s failed: %s", run.run_id, msg)
        failures.append((run.run_id, msg))
        bar.update(1)

    try:
        if executor == "local":
            run_local(todo, str(out), on_done, on_fail)
        elif executor == "ray":
            run_ray(todo, str(out), on_done, on_fail, address=address, cpus_per_run=cpus_per_run)
        else:
            raise ConfigError(f"executor {executor!r} is not valid; choose 'local' or 'ray'")
    finally:
        bar.close()
    if failures:
        listing = "; ".join(f"{rid}: {msg[:200]}" for rid, msg in failures)
        raise PqdError(
            f"{len(failures)} of {len(runs)} runs failed ({listing}). The others are in {out / 'results.sqlite'}; "
            f"see each failed run's log.txt, fix the cause and re-run the same command to finish them"
        )
    ids = {r.run_id for r in runs}
    return [r for r in table.rows() if r["run_id"] in ids]
