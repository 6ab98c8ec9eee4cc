"""The tune ladder's stop rules and choice, on scripted outcomes (no training, no timing)."""

from __future__ import annotations

import pytest

from pqd.commands.tune.config import TuneConfig, split_tune_dict
from pqd.commands.tune.ladder import (
    Candidate,
    Measured,
    Outcome,
    choose,
    fallback_counts,
    looks_memorised,
    passes,
    plan,
    split_epochs,
)
from pqd.errors import ConfigError


def drive(tune: TuneConfig, verdict, *, budget: int = 100, cand_epochs: int = 3, parallel=False, cap=None, size=4.0):
    """Run the ladder to its end with ``verdict(candidate) -> passed``; returns (ran candidates, stop note)."""
    done: list[tuple[Candidate, Outcome]] = []
    for _ in range(50):
        step = plan(tune, done, candidate_epochs=cand_epochs, budget_epochs=budget, latency_cap=cap, parallel=parallel)
        if not step.candidates:
            return [c for c, _ in done], step.note
        for c in step.candidates:
            ok = verdict(c)
            done.append((c, Outcome(ok=True, passed=ok, drop=0.5 if ok else 2.0, size_mb=size)))
    raise AssertionError("the ladder did not stop")


def names(cands):
    return [c.name for c in cands]


def test_ptq_passing_goes_straight_to_structured_and_bisects_to_the_threshold():
    tune = TuneConfig(fractions=(0.75, 0.5, 0.35), min_step=0.05, max_structured=10)
    threshold = 0.58  # fractions at or above pass

    def verdict(c):
        return c.rung == "ptq" or (c.fraction is not None and c.fraction >= threshold)

    ran, note = drive(tune, verdict)
    assert names(ran)[:3] == ["ptq", "s0.75", "s0.5"]  # no fallback, no QAT: PTQ passed
    fr = [c.fraction for c in ran if c.rung == "structured"]
    assert fr[2] == pytest.approx(0.625)  # bisection between 0.75-> ... 0.625 passes
    passing = min(f for f in fr if f >= threshold)
    failing = max(f for f in fr if f < threshold)
    assert passing - failing <= 0.05 + 1e-9
    assert "converged" in note
    assert "s0.35" not in names(ran)  # below a failing fraction: never tried


def test_failed_ptq_tries_fp32_fallback_then_stops_at_the_first_pass():
    tune = TuneConfig(fallback_layers=4, fractions=(0.5,), max_structured=1)
    ran, _ = drive(tune, lambda c: c.fallback >= 2 or c.rung == "structured")
    assert names(ran) == ["ptq", "ptq_fp32x1", "ptq_fp32x2", "s0.5"]
    assert [c.fallback for c in ran[:3]] == [0, 1, 2]
    assert all(c.epochs == 0 for c in ran[:3])


def test_fallback_counts_double_up_to_the_limit():
    assert fallback_counts(0) == []
    assert fallback_counts(1) == [1]
    assert fallback_counts(6) == [1, 2, 4, 6]


def test_no_dense_int8_within_tolerance_stops_before_channel_pruning():
    tune = TuneConfig(fallback_layers=1)
    ran, note = drive(tune, lambda c: False)
    assert names(ran) == ["ptq", "ptq_fp32x1", "qat_kd"]
    assert "no dense INT8 model" in note


def test_qat_rescues_a_failed_ptq_and_structured_follows():
    tune = TuneConfig(fallback_layers=0, fractions=(0.75,), max_structured=1)
    ran, _ = drive(tune, lambda c: c.rung != "ptq")
    assert names(ran) == ["ptq", "qat_kd", "s0.75"]
    assert ran[1].stages.startswith("Q:") and ",D:" in ran[1].stages


