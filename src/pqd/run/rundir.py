"""A run directory: the one place that knows its layout, checks its config, saves and restores
students, rebuilds a finished run and reads/merges its metrics.

    RUN_DIR/config.yaml                           resolved config (a different config is refused)
    RUN_DIR/env.json                              CPU, flags, threads, versions, git commit
    RUN_DIR/log.txt                               the run's log when run by a sweep
    RUN_DIR/teacher.safetensors                   dense FP32 teacher weights (also the size baseline)
    RUN_DIR/teacher.epoch.safetensors             last finished teacher epoch while it trains
    RUN_DIR/stages/N_<stage>/epoch.safetensors    last finished epoch of a running stage (N = 1-based index)
    RUN_DIR/stages/N_<stage>/student.safetensors  the stage's output (weights + masks + form + records)
    RUN_DIR/model_int8.pt                         final deployable model (TorchScript, frozen, INT8)
    RUN_DIR/model_int8.pqdz                       the same INT8 weights, compact sparse format (pqd.deploy.compact)
      or RUN_DIR/model_fp32.safetensors           when no stage quantizes (a dense run deploys teacher.safetensors)
    RUN_DIR/metrics.json                          typed metrics (pqd.run.metrics)
    RUN_DIR/{model_int8,model_fp32,teacher_fp32}.onnx, export.json   written by `pqd export`
    RUN_DIR/bench.json, bench.md                  written by `pqd bench`

Every other module asks :class:`RunDir` for these paths; no file name of a run is spelled
elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from pqd.compress.channels.reshape import fit_to_state_dict
from pqd.compress.qat import freeze, prepare
from pqd.compress.qoptions import quant_options
from pqd.compress.student import Student
from pqd.errors import CheckpointError, ConfigError
from pqd.models.registry import create_model
from pqd.run.config import RunConfig, load_config
from pqd.run.metrics import Metrics
from pqd.safety.fsguard import DirLock, check_path_encodable, check_writable_run_dir
from pqd.safety.safeyaml import load_yaml
from pqd.safety.trustpolicy import check_config_code
from pqd.stages.quantize import QuantizeConfig
from pqd.train.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from pqd.train.loop import process_rank

log = logging.getLogger("pqd")


def model_kwargs(config: RunConfig) -> dict[str, Any]:
    """The keyword arguments ``create_model`` gets for this run's model (beyond num_classes)."""
    kw: dict[str, Any] = {}
    if config.model.width != 1.0:
        kw["width"] = config.model.width
    if config.model.dropout:
        kw["dropout"] = config.model.dropout
    return kw


def build_model(config: RunConfig, num_classes: int) -> nn.Module:
    """The run's architecture, freshly initialised."""
    return create_model(config.model.name, num_classes=num_classes, **model_kwargs(config))


# Every top-level name pqd writes into a run / sweep folder (fnmatch patterns): anything else in
# an --out folder is a user's file, and pqd refuses to write there (pqd.safety.fsguard).
RUN_DIR_FILES = (
    "config.yaml",
    "env.json",
    "log.txt",
    "metrics.json",
    "teacher.safetensors",
    "teacher.epoch.safetensors",
    "stages",
    "tracker",
    "model_*.pt",
    "model_*.pqdz",
    "model_*.safetensors",
    "*.onnx",
    "export.json",
    "bench.json",
    "bench.md",
)
SWEEP_DIR_FILES = (
    "sweep.yaml",
    "results.sqlite",
    "results.sqlite-*",
    "runs",
    "log.txt",
    "report.md",
    "report.html",
    "plots",
)
REPORT_FILES = ("report.md", "report.html", "plots")
TUNE_DIR_FILES = (
    "tune.yaml",
    "tune.json",
    "runs",
    "teacher",
    "cache",
    "winner",
    "log.txt",
    "report.md",
    "report.html",
    "plots",
)

# Settings that change no trained result: a resume ignores differences in them.
RESULT_NEUTRAL_KEYS = (
    "train.progress",
    "train.tracker",
    "train.tracker_dir",
    "train.threads",
    "train.eval_batch_size",
    "data.cache_dir",
    "data.workers",
    "data.max_memory_gb",
    "measure",
)

_SHARED_TEACHER = re.compile(r"(^|/)(runs/teacher-[0-9A-Za-z_-]+/teacher\.safetensors)$")


