"""The structured-pruning stage (letter ``S``): channels removed under a measured latency budget, then fine-tuning.

Runs on an FP32 student before unstructured pruning and quantization (``S:5,P:20,Q:40,D:40``):
it builds the latency model of the student's widths on the deployment target
(:mod:`pqd.structured.latency_model`), chooses per-group channel counts under the budget
and corrects them until the measured INT8 latency meets it (:mod:`pqd.structured.search`),
then fine-tunes the physically smaller model for the stage's epochs (with KD from the dense
teacher unless ``structured.distill`` is false). The search record
(widths, predicted and measured latency, iterations, latency-model error) goes into
``student.records``.

Resuming: the chosen widths are written next to the stage's checkpoint
(``<checkpoint>.structured.json``), so a resumed stage rebuilds the same architecture
without searching again and the training loop restores its weights.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from pqd.compress.channels.graph import MIN_KEEP, ROUND_TO
from pqd.compress.kd import KDLoss, distillation_loss
from pqd.compress.qoptions import quant_options
from pqd.compress.student import Student
from pqd.config import Section
from pqd.data.adapters import require_splits
from pqd.errors import ConfigError, ModelError
from pqd.models.reinit import reinitialize
from pqd.stages.distill import DistillConfig
from pqd.stages.protocol import RunConfig, Stage, StageContext, register_stage
from pqd.structured.search import MAX_ITERS, RUNS, Budget, SearchOptions, Selection, search

if TYPE_CHECKING:
    from torch import nn

    from pqd.config import TrainConfig
    from pqd.data import Splits
    from pqd.stages.quantize import QuantizeConfig
    from pqd.structured.latency_model import Target
    from pqd.train.tracking import Tracker

log = logging.getLogger("pqd.structured")


STRUCTURED_RUNTIMES = ("openvino", "onnxruntime", "pytorch")
STRUCTURED_CRITERIA = ("l1", "l2", "bn", "taylor", "random")
STRUCTURED_SELECT = ("greedy", "adapted_bn", "uniform")


def _sfail(key: str, msg: str) -> NoReturn:
    raise ConfigError(f"structured.{key}: {msg}")


@dataclass(frozen=True)
class StructuredConfig(Section):
    """Structured (channel) pruning under a latency budget measured on the deployment runtime.

    Budget: ``budget_ms``, or ``budget_fraction`` × the dense model's INT8 latency (exactly
    one); ``size_budget_mb``: optional cap on INT8 weight bytes. Target: ``runtime``
    ('openvino', 'onnxruntime', 'pytorch'), ``batch``, ``threads``. ``importance``: 'l1',
    'l2', 'bn', 'taylor', 'random'; ``sensitivity``: a CSV from ``pqd analyze`` to minimise
    predicted accuracy loss instead. Channel counts are multiples of ``round_to``; a group
    keeps at least ``min_keep`` of its channels. ``samples``: measured width configurations
    for the latency model (cached per machine and target); ``runs``: timed calls per
    measurement; ``max_iters``: measure-and-correct rounds; ``margin``: correct until the
    measured latency is at most (1 - margin) × the budget, room for the measurement's
    run-to-run spread. ``select``: 'greedy' (one greedy on the importance or sensitivity
    cost), 'adapted_bn' (several width recipes under the same target, uniform scaling among
    them, ranked by top-1 after re-estimating BN statistics on ``select_images`` training
    images; :mod:`pqd.structured.select`) or 'uniform' (one keep ratio for every group, the
    largest that meets the measured budget: the control for the other two). The stage then fine-tunes for
    its epochs at ``lr``, against the dense teacher's soft targets when ``distill`` is true
    (temperature and alpha of the ``distill`` section), else with cross-entropy. ``reinit``: train
    the chosen widths from a fresh, seeded initialisation instead of the teacher's kept weights:
    the trained-from-scratch control of Liu et al. ("Rethinking the Value of Network Pruning",
    ICLR 2019), which asks whether the pruned weights are worth anything. ``widths_from``: a
    finished run folder whose structured record gives the widths (no search, no measurement; that
    run's record is kept, e.g. to train another run's architecture from scratch). ``ignore``:
    module paths whose output channels are never pruned.
    """

    budget_fraction: float | None = 0.5
    budget_ms: float | None = None
    size_budget_mb: float | None = None
    runtime: str = "openvino"
    batch: int = 1
    threads: int = 2
    importance: str = "l1"
    sensitivity: str | None = None
    round_to: int = ROUND_TO
    min_keep: float = MIN_KEEP
    samples: int = 12
    runs: int = RUNS
    max_iters: int = MAX_ITERS
    margin: float = 0.0
    select: str = "greedy"
    select_images: int = 512
    lr: float = 0.01
    distill: bool = True
    reinit: bool = False
    widths_from: str | None = None
    ignore: tuple[str, ...] = ()
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.budget_ms is None) == (self.budget_fraction is None):
            _sfail(
                "budget_fraction",
                "give exactly one of structured.budget_fraction and structured.budget_ms (set the other to null)",
            )
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            _sfail("budget_fraction", f"{self.budget_fraction!r} must be in (0, 1]")
        if not 0 <= self.margin < 0.5:
            _sfail(
                "margin",
                f"{self.margin!r} must be in [0, 0.5): the share of the budget kept free for run-to-run spread",
            )
        if self.budget_ms is not None and not self.budget_ms > 0:
            _sfail("budget_ms", f"{self.budget_ms!r} must be > 0")
        if self.size_budget_mb is not None and not self.size_budget_mb > 0:
            _sfail("size_budget_mb", f"{self.size_budget_mb!r} must be > 0")
        if self.runtime not in STRUCTURED_RUNTIMES:
            _sfail(
                "runtime", f"{self.runtime!r} is not valid; choose one of {', '.join(map(repr, STRUCTURED_RUNTIMES))}"
            )
        if self.importance not in STRUCTURED_CRITERIA:
            _sfail(
                "importance",
                f"{self.importance!r} is not valid; choose one of {', '.join(map(repr, STRUCTURED_CRITERIA))}",
            )
        for k in ("batch", "threads", "round_to", "samples", "runs", "max_iters"):
            if getattr(self, k) < 1:
                _sfail(k, f"{getattr(self, k)!r} must be >= 1")
        if self.samples < 2:
            _sfail("samples", f"{self.samples} must be >= 2 (the latency model is fitted on them)")
        if not 0 < self.min_keep <= 1:
            _sfail("min_keep", f"{self.min_keep!r} must be in (0, 1]")
        if not self.lr >= 0:
            _sfail("lr", f"{self.lr!r} must be >= 0")
        if self.select not in STRUCTURED_SELECT:
            _sfail("select", f"{self.select!r} is not valid; choose one of {', '.join(map(repr, STRUCTURED_SELECT))}")
        if self.select_images < 16:
            _sfail("select_images", f"{self.select_images!r} must be >= 16 (BN statistics are re-estimated on them)")
        if self.select != "greedy" and self.size_budget_mb is not None:
            _sfail(
                "select", f"{self.select!r} does not take a size budget yet; use select 'greedy' with size_budget_mb"
            )


def _with_record(student: Student, model: nn.Module, key: str, record: dict[str, Any]) -> Student:
    return Student(model, {}, student.form, student.freeze_fraction, records={**student.records, key: record})


def deployment_target(cfg: StructuredConfig, quantize_config: QuantizeConfig | None = None) -> Target:
    """The :class:`~pqd.structured.latency_model.Target` of a ``structured`` config section, quantized
    as ``quantize_config`` (:class:`pqd.stages.quantize.QuantizeConfig`; default: pqd's defaults) says."""
    from pqd.structured.latency_model import Target

    target = Target(cfg.runtime, cfg.batch, cfg.threads)
    if quantize_config is None:
        return target
    return replace(
        target,
        reduce_range=quantize_config.reduce_range,
        options=quant_options(quantize_config),
        leaf_modules=tuple(quantize_config.leaf_modules),
    )


def structured_prune(
    student: Student,
    cfg: StructuredConfig,
    *,
    data: Splits,
    epochs: int,
    train_config: TrainConfig,
    checkpoint: Path | None = None,
    seed: int = 0,
    augment: bool = True,
    device: torch.device | None = None,
    teacher: nn.Module | None = None,
    distill_config: DistillConfig | None = None,
    tracker: Tracker | None = None,
    quantize_config: QuantizeConfig | None = None,
) -> tuple[Student, dict[str, Any]]:
    """Search widths under ``cfg``'s budget, prune, fine-tune; returns (new student, search record).

    ``quantize_config`` (:class:`pqd.stages.quantize.QuantizeConfig`): how the later quantize stage will
    quantize the model (leaf modules, weight options, activation range); the latency model
    measures INT8 models quantized the same way (default: pqd's defaults)."""
    data = require_splits(data, where="structured_prune(..., data=)")
    from pqd.compress.channels.graph import ORDER_HINT, ChannelGraph, check_prunable, prune_to_widths
    from pqd.compress.channels.importance import group_scores
    from pqd.structured.latency_model import build
    from pqd.train.loop import epoch_seed, train

    if student.quantized:
        raise ModelError(f"the student is already quantized ({student.form}): {ORDER_HINT}")
    if student.masks:
        raise ModelError(
            "the student has unstructured pruning masks: structured pruning must come before prune, e.g. S:5,P:20,Q:40,D:40"
        )
    check_prunable(student.model)
    model = copy.deepcopy(student.model).cpu().eval()
    input_shape = data.image_shape
    example = torch.zeros(2, *input_shape)
    graph = ChannelGraph(copy.deepcopy(model), example, tuple(cfg.ignore))
    scores = group_scores(graph, cfg.importance, data=data, seed=seed)
    state = Path(str(checkpoint) + ".structured.json") if checkpoint else None
    given: dict[str, Any] | None = None  # widths decided without a search: resumed, or another run's
    if state is not None and state.exists():
        given = json.loads(state.read_text())
        log.info("structured: resumed widths from %s", state)
    elif cfg.widths_from:
        given = widths_record(cfg.widths_from, graph.widths())
        log.info("structured: widths of %s", cfg.widths_from)
    if given is not None:
        record = given
        pruned = prune_to_widths(model, record["widths"], example=example, round_to=1, scores=scores, ignore=cfg.ignore)
    else:
        target = deployment_target(cfg, quantize_config)
        lm = build(
            model,
            graph,
            target=target,
            input_shape=input_shape,
            samples=cfg.samples,
            runs=cfg.runs,
            round_to=cfg.round_to,
            min_keep=cfg.min_keep,
            cache_dir=cfg.cache_dir,
            seed=seed,
        )
        sens = None
        if cfg.sensitivity:
            from pqd.structured.sensitivity import read_csv

            sens = read_csv(cfg.sensitivity)
        dense_ms = lm.dense_ms(graph)
        recipes = rank = ranked_on = None
        if cfg.select != "greedy":
            from pqd.structured.search import cost_function
            from pqd.structured.select import stage_ranker, width_recipes

            recipes = width_recipes(
                graph, scores, cost=cost_function(graph, scores, sens), round_to=cfg.round_to, min_keep=cfg.min_keep
            )
            if cfg.select == "uniform":
                recipes = {"uniform": recipes["uniform"]}
            else:
                rank, ranked_on = stage_ranker(
                    model, scores, data, example=example, calib_images=cfg.select_images, seed=seed, ignore=cfg.ignore
                )
        pruned, record = search(
            model,
            lm,
            graph,
            target=target,
            input_shape=input_shape,
            budget=Budget(
                ms=cfg.budget_ms, fraction=cfg.budget_fraction, size_mb=cfg.size_budget_mb, margin=cfg.margin
            ),
            dense_ms=dense_ms,
            selection=Selection(scores=scores, sensitivity=sens, recipes=recipes, rank=rank),
            options=SearchOptions(
                round_to=cfg.round_to,
                min_keep=cfg.min_keep,
                max_iters=cfg.max_iters,
                runs=cfg.runs,
                cache_dir=cfg.cache_dir,
            ),
        )
        record["importance"] = cfg.importance
        record["select"] = cfg.select
        if ranked_on:
            record["ranked_on"] = ranked_on
    if state is not None and not state.exists():
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps(record, indent=1))
    if not record.get("met", True):
        message = missed_budget_message(record)
        log.warning("%s", message)
        record["warnings"] = [message]
    if cfg.reinit:
        pruned = reinitialize(pruned, seed=epoch_seed(seed, "structured-reinit", 0))
        record["reinitialized"] = True
    if device is not None:
        pruned.to(device)
    if epochs > 0:
        loss_fn = None
        if cfg.distill and teacher is not None:
            dc = distill_config or DistillConfig()
            loss_fn = distillation_loss(
                KDLoss(temperature=dc.temperature, alpha=dc.alpha, kd_weight=dc.kd_weight), teacher
            )

        train(
            pruned,
            data,
            epochs=epochs,
            lr=cfg.lr,
            config=train_config,
            loss_fn=loss_fn,
            checkpoint=checkpoint,
            seed=seed,
            tag="structured",
            lr_key="structured.lr",
            tracker=tracker,
            amp=True,
            augment=augment,
        )
    pruned.eval()
    return Student(pruned, {}, student.form, student.freeze_fraction), record


