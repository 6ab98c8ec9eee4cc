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
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pqd.data.adapters import require_splits
from pqd.errors import ModelError
from pqd.qoptions import quant_options
from pqd.stages.common import Student

if TYPE_CHECKING:  # annotations only: the stage registry imports this module, pqd.config imports the registry
    from pqd.config import DistillConfig, QuantizeConfig, RunConfig, StructuredConfig, TrainConfig
    from pqd.data import Splits
    from pqd.stages.registry import StageContext
    from pqd.structured.latency_model import Target

log = logging.getLogger("pqd.structured")


def _with_record(student: Student, model: nn.Module, key: str, record: dict[str, Any]) -> Student:
    return Student(model, {}, student.form, student.freeze_fraction, records={**student.records, key: record})


def deployment_target(cfg: StructuredConfig, quantize_config: QuantizeConfig | None = None) -> Target:
    """The :class:`~pqd.structured.latency_model.Target` of a ``structured`` config section, quantized
    as ``quantize_config`` (:class:`pqd.config.QuantizeConfig`; default: pqd's defaults) says."""
    from pqd.structured.latency_model import Target

    target = Target(cfg.runtime, cfg.batch, cfg.threads)
    if quantize_config is None:
        return target
    return replace(target, reduce_range=quantize_config.reduce_range, options=quant_options(quantize_config),
                   leaf_modules=tuple(quantize_config.leaf_modules))