@contextlib.contextmanager
def claim_dir(path: str | Path, *, kind: str = "run") -> Any:
    """Claim an output folder for the duration of the block: refuse a non-UTF-8 path, a folder
    holding files pqd did not write (never overwritten), and a folder another process holds
    (:class:`pqd.safety.fsguard.DirLock`). Only rank 0 claims under torchrun. Re-entrant."""
    if process_rank() != 0:
        yield None
        return
    files = {"run": RUN_DIR_FILES, "sweep": SWEEP_DIR_FILES, "report": REPORT_FILES, "tune": TUNE_DIR_FILES}[kind]
    check_path_encodable(path)
    check_writable_run_dir(path, expected_files=files, kind=kind)
    with DirLock(path, what={"run": "RUN_DIR", "sweep": "SWEEP_DIR", "tune": "TUNE_DIR"}.get(kind, "folder")) as lock:
        yield lock


def with_teacher_base(config: RunConfig, teacher_base: str | Path | None) -> RunConfig:
    """``config`` with a relative ``teacher.weights`` (a sweep's shared teacher, stored relative to the
    sweep folder so a moved or copied sweep resumes) resolved against ``teacher_base``."""
    if teacher_base is None or not config.teacher.weights or Path(config.teacher.weights).is_absolute():
        return config
    import dataclasses

    return dataclasses.replace(
        config, teacher=dataclasses.replace(config.teacher, weights=str(Path(teacher_base) / config.teacher.weights))
    )


def comparable_config(saved: Mapping[str, Any], *, teacher_base: str | Path | None = None) -> dict:
    """A config dict as compared on resume: defaults filled in (a config.yaml written by an older
    pqd still matches), settings that change no trained result removed, and a sweep's shared
    teacher path taken relative to the sweep folder (a moved or copied sweep still resumes)."""
    saved = dict(saved)
    peer = saved.pop("peer", None)  # a sweep's peer run (e.g. nncf_ptq) stores its peer beside the RunConfig
    try:
        d = RunConfig.from_dict(saved).to_dict()
    except ConfigError:
        d = json.loads(json.dumps(saved, default=str))
    if peer is not None:
        d["peer"] = peer
    for key in RESULT_NEUTRAL_KEYS:
        *parents, leaf = key.split(".")
        node: Any = d
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    w = (d.get("teacher") or {}).get("weights") if isinstance(d.get("teacher"), dict) else None
    if teacher_base is not None and isinstance(w, str) and w:
        m = _SHARED_TEACHER.search(w.replace(os.sep, "/"))
        if m and (not Path(w).is_absolute() or Path(w).is_file() or (Path(teacher_base) / m.group(2)).is_file()):
            d["teacher"]["weights"] = m.group(2)
    return d


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _state_mismatch(path: Path, model: nn.Module, state: Mapping[str, Any], exc: BaseException) -> str:
    """A short summary of a state_dict that does not fit (not torch's key list of many KB), with its cause."""
    built = model.state_dict()
    have, want = set(state), set(built)
    missing, unexpected = sorted(want - have), sorted(have - want)
    shapes = [
        f"{k} saved {tuple(state[k].shape)} vs built {tuple(built[k].shape)}"
        for k in sorted(have & want)
        if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(built[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:5])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:5])}")
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) of another shape, e.g. {'; '.join(shapes[:3])}")
    if not parts:
        parts.append(str(exc).splitlines()[0][:300] if str(exc) else "shapes differ")
    if missing or unexpected:
        cause = (
            "the file holds another model's tensors: check that config.yaml's model (name, width, leaf modules) "
            "is the one this run trained"
        )
    else:
        cause = (
            "the file has this model's tensors but pqd could not rebuild their shapes; the file is intact: "
            "check that config.yaml's model is the one this run trained, and report the model if it is"
        )
    return f"checkpoint {str(path)!r} does not fit this stage's model ({'; '.join(parts)}): {cause}"