def test_training_budget_stops_the_ladder_before_an_unaffordable_candidate():
    tune = TuneConfig(fractions=(0.75, 0.5, 0.35))
    ran, note = drive(tune, lambda c: True, budget=7, cand_epochs=3)
    assert names(ran) == ["ptq", "s0.75", "s0.5"]  # 3 + 3 epochs spent, 1 left < 3
    assert sum(c.epochs for c in ran) <= 7
    assert "budget" in note


def test_qat_is_not_started_when_the_budget_cannot_pay_for_it():
    tune = TuneConfig(fallback_layers=0)
    ran, note = drive(tune, lambda c: False, budget=1, cand_epochs=3)
    assert names(ran) == ["ptq"]
    assert "exceeds the training budget" in note


def test_every_probe_passing_keeps_cutting_by_a_third():
    tune = TuneConfig(fractions=(0.75, 0.5), max_structured=4)
    ran, _ = drive(tune, lambda c: True)
    fr = [c.fraction for c in ran if c.rung == "structured"]
    assert fr == pytest.approx([0.75, 0.5, 0.3333, 0.2222], abs=1e-4)


def test_parallel_executor_gets_every_probe_at_once():
    tune = TuneConfig(fractions=(0.75, 0.5, 0.35))
    done = [(Candidate("ptq", "ptq", "Q:0", 0), Outcome(ok=True, passed=True, drop=0.1, size_mb=1.0))]
    step = plan(tune, done, candidate_epochs=2, budget_epochs=100, parallel=True)
    assert [c.fraction for c in step.candidates] == [0.75, 0.5, 0.35]
    step = plan(tune, done, candidate_epochs=2, budget_epochs=6, parallel=True)
    assert [c.fraction for c in step.candidates] == [0.75, 0.5]  # what the budget pays for


def test_latency_budget_is_the_first_structured_probe():
    tune = TuneConfig(fractions=(0.75, 0.5, 0.35))
    ran, _ = drive(tune, lambda c: True, cap=0.6)
    fr = [c.fraction for c in ran if c.rung == "structured"]
    assert fr[:3] == [0.6, 0.5, 0.35]


def test_a_failed_run_counts_as_outside_the_tolerance():
    tune = TuneConfig(fractions=(0.75, 0.5), max_structured=5, min_step=0.2)
    done = [
        (Candidate("ptq", "ptq", "Q:0", 0), Outcome(ok=True, passed=True, drop=0.1, size_mb=1.0)),
        (Candidate("s0.75", "structured", "S:1,Q:1,D:1", 3, fraction=0.75), Outcome(ok=False, error="boom")),
    ]
    step = plan(tune, done, candidate_epochs=3, budget_epochs=100)
    assert [c.fraction for c in step.candidates] == [0.875]  # bisection between dense (1.0) and 0.75


def test_size_budget_adds_unstructured_pruning_of_the_fastest_passing_recipe():
    tune = TuneConfig(fractions=(0.5,), max_structured=1, size_budget_mb=1.0)
    ran, _ = drive(tune, lambda c: True, size=4.0)
    assert names(ran)[:2] == ["ptq", "s0.5"]
    sparse = ran[-1]
    assert sparse.rung == "unstructured" and sparse.base == "s0.5" and sparse.stages.startswith("S:")
    assert 0.8 <= (sparse.sparsity or 0) <= 0.95
    ran, _ = drive(tune, lambda c: True, size=0.5)  # already under the budget: no sparse candidate
    assert all(c.rung != "unstructured" for c in ran)


def test_split_epochs_keeps_every_stage_and_the_total():
    assert split_epochs(1, (0.4, 0.3, 0.3)) == [1, 1, 1]
    assert split_epochs(10, (0.4, 0.3, 0.3)) == [4, 3, 3]
    for total in range(3, 30):
        parts = split_epochs(total, (0.4, 0.3, 0.3))
        assert sum(parts) == total and min(parts) >= 1


def test_pass_rule_point_or_upper_bound():
    assert passes(0.8, 1.4, tolerance=1.0, rule="point")
    assert not passes(0.8, 1.4, tolerance=1.0, rule="upper")
    assert not passes(1.2, 1.4, tolerance=1.0, rule="point")