def widths_record(run: str | Path, dense: dict[str, int]) -> dict[str, Any]:
    """The structured record of the finished run folder ``run`` (its metrics.json), checked against this
    model's channel groups ``dense``; ``widths_from`` is added."""
    metrics = Path(run) / "metrics.json"
    if not metrics.is_file():
        raise ConfigError(f"structured.widths_from: {str(run)!r} is not a finished run folder (no metrics.json)")
    records = [s.get("records") or {} for s in json.loads(metrics.read_text()).get("stage_records") or []]
    record = next((r for r in records if "widths" in r), None)
    if record is None:
        raise ConfigError(f"structured.widths_from: run {str(run)!r} has no structured stage")
    widths = record["widths"]
    if set(widths) != set(dense) or any(not 0 < widths[g] <= dense[g] for g in dense):
        raise ConfigError(
            f"structured.widths_from: the widths of {str(run)!r} do not fit this model's channel groups "
            f"({len(widths)} groups there, {len(dense)} here)"
        )
    return dict(record, widths_from=str(run))


def missed_budget_message(record: dict[str, Any]) -> str:
    """What a search record that missed its budget says: both numbers of the same timing run, why, and what was kept."""
    dense, budget = record["dense_ms_same_run"], record["budget_ms_same_run"]
    why = record.get("missed_because") or "no measured model met the budget"
    return (
        f"structured: budget missed: the kept model measured {record['measured_ms']:.3f} ms against a budget of "
        f"{budget:.3f} ms (dense {dense:.3f} ms in the same timing run, {record['measured_ms'] / dense:.2f}x dense); "
        f"{why}. Kept the fastest measured model (iteration {record['chosen_iteration']}); raise the budget, or lower "
        "structured.min_keep / structured.round_to"
    )