class RunDir:
    """A pqd run directory (see the module docstring for its layout)."""

    CONFIG = "config.yaml"
    ENV = "env.json"
    LOG = "log.txt"
    TEACHER = "teacher.safetensors"
    TEACHER_EPOCH = "teacher.epoch.safetensors"
    STAGES = "stages"
    STAGE_EPOCH = "epoch.safetensors"
    STAGE_STUDENT = "student.safetensors"
    INT8 = "model_int8.pt"
    COMPACT = "model_int8.pqdz"
    FP32 = "model_fp32.safetensors"
    METRICS = "metrics.json"
    PREDICTIONS = "predictions.npy"  # int16 [N]: the final model's argmax per test image, test-split order
    TEACHER_PREDICTIONS = "teacher_predictions.npy"  # the same for the teacher
    TEST_LABELS = "test_labels.npy"  # int16 [N]: the test labels in the same order (test-set identity check)
    INT8_ONNX = "model_int8.onnx"
    FP32_ONNX = "model_fp32.onnx"
    TEACHER_ONNX = "teacher_fp32.onnx"
    EXPORT_JSON = "export.json"
    BENCH_JSON = "bench.json"
    BENCH_MD = "bench.md"
    TRACKER = "tracker"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ paths
    config_path = property(lambda self: self.path / self.CONFIG)
    env_path = property(lambda self: self.path / self.ENV)
    log_path = property(lambda self: self.path / self.LOG)
    teacher_path = property(lambda self: self.path / self.TEACHER)
    teacher_epoch_path = property(lambda self: self.path / self.TEACHER_EPOCH)
    int8_path = property(lambda self: self.path / self.INT8)
    compact_path = property(lambda self: self.path / self.COMPACT)
    fp32_path = property(lambda self: self.path / self.FP32)
    metrics_path = property(lambda self: self.path / self.METRICS)
    predictions_path = property(lambda self: self.path / self.PREDICTIONS)
    teacher_predictions_path = property(lambda self: self.path / self.TEACHER_PREDICTIONS)
    test_labels_path = property(lambda self: self.path / self.TEST_LABELS)

    def stage_dir(self, index: int, name: str) -> Path:
        """Checkpoint folder of the stage at ``index`` (0-based) of the stage list: index-based, so repeats work."""
        return self.path / self.STAGES / f"{index + 1}_{name}"

    def stage_epoch_path(self, index: int, name: str) -> Path:
        return self.stage_dir(index, name) / self.STAGE_EPOCH

    def student_path(self, index: int, name: str) -> Path:
        return self.stage_dir(index, name) / self.STAGE_STUDENT

    def deployed_path(self, config: RunConfig) -> Path:
        """The final deployable model's file: INT8 TorchScript if a stage quantizes, else the FP32
        student; a dense run deploys the teacher's own file."""
        if config.quantizes:
            return self.int8_path
        return self.fp32_path if config.stages else self.teacher_path

    # ------------------------------------------------------------------ config
    def has_results(self) -> bool:
        return any(
            p.exists() for p in (self.teacher_path, self.teacher_epoch_path, self.path / self.STAGES, self.metrics_path)
        )

    def saved_config_dict(self) -> dict | None:
        if not self.config_path.exists():
            return None
        try:
            data = load_yaml(self.config_path)
        except ConfigError as exc:
            raise ConfigError(
                f"{self.config_path} cannot be read ({exc}); restore it or choose a new --out directory"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{self.config_path} does not hold a config mapping; restore it or choose a new --out directory"
            )
        return data

    def claim(self, *, kind: str = "run"):
        """``with run.claim(): ...``: see :func:`claim_dir`."""
        return claim_dir(self.path, kind=kind)

    def check_config(self, config: RunConfig, *, teacher_base: str | Path | None = None) -> None:
        """Claim the directory for ``config``: write config.yaml, or check the saved one.

        A saved config that differs is refused (naming the differing keys), unless the directory
        holds no results yet (an earlier attempt stopped before computing anything): then the new
        config takes over.
        """
        want = config.to_dict()
        have = self.saved_config_dict()
        same = have is not None and (
            have == want
            or comparable_config(have, teacher_base=teacher_base) == comparable_config(want, teacher_base=teacher_base)
        )
        if have is None:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not same and self.has_results():
            diff = sorted(
                _diff_keys(
                    comparable_config(have, teacher_base=teacher_base),
                    comparable_config(want, teacher_base=teacher_base),
                )
            )
            if self._restart_unfinished_for_lr(config, diff):
                atomic_write_bytes(self.config_path, yaml.safe_dump(want, sort_keys=False).encode())
                return
            raise ConfigError(
                f"{self.path} holds a run with a different config (differs at: {', '.join(diff) or '?'}); "
                "re-run with the same config to resume, or choose a new --out directory"
            )
        elif not same:
            log.info("%s holds no results yet; replacing its config.yaml", self.path)
        else:
            return  # the saved config stays (a resume with harmless differences keeps the original record)
        atomic_write_bytes(self.config_path, yaml.safe_dump(want, sort_keys=False).encode())

    def _restart_unfinished_for_lr(self, config: RunConfig, diff: list[str]) -> bool:
        """A new learning rate for the teacher or a stage that has not finished (the remedy for a
        diverged stage): accepted when every differing key is such an ``lr`` and no result from
        that point on exists. The partial epoch checkpoints from that point on are discarded (they
        were trained with the old rate); everything before it is kept. False: not such a change."""
        names = [s.stage for s in config.stages]
        first = []
        for key in diff:
            section, _, leaf = key.partition(".")
            if leaf != "lr" or (section != "teacher" and section not in names):
                return False
            first.append(-1 if section == "teacher" else names.index(section))
        if not first:
            return False
        start = min(first)
        later = [self.student_path(i, n) for i, n in enumerate(names) if i >= start]
        if self.metrics_path.exists() or any(p.exists() for p in later) or (start < 0 and self.teacher_path.exists()):
            return False
        stale = [self.stage_epoch_path(i, n) for i, n in enumerate(names) if i >= start]
        stale += [self.teacher_epoch_path] if start < 0 else []
        for p in stale:
            p.unlink(missing_ok=True)
        where = "the teacher" if start < 0 else f"stage {start + 1} ({names[start]})"
        log.info(
            "%s: new learning rate (%s) for an unfinished stage: %s and later stages restart, earlier results are kept",
            self.path,
            ", ".join(diff),
            where,
        )
        return True

    def read_config(self, *, allow_code: bool = True) -> RunConfig:
        if not self.config_path.is_file():
            raise CheckpointError(
                f"{self.path} is not a pqd run directory (no {self.CONFIG}); make one with 'pqd run' or 'pqd demo'"
            )
        config = load_config(self.config_path)
        if not allow_code:
            check_config_code(config, allow_code=False, source=str(self.config_path))
        return config

    def write_env(self, env: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.env_path, json.dumps(env, indent=2).encode())

    # ------------------------------------------------------------------ teacher and students
    def load_teacher(self, config: RunConfig, num_classes: int, device: torch.device | str = "cpu") -> nn.Module:
        model = build_model(config, num_classes)
        model.load_state_dict(load_checkpoint(self.teacher_path)[0])
        return model.to(device)

    def save_teacher(self, model: nn.Module, *, model_name: str, num_classes: int) -> None:
        save_checkpoint(self.teacher_path, model.state_dict(), {"model": model_name, "num_classes": num_classes})
        self.teacher_epoch_path.unlink(missing_ok=True)

    def save_student(self, index: int, name: str, student: Student) -> None:
        """The output of stage ``index``: weights, masks, form and the student's records."""
        tensors = {f"model.{k}": v for k, v in student.model.state_dict().items()}
        tensors.update({f"mask.{k}": v for k, v in student.masks.items()})
        save_checkpoint(
            self.student_path(index, name),
            tensors,
            {"form": student.form, "records": dict(getattr(student, "records", {}) or {})},
        )
        self.stage_epoch_path(index, name).unlink(missing_ok=True)

    def last_finished_stage(self, config: RunConfig) -> int:
        """Index of the last stage whose output exists (-1 if none)."""
        done = [i for i, s in enumerate(config.stages) if self.student_path(i, s.stage).exists()]
        return max(done, default=-1)

    def rebuild_model(
        self,
        config: RunConfig,
        *,
        num_classes: int,
        image_shape: tuple[int, ...],
        form: str = "fp32",
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> nn.Module:
        """The run's model in ``form`` (untrained): build → fit layer shapes to ``state`` → prepare (FX)
        if quantized. The one rebuild path of students, skeletons and restores."""
        model = build_model(config, num_classes)
        if form != "fp32":
            # a quantized state's keys are the FX-prepared ones; the float layer shapes come from
            # the output of the last structural stage (structural stages precede quantizing ones)
            state = self.structural_state(config)
        if state is not None:
            fit_to_state_dict(model, state)
        if form != "fp32":
            quantize = config.section_as("quantize", QuantizeConfig)
            model = prepare(
                model,
                torch.zeros(2, *image_shape),
                mode=form,
                reduce_range=quantize.reduce_range,
                options=quant_options(quantize),
                leaf_modules=quantize.leaf_modules,
                float_modules=quantize.float_modules,
            )
        return model

    def structural_state(self, config: RunConfig) -> dict[str, torch.Tensor] | None:
        """The float state saved by the run's last structural stage (it fixes the layer shapes), or None."""
        from pqd.stages.protocol import get_stage

        last = max((i for i, s in enumerate(config.stages) if get_stage(s.stage).structural), default=None)
        if last is None or not self.student_path(last, config.stages[last].stage).exists():
            return None
        tensors, _ = load_checkpoint(self.student_path(last, config.stages[last].stage))
        return {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}

    def restore_student(
        self,
        config: RunConfig,
        index: int,
        *,
        num_classes: int,
        image_shape: tuple[int, ...],
        device: torch.device | str = "cpu",
    ) -> Student:
        """The student as it was after stage ``index``, rebuilt from that stage's output file."""
        tensors, meta = load_checkpoint(self.student_path(index, config.stages[index].stage))
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        form = meta.get("form", "fp32")
        model = self.rebuild_model(
            config, num_classes=num_classes, image_shape=image_shape, form=form, state=state if form == "fp32" else None
        )
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(
                _state_mismatch(self.student_path(index, config.stages[index].stage), model, state, exc)
            ) from None
        masks = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("mask.")}
        if form == "qat":
            freeze(model)  # every stage ends frozen; BN freezing is module state, not in the state_dict
        student = Student(model.to(device), masks, form, config.section_as("quantize", QuantizeConfig).freeze_fraction)
        records = meta.get("records") or {}
        if records and isinstance(getattr(student, "records", None), dict):
            student.records.update(records)
        return student

    # ------------------------------------------------------------------ predictions
    def save_predictions(self, predictions: Any, *, teacher: bool = False, labels: bool = False) -> Path:
        """Write per-image argmax predictions (int16, test-split order) for paired tests
        (``labels=True``: the test labels themselves, in the same order)."""
        import io

        import numpy as np

        a = np.asarray(predictions)
        if a.ndim != 1:
            raise ValueError(f"predictions must be a 1-D vector of class indices, got shape {a.shape}")
        buf = io.BytesIO()
        np.save(buf, a.astype(np.int16), allow_pickle=False)
        path = self.test_labels_path if labels else self.teacher_predictions_path if teacher else self.predictions_path
        atomic_write_bytes(path, buf.getvalue())
        return path

    def load_predictions(self, *, teacher: bool = False, labels: bool = False, name: str | None = None) -> Any:
        """The saved predictions (numpy int16 ``[N]``), or None if the run has none.

        ``name``: another file of the run (a peer's predictions file named in its metrics)."""
        import numpy as np

        path = (
            self.path / name
            if name
            else (
                self.test_labels_path if labels else self.teacher_predictions_path if teacher else self.predictions_path
            )
        )
        if Path(name or "").name != (name or "") or not path.is_file():
            return None
        return np.load(path, allow_pickle=False)

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> dict | None:
        """metrics.json as a dict (None if absent or unreadable)."""
        if not self.metrics_path.is_file():
            return None
        try:
            return json.loads(self.metrics_path.read_text())
        except (OSError, ValueError):
            return None

    def metrics(self) -> Metrics:
        """metrics.json, typed."""
        d = self.read_metrics()
        if d is None:
            raise CheckpointError(
                f"{self.path} has no readable {self.METRICS}; finish the run with the same 'pqd run' command"
            )
        return Metrics.from_dict(d)

    def write_metrics(self, metrics: Metrics) -> dict:
        """Write ``metrics``, keeping keys other commands added (e.g. ``bench``) to an earlier file."""
        previous = self.read_metrics() or {}
        out = metrics.to_dict()
        out.update({k: v for k, v in previous.items() if k not in out})
        atomic_write_bytes(self.metrics_path, json.dumps(out, indent=2).encode())
        return out

    def merge_metrics(self, **entries: Any) -> None:
        """Set top-level keys of an existing metrics.json (e.g. ``bench=...``); a no-op without one."""
        current = self.read_metrics()
        if current is None:
            return
        current.update(entries)
        atomic_write_bytes(self.metrics_path, json.dumps(current, indent=2).encode())