def m(name, passed, drop, ms, mb=1.0):
    return Measured(name, passed, drop, ms, mb)


def test_choose_the_fastest_within_tolerance_and_budgets():
    rows = [m("ptq", True, 0.1, 1.0), m("s0.75", True, 0.4, 0.7), m("s0.5", False, 1.5, 0.5)]
    c = choose(rows)
    assert (c.winner, c.met) == ("s0.75", True)
    assert c.verdicts["s0.5"].startswith("rejected") and "tolerance" in c.verdicts["s0.5"]
    c = choose(rows, latency_budget_ms=0.6)
    assert (c.winner, c.met) == ("s0.75", False)  # within the tolerance, over the latency budget
    assert "budget" in c.message
    c = choose(rows, size_budget_mb=2.0)
    assert c.winner == "s0.75"


def test_nothing_within_tolerance_still_hands_over_the_most_accurate_model():
    rows = [m("ptq", False, 3.0, 1.0), m("qat_kd", False, 1.8, 1.0)]
    c = choose(rows)
    assert c.winner == "qat_kd" and not c.met
    assert "no candidate is within the tolerance" in c.message


def test_tune_config_is_validated():
    with pytest.raises(ConfigError, match="largest down"):
        TuneConfig(fractions=(0.5, 0.75))
    with pytest.raises(ConfigError, match="not both"):
        TuneConfig(latency_budget_ms=1.0, latency_budget_fraction=0.5)
    with pytest.raises(ConfigError, match="tune.rule"):
        TuneConfig(rule="median")
    with pytest.raises(ConfigError, match="tune chooses the stages"):
        split_tune_dict({"stages": "P:1", "tune": {}})
    with pytest.raises(ConfigError, match="tune.max_dorp"):
        split_tune_dict({"tune": {"max_dorp": 1}})
    config, tune = split_tune_dict({"model": {"name": "resnet18"}, "tune": {"max_drop": 0.5, "relative": True}})
    assert config.stage_string() == "" and tune.max_drop_points(0.9) == pytest.approx(0.45)


def test_validation_images_seen_in_training_are_flagged():
    def rec(top1, half):
        return {"top1": top1, "ci_low": top1 - half, "ci_high": top1 + half}

    assert looks_memorised(rec(0.978, 0.004), rec(0.896, 0.006))  # the CIFAR-10 teacher's 97.8 vs 89.6
    assert not looks_memorised(rec(0.905, 0.008), rec(0.896, 0.006))  # intervals overlap: same distribution
    assert not looks_memorised(rec(0.60, 0.001), rec(0.59, 0.001))  # apart, but by less than 2 points


def test_a_budget_below_the_floor_model_stops_the_structured_rung():
    tune = TuneConfig(fractions=(0.75, 0.5), max_structured=5, min_step=0.01)
    ptq = (Candidate("ptq", "ptq", "Q:0", 0), Outcome(ok=True, passed=True, drop=0.1, size_mb=1.0))
    floor_hit = Outcome(ok=True, passed=False, drop=20.0, size_mb=0.5, floor_fraction=0.97)
    done = [ptq, (Candidate("s0.75", "structured", "S:1,Q:1,D:1", 3, fraction=0.75), floor_hit)]
    step = plan(tune, done, candidate_epochs=3, budget_epochs=100)
    assert step.candidates == () and "reaches only 0.97" in step.note  # bisection midpoint 0.875 is under the floor
    floor_hit = Outcome(ok=True, passed=False, drop=20.0, size_mb=0.5, floor_fraction=0.6)
    done = [ptq, (Candidate("s0.5", "structured", "S:1,Q:1,D:1", 3, fraction=0.5), floor_hit)]
    step = plan(tune, done, candidate_epochs=3, budget_epochs=100)
    assert [c.fraction for c in step.candidates] == [0.75]  # above the floor: still worth a candidate
