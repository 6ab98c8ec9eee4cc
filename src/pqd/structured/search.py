"""Per-group channel counts under a latency budget, with the hardware in the loop.

1. The budget (:class:`Budget`): ``ms``, or ``fraction`` × the dense model's INT8 latency
   measured on the target (runtime, batch, threads); optionally ``size_mb`` for the
   INT8 weights (1 byte per weight). How widths are ranked is a :class:`Selection`; the search's
   knobs (rounding, iterations, timed calls) are :class:`SearchOptions`.
2. Propose (:func:`propose`): greedy choice on the fitted latency model (:mod:`pqd.structured.latency_model`): from
   full width, repeatedly take one ``round_to`` step off the group whose step costs the least
   per millisecond saved — cost = lost importance (sum of the dropped channels'
   mean-normalised scores, divided by the model's channel count), or, given a sensitivity
   table, the predicted accuracy drop interpolated from it — until the prediction meets the
   (corrected) target. Or, given ``recipes`` and ``rank`` (:mod:`pqd.structured.select`),
   every recipe proposes widths for the first target, ``rank`` scores them, and the winning
   recipe makes the widths from then on.
3. Measure (:func:`measure_widths`): the chosen model is built and **measured** side by side with the dense and floor models
   in one interleaved run; a fractional budget is checked against that run's dense reading,
   so drift of the machine between runs does not decide (an absolute budget is checked in
   ms). The measurements join the latency model's samples (with the run's dense and floor
   readings) and the fit is redone. Next target (:func:`next_target`): if the model misses the goal (the budget less
   ``margin``), the target is tightened by the miss; if it lands more than ``UNDERSHOOT``
   under the goal, the target is loosened toward it; :func:`search` repeats the steps, up to ``max_iters``
   times, and the measured model nearest under the goal is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pqd.compress.channels.graph import MIN_KEEP, ROUND_TO, ChannelGraph, prune_to_widths, round_width
from pqd.errors import ConfigError, ModelError
from pqd.structured.latency_model import LatencyModel, Target, measure_int8, reference_models, report, save

log = logging.getLogger("pqd.structured")


def _interp(points: Sequence[tuple[float, float]], r: float) -> float:
    """Piecewise-linear drop at keep ratio ``r`` from (ratio, drop) points; (1, 0) is implied."""
    pts = sorted(set(points) | {(1.0, 0.0)})
    if r <= pts[0][0]:
        (r0, d0), (r1, d1) = pts[0], pts[1] if len(pts) > 1 else (1.0, 0.0)
        slope = (d1 - d0) / (r1 - r0) if r1 != r0 else 0.0
        return d0 + (r - r0) * slope
    for (r0, d0), (r1, d1) in zip(pts, pts[1:], strict=False):
        if r0 <= r <= r1:
            return d0 + (d1 - d0) * (r - r0) / (r1 - r0)
    return 0.0


def cost_function(
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor] | None,
    sensitivity: Sequence[dict] | None,
    *,
    per_group: bool = False,
):
    """``cost(group_id, k) -> float``: predicted loss of keeping ``k`` channels of a group.

    From ``scores``: the dropped channels' importance over the whole model's channel count; with
    ``per_group``, the share of the group's own importance dropped, averaged over the groups (every
    group weighs the same, whatever its channel count)."""
    chans = graph.widths()
    if sensitivity:
        table: dict[str, list[tuple[float, float]]] = {}
        for row in sensitivity:
            if row.get("kind") == "prune":
                table.setdefault(row["group"], []).append((float(row["keep_ratio"]), max(0.0, float(row["drop"]))))
        missing = [g for g in chans if g not in table]
        if missing:
            raise ModelError(
                f"the sensitivity table has no rows for group(s) {', '.join(missing[:5])}; re-run the analysis on this model"
            )
        return lambda g, k: _interp(table[g], k / chans[g])
    if scores is None:
        raise ModelError("search needs importance scores or a sensitivity table")
    total = sum(chans.values())
    sorted_scores = {g: torch.sort(s, descending=True).values for g, s in scores.items()}
    cums = {g: torch.cat([torch.zeros(1), torch.cumsum(s, 0)]) for g, s in sorted_scores.items()}
    full = {g: float(c[-1]) for g, c in cums.items()}
    if per_group:
        return lambda g, k: (1.0 - float(cums[g][k]) / max(full[g], 1e-12)) / len(cums)
    return lambda g, k: (full[g] - float(cums[g][k])) / total


def greedy_widths(
    graph: ChannelGraph,
    lm: LatencyModel,
    cost,
    target_ms: float,
    *,
    round_to: int = ROUND_TO,
    min_keep: float = MIN_KEEP,
    size_budget_params: int | None = None,
    start: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Greedy: cheapest step per predicted millisecond until the prediction is <= ``target_ms``."""
    chans = graph.widths()
    widths = dict(start or chans)
    floor = {g: round_width(max(1, math.ceil(min_keep * c)), c, round_to) for g, c in chans.items()}

    def params(w):
        return sum(r.cin // r.groups * r.cout * r.kernel for r in graph.layer_shapes(w))

    pred = lm.predict(graph, widths)
    while pred > target_ms or (size_budget_params is not None and params(widths) > size_budget_params):
        best, best_score, best_pred = None, math.inf, pred
        fallback, fallback_cost = None, math.inf  # when no step lowers the prediction: the cheapest step
        for g, k in widths.items():
            nk = max(k - round_to if k % round_to == 0 else (k // round_to) * round_to, floor[g])
            if nk >= k:
                continue
            trial = dict(widths)
            trial[g] = nk
            p = lm.predict(graph, trial)
            dc = cost(g, nk) - cost(g, k)
            saved = (
                pred - p if pred > target_ms else params(widths) - params(trial)
            )  # else only the size budget is left
            if saved > 1e-12 and dc / saved < best_score:
                best, best_score, best_pred = (g, nk), dc / saved, p
            if dc < fallback_cost:
                fallback, fallback_cost, fallback_pred = (g, nk), dc, p
        if best is None and fallback is not None:
            best, best_pred = fallback, fallback_pred
        if best is None:
            log.warning(
                "structured search: every group is at its floor (min_keep %.2f); predicted %.3f ms > target %.3f ms",
                min_keep,
                pred,
                target_ms,
            )
            break
        widths[best[0]] = best[1]
        pred = best_pred
    return widths


def refill_widths(
    graph: ChannelGraph, lm: LatencyModel, cost, start: Mapping[str, int], target_ms: float, *, round_to: int = ROUND_TO
) -> dict[str, int]:
    """The greedy run upwards: from ``start`` (e.g. uniform widths that leave part of the target unused,
    because latency rises in steps), add one ``round_to`` step at a time to the group where it restores the
    most importance per predicted millisecond added, while the prediction stays <= ``target_ms``. A step that
    adds no predicted time is taken first."""
    chans = graph.widths()
    widths = dict(start)
    pred = lm.predict(graph, widths)
    while True:
        best, best_gain, best_pred = None, -math.inf, pred
        for g, k in widths.items():
            nk = min(chans[g], (k // round_to + 1) * round_to)
            if nk <= k:
                continue
            trial = dict(widths)
            trial[g] = nk
            p = lm.predict(graph, trial)
            if p > target_ms:
                continue
            restored = cost(g, k) - cost(g, nk)
            gain = math.inf if p - pred <= 1e-12 else restored / (p - pred)
            if gain > best_gain:
                best, best_gain, best_pred = (g, nk), gain, p
        if best is None:
            return widths
        widths[best[0]] = best[1]
        pred = best_pred


#: A measured model more than this share under the search's goal is grown back toward it (while
#: iterations remain): a prediction made in another machine state can land far under the budget.
UNDERSHOOT = 0.15
#: Measure-and-correct rounds, and timed calls per model in each round (``structured.max_iters`` / ``runs``).
MAX_ITERS = 4
RUNS = 100


@dataclass
class Choice:
    """The recipe ranked best at the search's first target (``recipes`` mode), kept for every later step."""

    recipe: str | None = None
    candidates: list[dict] | None = None
    test: dict | None = None


def propose(
    lm: LatencyModel,
    graph: ChannelGraph,
    target_ms: float,
    *,
    cost,
    round_to: int,
    min_keep: float,
    size_params: int | None,
    recipes: Mapping[str, Callable] | None,
    rank,
    choice: Choice,
) -> dict[str, int]:
    """Propose step: the widths for ``target_ms``. The greedy on ``cost`` without recipes; with them,
    every recipe proposes at the first target, ``rank`` scores them and :func:`choose` picks one
    (recorded in ``choice``), whose recipe alone proposes after that."""
    if recipes is None:
        return greedy_widths(
            graph, lm, cost, target_ms, round_to=round_to, min_keep=min_keep, size_budget_params=size_params
        )
    if choice.recipe is None and len(recipes) == 1:  # one recipe: nothing to rank
        choice.recipe = next(iter(recipes))
    if choice.recipe is not None:
        return recipes[choice.recipe](lm, target_ms)
    proposals = {name: recipe(lm, target_ms) for name, recipe in recipes.items()}
    unique: dict[tuple, str] = {}
    for name, w in proposals.items():
        unique.setdefault(tuple(sorted(w.items())), name)
    scored = dict(rank({name: proposals[name] for name in unique.values()}))
    correct = {name: scored[unique[tuple(sorted(w.items()))]] for name, w in proposals.items()}
    choice.recipe, choice.test = choose(correct)
    choice.candidates = [
        {
            "recipe": name,
            "score": float(correct[name].float().mean()),
            "predicted_ms": lm.predict(graph, w),
            "macs": sum(r.macs for r in graph.layer_shapes(w)),
            "widths": dict(w),
        }
        for name, w in proposals.items()
    ]
    test = choice.test
    log.info(
        "structured search: recipes ranked %s; chose %s%s",
        ", ".join(f"{c['recipe']} {c['score']:.3f}" for c in choice.candidates),
        choice.recipe,
        f" (best {test['best']} vs {test['vs']}: p = {test['p_value']:.3g})" if test else "",
    )
    return proposals[choice.recipe]


def measure_widths(
    model: nn.Module,
    lm: LatencyModel,
    graph: ChannelGraph,
    widths: Mapping[str, int],
    refs: Mapping[str, nn.Module],
    *,
    target: Target,
    input_shape: Sequence[int],
    budget: Budget,
    budget_ms: float,
    options: SearchOptions,
    floor_round_to: int,
    scores,
    iteration: int,
    target_ms: float,
) -> tuple[nn.Module, dict]:
    """Measure step: prune ``model`` to ``widths`` and time it beside the dense and floor models in one
    interleaved run; the readings join the latency model's samples. ``budget_ms``: the budget resolved
    against the dense reading the search started from. Returns (pruned model, iteration record)."""
    example = torch.zeros(2, *input_shape)
    pred = lm.predict(graph, widths)
    pruned = prune_to_widths(model, widths, example=example, round_to=1, scores=scores)
    # the dense and floor models are timed in the same interleaved run: a fraction is checked against that
    # dense reading (a ratio measured side by side survives machine drift between runs; absolute ms do not),
    # and both anchor the latency model's sample (pqd.structured.latency_model)
    ms = measure_int8(
        {"chosen": pruned} | dict(refs),
        target=target,
        input_shape=input_shape,
        runs=options.runs,
        in_process=options.in_process,
    )
    measured, run_dense, run_floor = ms["chosen"], ms["dense"], ms.get("floor")
    run_budget = budget_ms if budget.fraction is None else budget.fraction * run_dense
    pred_run = lm.predict_in_run(graph, widths, dense_ms=run_dense, floor_ms=run_floor)
    lm.add(
        graph.widths(), run_dense, "search_dense", dense_ms=run_dense, floor_ms=run_floor, floor_round_to=floor_round_to
    )
    goal = run_budget * (1 - budget.margin)
    record = {
        "iteration": iteration,
        "target_ms": target_ms,
        "predicted_ms": pred,
        "measured_ms": measured,
        "dense_ms_same_run": run_dense,
        "budget_ms_same_run": run_budget,
        "met": measured <= run_budget,
        "goal_ms_same_run": goal,
        "floor_ms_same_run": run_floor,
        "predicted_ms_same_run": pred_run,
        "prediction_error_same_run": pred_run / measured - 1,
        "widths": dict(widths),
        "prediction_error": pred / measured - 1,
    }
    log.info(
        "structured search %d: target %.3f ms, predicted %.3f ms, measured %.3f ms (budget %.3f ms, dense %.3f ms in the same run)",
        iteration,
        target_ms,
        pred,
        measured,
        run_budget,
        run_dense,
    )
    lm.add(widths, measured, "search", dense_ms=run_dense, floor_ms=run_floor, floor_round_to=floor_round_to)
    return pruned, record


def next_target(record: Mapping[str, Any], target_ms: float) -> tuple[float, str | None]:
    """Next-target step after a measurement: (next target, None) to go on, or (target, why) to stop
    ('' when the model landed within ``UNDERSHOOT`` under its goal). Too slow: tighten by the miss plus
    2%; far under the goal (a prediction made in another machine state, or the widths step): loosen toward it."""
    measured, goal = record["measured_ms"], record["goal_ms_same_run"]
    if goal * (1 - UNDERSHOOT) <= measured <= goal:
        return target_ms, ""
    if (
        measured > goal and record["predicted_ms"] > target_ms
    ):  # every group is at its floor: tightening cannot change the widths
        return (
            target_ms,
            "every group at its floor (min_keep / round_to); the budget is below what channel pruning reaches",
        )
    return target_ms * goal / measured * 0.98, None


@dataclass(frozen=True)
class Budget:
    """What the chosen model must meet: ``ms``, or ``fraction`` × the dense model's INT8 latency measured
    on the target in the same run (exactly one); optionally ``size_mb`` of INT8 weights (1 byte per
    weight). ``margin``: keep correcting until the measured latency is at most ``(1 - margin)`` × the
    budget, so a model that meets its budget in one run still meets it in the next, whose measurement
    differs by the harness's run-to-run spread (docs/STRUCTURED.md, "Budgets and predictions, measured");
    ``met`` in the record is against the budget itself."""

    ms: float | None = None
    fraction: float | None = None
    size_mb: float | None = None
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 0.5:
            raise ConfigError(f"structured.margin: {self.margin} must be in [0, 0.5)")
        if (self.ms is None) == (self.fraction is None):
            raise ConfigError("structured: give exactly one of budget_ms and budget_fraction")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"structured.budget_fraction: {self.fraction} must be in (0, 1]")


@dataclass(frozen=True)
class Selection:
    """How widths are ranked. Without ``recipes``, the greedy on a cost from ``scores`` (per-channel
    importance) or ``sensitivity`` (a ``pqd analyze`` table). ``recipes`` (``{name: recipe(lm, target_ms)
    -> widths}``, e.g. :func:`pqd.structured.select.width_recipes`) with ``rank`` (``{name: widths} ->
    {name: per-image correctness}``, e.g. :func:`pqd.structured.select.adapted_bn_ranker`): at the first
    target every recipe proposes widths, ``rank`` scores them, :func:`choose` picks one (uniform unless
    another is better beyond noise), and that recipe alone makes the widths of every later correction; the
    record lists the candidates with their scores. A single recipe needs no ``rank`` (uniform scaling alone).
    ``scores`` also decide which channels of a group are kept."""

    scores: Mapping[str, torch.Tensor] | None = None
    sensitivity: Sequence[dict] | None = None
    recipes: Mapping[str, Callable] | None = None
    rank: Callable[[Mapping[str, dict]], Mapping[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.recipes is None and self.rank is not None:
            raise ConfigError("structured search: rank needs recipes")
        if self.recipes is not None and self.rank is None and len(self.recipes) != 1:
            raise ConfigError("structured search: several recipes need rank to choose among them")


@dataclass(frozen=True)
class SearchOptions:
    """The search's knobs: channel counts are multiples of ``round_to`` and a group keeps at least
    ``min_keep`` of its channels; up to ``max_iters`` measure-and-correct rounds of ``runs`` timed calls
    per model (``in_process``: time in this process, for tests); the latency model is saved to
    ``cache_dir`` unless ``use_cache`` is false."""

    round_to: int = ROUND_TO
    min_keep: float = MIN_KEEP
    max_iters: int = MAX_ITERS
    runs: int = RUNS
    in_process: bool = False
    cache_dir: str | None = None
    use_cache: bool = True


def search(
    model: nn.Module,
    lm: LatencyModel,
    graph: ChannelGraph,
    *,
    target: Target,
    input_shape: Sequence[int],
    budget: Budget,
    dense_ms: float | None = None,
    selection: Selection = Selection(),
    options: SearchOptions = SearchOptions(),
) -> tuple[nn.Module, dict]:
    """Choose widths under ``budget``, measure, correct; returns (pruned model, JSON-able record).

    The steps are :func:`propose`, :func:`measure_widths` and :func:`next_target`. A model measured more
    than ``UNDERSHOOT`` under the goal is grown back toward it while iterations remain; the measured
    model nearest under the goal is returned (``chosen_iteration``), else the last one. Every run times
    the dense and floor models beside the chosen one (:func:`pqd.structured.latency_model.reference_models`).
    ``dense_ms``: the dense model's INT8 latency when the caller has it (else it is measured).
    """
    if selection.recipes is not None and budget.size_mb is not None:
        raise ConfigError(
            "structured.select 'adapted_bn' / 'uniform' does not take a size budget yet; use select 'greedy' with size_budget_mb"
        )
    example = torch.zeros(2, *input_shape)
    # the floor model the latency model's samples were anchored to (the search's rounding, for a model without samples)
    floor_rt = next((int(s["floor_round_to"]) for s in lm.samples if "floor_round_to" in s), options.round_to)
    refs = reference_models(model, graph, example=example, round_to=floor_rt)
    if budget.fraction is not None and dense_ms is None:
        ms = measure_int8(
            refs, target=target, input_shape=input_shape, runs=options.runs, in_process=options.in_process
        )
        dense_ms = ms["dense"]
        lm.add(graph.widths(), dense_ms, "dense", dense_ms=dense_ms, floor_ms=ms.get("floor"), floor_round_to=floor_rt)
        lm.fit(graph)
    if budget.fraction is None:
        assert budget.ms is not None  # Budget holds exactly one of the two
        budget_ms = budget.ms
    else:
        assert dense_ms is not None  # measured above when the caller had none
        budget_ms = budget.fraction * dense_ms
    size_params = None if budget.size_mb is None else int(budget.size_mb * 1e6)  # INT8: one byte per weight
    cost = cost_function(graph, selection.scores, selection.sensitivity)
    target_ms = budget_ms * (1 - budget.margin)
    iterations: list[dict[str, Any]] = []
    chans = graph.widths()
    choice = Choice()
    best, pruned_by_iteration = None, []
    for it in range(options.max_iters):
        lm.fit(graph)
        widths = propose(
            lm,
            graph,
            target_ms,
            cost=cost,
            round_to=options.round_to,
            min_keep=options.min_keep,
            size_params=size_params,
            recipes=selection.recipes,
            rank=selection.rank,
            choice=choice,
        )
        seen = next((i for i in iterations if i["widths"] == widths), None)
        if seen is not None:  # widths step: the corrected target gives widths already measured
            if seen["measured_ms"] <= seen["goal_ms_same_run"]:  # loosening came back to a model that met the goal
                iterations[-1]["stopped"] = "the loosened target gives widths already measured"
                break
            # it missed: tighten below these widths' own prediction, so the next widths are new, without measuring again
            target_ms = min(
                target_ms * seen["goal_ms_same_run"] / seen["measured_ms"] * 0.98, lm.predict(graph, widths) * 0.99
            )
            continue
        pruned, record = measure_widths(
            model,
            lm,
            graph,
            widths,
            refs,
            target=target,
            input_shape=input_shape,
            budget=budget,
            budget_ms=budget_ms,
            options=options,
            floor_round_to=floor_rt,
            scores=selection.scores,
            iteration=it,
            target_ms=target_ms,
        )
        pruned_by_iteration.append(pruned)
        iterations.append(record)
        measured, goal = record["measured_ms"], record["goal_ms_same_run"]
        if measured <= goal and (best is None or measured / goal > best[0]):
            best = (measured / goal, len(iterations) - 1)
        target_ms, stopped = next_target(record, target_ms)
        if stopped is not None:
            if stopped:
                record["stopped"] = stopped
            break
    if options.use_cache:
        save(lm, options.cache_dir)
    # the measured model nearest under the goal; when none met it, the fastest relative to dense in its own run
    pick = (
        best[1]
        if best is not None
        else min(
            range(len(iterations)), key=lambda i: iterations[i]["measured_ms"] / iterations[i]["dense_ms_same_run"]
        )
    )
    pruned, widths, last = pruned_by_iteration[pick], iterations[pick]["widths"], iterations[pick]
    record = {
        "target": {"runtime": target.runtime, "batch": target.batch, "threads": target.threads},
        "budget_ms": budget_ms,
        "budget_fraction": budget.fraction,
        "dense_ms": dense_ms,
        "size_budget_mb": budget.size_mb,
        "margin": budget.margin,
        "met": last["met"],
        "budget_ms_same_run": last["budget_ms_same_run"],
        "dense_ms_same_run": last["dense_ms_same_run"],
        "predicted_ms": last["predicted_ms"],
        "measured_ms": last["measured_ms"],
        "prediction_error": last["prediction_error"],
        "predicted_ms_same_run": last["predicted_ms_same_run"],
        "prediction_error_same_run": last["prediction_error_same_run"],
        "iterations": iterations,
        "chosen_iteration": pick,
        "widths": dict(widths),
        "dense_widths": chans,
        "keep_ratio": {g: widths[g] / chans[g] for g in chans},
        "macs": sum(r.macs for r in graph.layer_shapes(widths)),
        "dense_macs": sum(r.macs for r in graph.layers),
        "round_to": options.round_to,
        "criterion": "sensitivity" if selection.sensitivity else "importance",
        "recipe": choice.recipe,
        "candidates": choice.candidates,
        "choice_test": choice.test if selection.recipes is not None else None,
        "latency_model": report(lm, graph),
    }
    if not last["met"]:
        record["missed_because"] = (
            iterations[-1].get("stopped")
            or f"structured.max_iters ({options.max_iters}) iterations ran out before a measured model met the budget"
        )
    return pruned, record


def choose(
    correct: Mapping[str, torch.Tensor], *, prefer: str | None = "uniform", alpha: float = 0.05
) -> tuple[str, dict]:
    """The candidate with the most images right; but ``prefer`` (uniform scaling) unless the best beats it
    on these images by McNemar's paired test at ``alpha``: a proxy difference inside its own noise
    decides nothing, and then the simplest recipe is kept. Ties go to the one listed first.
    Returns (name, test record of best vs ``prefer``, empty when there was nothing to test)."""
    from pqd.measure.stats import mcnemar_paired

    acc = {n: float(c.float().mean()) for n, c in correct.items()}
    best = next(n for n in correct if math.isclose(acc[n], max(acc.values()), abs_tol=1e-12))
    if prefer is None or prefer not in correct or best == prefer:
        return best, {}
    test = mcnemar_paired(correct[best], correct[prefer])
    rec = {"best": best, "vs": prefer, "p_value": test["p_value"], "difference": test["difference"], "alpha": alpha}
    return (best if test["p_value"] < alpha and test["difference"] > 0 else prefer), rec