def structured_prune(student: Student, cfg: StructuredConfig, *, data: Splits, epochs: int, train_config: TrainConfig,
                     checkpoint: Path | None = None, seed: int = 0, augment: bool = True, device: torch.device | None = None,
                     teacher: nn.Module | None = None, distill_config: DistillConfig | None = None,
                     quantize_config: QuantizeConfig | None = None) -> tuple[Student, dict[str, Any]]:
    """Search widths under ``cfg``'s budget, prune, fine-tune; returns (new student, search record).

    ``quantize_config`` (:class:`pqd.config.QuantizeConfig`): how the later quantize stage will
    quantize the model (leaf modules, weight options, activation range); the latency model
    measures INT8 models quantized the same way (default: pqd's defaults)."""
    data = require_splits(data, where="structured_prune(..., data=)")
    from pqd.structured.graph import ORDER_HINT, ChannelGraph, check_prunable, prune_to_widths
    from pqd.structured.importance import group_scores
    from pqd.structured.latency_model import build
    from pqd.structured.search import search
    from pqd.train.loop import train

    if student.quantized:
        raise ModelError(f"the student is already quantized ({student.form}): {ORDER_HINT}")
    if student.masks:
        raise ModelError("the student has unstructured pruning masks: structured pruning must come before prune, e.g. S:5,P:20,Q:40,D:40")
    check_prunable(student.model)
    model = copy.deepcopy(student.model).cpu().eval()
    input_shape = data.image_shape
    example = torch.zeros(2, *input_shape)
    graph = ChannelGraph(copy.deepcopy(model), example, tuple(cfg.ignore))
    scores = group_scores(graph, cfg.importance, data=data, seed=seed)
    state = Path(str(checkpoint) + ".structured.json") if checkpoint else None
    if state is not None and state.exists():
        record = json.loads(state.read_text())
        pruned = prune_to_widths(model, record["widths"], example=example, round_to=1, scores=scores, ignore=cfg.ignore)
        log.info("structured: resumed widths from %s", state)
    else:
        target = deployment_target(cfg, quantize_config)
        lm = build(model, graph, target=target, input_shape=input_shape, samples=cfg.samples, runs=cfg.runs,
                   round_to=cfg.round_to, cache_dir=cfg.cache_dir, seed=seed)
        sens = None
        if cfg.sensitivity:
            from pqd.structured.sensitivity import read_csv

            sens = read_csv(cfg.sensitivity)
        dense_ms = lm.dense_ms(graph)
        recipes = rank = ranked_on = None
        if cfg.select == "adapted_bn":
            from pqd.structured.search import cost_function
            from pqd.structured.select import stage_ranker, width_recipes

            recipes = width_recipes(graph, scores, cost=cost_function(graph, scores, sens), round_to=cfg.round_to, min_keep=cfg.min_keep)
            rank, ranked_on = stage_ranker(model, scores, data, example=example, calib_images=cfg.select_images, seed=seed,
                                           ignore=cfg.ignore)
        pruned, record = search(model, lm, graph, target=target, input_shape=input_shape, budget_ms=cfg.budget_ms,
                                budget_fraction=cfg.budget_fraction, dense_ms=dense_ms, size_budget_mb=cfg.size_budget_mb,
                                scores=scores, sensitivity=sens, round_to=cfg.round_to, min_keep=cfg.min_keep,
                                max_iters=cfg.max_iters, runs=cfg.runs, margin=cfg.margin, cache_dir=cfg.cache_dir,
                                recipes=recipes, rank=rank)
        record["importance"] = cfg.importance
        record["select"] = cfg.select
        if ranked_on:
            record["ranked_on"] = ranked_on
        if state is not None:
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text(json.dumps(record, indent=1))
    if not record.get("met", True):
        message = missed_budget_message(record)
        log.warning("%s", message)
        record["warnings"] = [message]
    if device is not None:
        pruned.to(device)
    if epochs > 0:
        loss_fn = None
        if cfg.distill and teacher is not None:
            from pqd.config import DistillConfig
            from pqd.stages.distill import kd_loss

            dc = distill_config or DistillConfig()
            teacher.eval()

            def loss_fn(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    t = teacher(x).float()
                return kd_loss(logits, t, y, temperature=dc.temperature, alpha=dc.alpha)

        train(pruned, data, epochs=epochs, lr=cfg.lr, config=train_config, loss_fn=loss_fn, checkpoint=checkpoint, seed=seed,
              tag="structured", amp=True, augment=augment)
    pruned.eval()
    return Student(pruned, {}, student.form, student.freeze_fraction), record


def missed_budget_message(record: dict[str, Any]) -> str:
    """What a search record that missed its budget says: both numbers of the same timing run, why, and what was kept."""
    dense, budget = record["dense_ms_same_run"], record["budget_ms_same_run"]
    why = record.get("missed_because") or "no measured model met the budget"
    return (f"structured: budget missed: the kept model measured {record['measured_ms']:.3f} ms against a budget of "
            f"{budget:.3f} ms (dense {dense:.3f} ms in the same timing run, {record['measured_ms'] / dense:.2f}x dense); "
            f"{why}. Kept the fastest measured model (iteration {record['chosen_iteration']}); raise the budget, or lower "
            "structured.min_keep / structured.round_to")


class StructuredStage:
    """Stage-registry adapter (``S`` in a stage string)."""

    name = "structured"
    letter = "S"
    section = "structured"
    quantizes = False
    structural = True

    def preflight(self, model: nn.Module, config: RunConfig, example: torch.Tensor) -> None:
        """The target runtime loads and runs the model's INT8 form (raises ModelError otherwise)."""
        from pqd.structured.latency_model import check_runtime

        check_runtime(copy.deepcopy(model).cpu().eval(), target=deployment_target(config.structured, config.quantize),
                      input_shape=tuple(example.shape[1:]))

    def run(self, student: Student, ctx: StageContext, *, epochs: int, checkpoint: Path | None, index: int) -> Student:
        out, record = structured_prune(student, ctx.config.structured, data=ctx.data, epochs=epochs, train_config=ctx.train_config,
                                       checkpoint=checkpoint, seed=ctx.seed, augment=ctx.augment, device=ctx.device,
                                       teacher=ctx.teacher, distill_config=ctx.config.distill,
                                       quantize_config=ctx.config.quantize)
        return _with_record(student, out.model, f"{index + 1}_{self.name}", record)


STAGE = StructuredStage()