class StructuredStage(Stage):
    """Stage 'structured' / 'S', section 'structured'; changes layer shapes."""

    name, letter, section, config_class = "structured", "S", "structured", StructuredConfig
    structural = True

    def preflight(self, model: nn.Module, config: RunConfig, example: torch.Tensor) -> None:
        """The target runtime loads and runs the model's INT8 form (raises ModelError otherwise)."""
        from pqd.structured.latency_model import check_runtime

        check_runtime(
            copy.deepcopy(model).cpu().eval(),
            target=deployment_target(config.structured, config.quantize),
            input_shape=tuple(example.shape[1:]),
        )

    def run(
        self,
        student: Student,
        section_config: StructuredConfig,
        ctx: StageContext,
        *,
        epochs: int,
        checkpoint: Path | None,
    ) -> Student:
        out, record = structured_prune(
            student,
            section_config,
            data=ctx.data,
            epochs=epochs,
            train_config=ctx.train_config,
            checkpoint=checkpoint,
            seed=ctx.seed,
            augment=ctx.augment,
            device=ctx.device,
            teacher=ctx.teacher,
            distill_config=ctx.config.distill,
            tracker=ctx.tracker,
            quantize_config=ctx.config.quantize,
        )
        return _with_record(student, out.model, f"{ctx.index + 1}_{self.name}", record)


STAGE = register_stage(StructuredStage())
