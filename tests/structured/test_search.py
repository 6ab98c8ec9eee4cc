from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from structured_user_models import Plain

from pqd.compress.channels.graph import ChannelGraph
from pqd.compress.channels.importance import group_scores
from pqd.errors import ConfigError, ModelError
from pqd.models.registry import create_model
from pqd.structured import latency_model as L
from pqd.structured.search import Budget, SearchOptions, Selection, cost_function, greedy_widths, search

X = torch.zeros(2, 3, 32, 32)


def _macs_model(graph):
    """A latency model that is exactly proportional to conv MACs (no measurement)."""
    lm = L.LatencyModel(key={}, pad=1)
    lm.coef = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    return lm


def test_greedy_meets_the_predicted_target_and_prunes_unimportant_groups_first():
    model = create_model("resnet18", num_classes=10, width=0.25).eval()
    graph = ChannelGraph(model, X)
    lm = _macs_model(graph)
    scores = {g: torch.ones(c) for g, c in graph.widths().items()}
    victim = graph.groups[3].id
    scores[victim] = torch.full_like(scores[victim], 1e-6)  # free to remove
    dense = lm.predict(graph, graph.widths())
    widths = greedy_widths(graph, lm, cost_function(graph, scores, None), 0.7 * dense, round_to=8, min_keep=0.1)
    assert lm.predict(graph, widths) <= 0.7 * dense
    assert widths[victim] == 8  # at its floor
    assert all(widths[g] % 8 == 0 or widths[g] == c for g, c in graph.widths().items())


def test_sensitivity_table_drives_the_choice():
    model = create_model("vgg16_bn", num_classes=10, width=0.25).eval()
    graph = ChannelGraph(model, X)
    lm = _macs_model(graph)
    rows = []
    for i, g in enumerate(graph.groups):
        for r in (0.25, 0.5, 0.75):
            rows.append({"kind": "prune", "group": g.id, "keep_ratio": r, "drop": (1 - r) * (10.0 if i == 0 else 0.01)})
    widths = greedy_widths(
        graph, lm, cost_function(graph, None, rows), 0.6 * lm.predict(graph, graph.widths()), round_to=8
    )
    first = graph.groups[0].id
    assert widths[first] == graph.widths()[first]  # the sensitive group is left whole
    with pytest.raises(ModelError, match="no rows for group"):
        cost_function(graph, None, rows[3:])


def test_size_budget():
    model = create_model("vgg16_bn", num_classes=10, width=0.25).eval()
    graph = ChannelGraph(model, X)
    lm = _macs_model(graph)
    scores = group_scores(graph, "l1")
    dense_params = sum(r.cin // r.groups * r.cout * r.kernel for r in graph.layers)
    widths = greedy_widths(
        graph, lm, cost_function(graph, scores, None), 1e9, round_to=4, size_budget_params=dense_params // 3
    )
    assert sum(r.cin // r.groups * r.cout * r.kernel for r in graph.layer_shapes(widths)) <= dense_params // 3


def test_search_meets_a_measured_budget(tmp_path):
    """Hardware in the loop on a tiny model: PyTorch INT8, timed in this process."""
    torch.manual_seed(0)
    model = Plain().eval()
    graph = ChannelGraph(model, X)
    target = L.Target("pytorch", 1, 1)
    lm = L.build(
        model, graph, target=target, input_shape=(3, 32, 32), samples=4, runs=20, cache_dir=tmp_path, in_process=True
    )
    assert len(lm.samples) == 4 and all(s["ms"] > 0 for s in lm.samples)
    assert lm.relative and all(
        s["dense_ms"] == lm.samples[0]["ms"] for s in lm.samples
    )  # the dense model is sample 0 of the run
    # the floor model (every group at 8 channels) was timed in the same run and anchors every sample
    assert lm.fit_kind == "anchored" and len({s["floor_ms"] for s in lm.samples}) == 1
    assert 0 < lm.samples[0]["floor_ms"] < lm.samples[0]["ms"]
    assert list(tmp_path.rglob("*.json")), "latency samples are cached"
    again = L.build(
        model, graph, target=target, input_shape=(3, 32, 32), samples=4, runs=20, cache_dir=tmp_path, in_process=True
    )
    assert again.samples == lm.samples  # read from the cache, not re-measured
    dense = lm.samples[0]["ms"]
    pruned, rec = search(
        model,
        lm,
        graph,
        target=target,
        input_shape=(3, 32, 32),
        dense_ms=dense,
        budget=Budget(fraction=0.6),
        selection=Selection(scores=group_scores(graph, "l1")),
        options=SearchOptions(runs=20, max_iters=4, cache_dir=tmp_path, in_process=True),
    )
    assert rec["budget_ms"] == pytest.approx(0.6 * dense)
    # met = measured <= 0.6 x the dense model timed side by side in the same run
    assert rec["met"] and rec["measured_ms"] <= rec["budget_ms_same_run"] == pytest.approx(
        0.6 * rec["dense_ms_same_run"]
    )
    assert pruned(X).shape == (2, 10)
    assert ChannelGraph(pruned, X).widths() == rec["widths"]
    assert rec["macs"] < rec["dense_macs"]
    json.dumps(rec)  # JSON-able, for student.records / metrics.json
    assert rec["latency_model"]["samples"] >= 5
    last = rec["iterations"][-1]  # the search's runs timed the floor model too; its prediction is checked in that run
    assert last["floor_ms_same_run"] > 0 and rec["prediction_error_same_run"] == pytest.approx(
        rec["predicted_ms_same_run"] / rec["measured_ms"] - 1
    )
    assert rec["latency_model"]["fit"] == "anchored"


def test_latency_relative_to_the_same_runs_dense_model_removes_drift_between_runs():
    """Two runs of the same widths on a machine whose speed differs by 30% between them: a fit in ms
    cannot explain both, a fit of the ratio to each run's dense reading can (exactly, here)."""
    model = create_model("resnet18", num_classes=10, width=0.25).eval()
    graph = ChannelGraph(model, X)
    from pqd.compress.channels.importance import uniform_widths

    def true_ms(w):  # MACs plus a constant
        return 0.2 + sum(r.macs for r in graph.layer_shapes(w)) / 1e6

    chans = graph.widths()
    ratios = (1.0, 0.8, 0.6, 0.45, 0.3)
    lm = L.LatencyModel(key={}, pad=1)
    for speed, run in (
        (1.0, ratios[::2]),
        (1.3, ratios[1::2]),
    ):  # each run times its own dense model beside its samples
        dense = speed * true_ms(chans)
        for r in run:
            w = uniform_widths(chans, r, round_to=8)
            lm.add(w, speed * true_ms(w), "run", dense_ms=dense)
        lm.add(chans, dense, "run_dense", dense_ms=dense)
    assert lm.relative
    lm.fit(graph)
    assert (
        lm.scale
        == lm.dense_ms(graph)
        == pytest.approx(np.median([true_ms(chans), true_ms(chans), 1.3 * true_ms(chans)]))
    )
    w = uniform_widths(chans, 0.7, round_to=8)
    assert lm.predict(graph, w) / lm.predict(graph, chans) == pytest.approx(true_ms(w) / true_ms(chans), rel=1e-6)
    assert max(map(abs, lm.loo_errors(graph))) < 1e-3
    absolute = L.LatencyModel(
        key={}, samples=[{k: v for k, v in s.items() if k != "dense_ms"} for s in lm.samples], pad=1
    )
    assert not absolute.relative
    assert max(map(abs, absolute.loo_errors(graph))) > 0.05  # the drift lands in the fit's error
    lm.add(w, 1.0, "old cache entry")  # one sample without a same-run dense reading: fitted in ms, as before
    assert not lm.relative and lm.fit(graph).scale == 1.0


def test_latency_anchored_to_dense_and_floor_readings_removes_a_per_run_fixed_cost():
    """Runs in two machine states: a slow one adds a fixed time per call (per layer, the same for every width
    of one architecture) and a 10% slower speed. A ratio to dense alone cannot explain both states; the fraction
    of the way from the floor model's reading to the dense model's can (exactly, here), and a prediction made
    in a run's own readings matches that run."""
    model = create_model("resnet18", num_classes=10, width=0.25).eval()
    graph = ChannelGraph(model, X)
    from pqd.compress.channels.importance import uniform_widths

    def true_ms(w, speed, fixed):
        return fixed + speed * (0.2 + sum(r.macs for r in graph.layer_shapes(w)) / 1e6)

    chans, floor = graph.widths(), L.floor_widths(graph, 8)
    ratios = (0.9, 0.8, 0.6, 0.45, 0.3, 0.2)
    lm = L.LatencyModel(key={}, pad=1)
    states = ((1.0, 0.0), (1.1, 0.5))
    for (speed, fixed), run in zip(states, (ratios[::2], ratios[1::2]), strict=True):
        dense, fl = true_ms(chans, speed, fixed), true_ms(floor, speed, fixed)
        for r in run:
            w = uniform_widths(chans, r, round_to=8)
            lm.add(w, true_ms(w, speed, fixed), "run", dense_ms=dense, floor_ms=fl)
        lm.add(chans, dense, "run_dense", dense_ms=dense, floor_ms=fl)
    assert lm.fit_kind == "anchored"
    assert max(map(abs, lm.loo_errors(graph))) < 1e-3
    w = uniform_widths(chans, 0.7, round_to=8)
    for speed, fixed in states:
        got = lm.predict_in_run(graph, w, dense_ms=true_ms(chans, speed, fixed), floor_ms=true_ms(floor, speed, fixed))
        assert got == pytest.approx(true_ms(w, speed, fixed), rel=1e-6)
    rel = L.LatencyModel(key={}, samples=[{k: v for k, v in s.items() if k != "floor_ms"} for s in lm.samples], pad=1)
    assert rel.fit_kind == "relative"
    assert max(map(abs, rel.loo_errors(graph))) > 0.02  # the fixed cost lands in the ratio fit's error
    lm.add(
        w, 1.0, "cached before the floor was timed", dense_ms=1.5
    )  # one sample without a floor reading: relative fit
    assert lm.fit_kind == "relative"


def test_budget_arguments_are_checked():
    model = create_model("resnet18", num_classes=10, width=0.125).eval()
    graph = ChannelGraph(model, X)
    with pytest.raises(ConfigError, match="exactly one"):
        search(
            model,
            _macs_model(graph),
            graph,
            target=L.Target("pytorch"),
            input_shape=(3, 32, 32),
            budget=Budget(ms=1.0, fraction=0.5),
        )
    with pytest.raises(ConfigError, match="runtime"):
        L.Target("tensorrt")


def test_margin_keeps_correcting_until_the_measured_latency_leaves_room(monkeypatch):
    """A deterministic stand-in stopwatch (1.2 x MACs): without a margin the search stops at the
    first measurement under the budget; with margin m it corrects until the measured latency is
    at most (1 - m) x the budget."""
    import pqd.structured.search as S

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=0.25).eval()
    graph = ChannelGraph(model, X)

    def stopwatch(models, **kw):  # ms = 1.2 x MACs in millions, deterministic
        return {k: 1.2 * sum(r.macs for r in ChannelGraph(m, X).layers) / 1e6 for k, m in models.items()}

    monkeypatch.setattr(S, "measure_int8", stopwatch)
    scores = group_scores(graph, "l1")
    dense = stopwatch({"d": model})["d"]
    kw = dict(
        target=L.Target("pytorch", 1, 1),
        input_shape=(3, 32, 32),
        dense_ms=dense,
        selection=Selection(scores=scores),
        options=SearchOptions(max_iters=6, use_cache=False),
    )
    from pqd.compress.channels.graph import prune_to_widths
    from pqd.compress.channels.importance import uniform_widths

    def lm():
        m = _macs_model(graph)
        m.key = {"runtime": "pytorch", "batch": 1, "threads": 1}
        for ratio in (1.0, 0.5):
            w = uniform_widths(graph.widths(), ratio, round_to=4)
            m.add(w, stopwatch({"m": prune_to_widths(model, w, example=X, round_to=1, scores=scores)})["m"], "sample")
        return m

    _, plain = search(model, lm(), graph, budget=Budget(fraction=0.6), **kw)
    # a margin the plain result does not leave: the search has to go further
    margin = round(1 - plain["measured_ms"] / plain["budget_ms_same_run"] + 0.05, 3)
    assert 0 < margin < 0.5
    _, roomy = search(model, lm(), graph, budget=Budget(fraction=0.6, margin=margin), **kw)
    for rec in (plain, roomy):
        assert rec["met"] and rec["measured_ms"] <= rec["budget_ms_same_run"] == pytest.approx(0.6 * dense)
    assert plain["margin"] == 0.0 and roomy["margin"] == margin
    assert roomy["measured_ms"] <= (1 - margin) * roomy["budget_ms_same_run"] < plain["measured_ms"]
    # it went on only while the measurement was over the goal, or far under it (then it grows the model back)
    assert all(
        not (1 - S.UNDERSHOOT) * it["goal_ms_same_run"] <= it["measured_ms"] <= it["goal_ms_same_run"]
        for it in roomy["iterations"][:-1]
    )
    with pytest.raises(ConfigError, match="margin"):
        search(model, _macs_model(graph), graph, budget=Budget(fraction=0.6, margin=0.5), **kw)


def test_search_grows_a_model_measured_far_under_its_goal(monkeypatch):
    """The latency model was calibrated in a machine state twice as slow as the one the search measures
    in (a deterministic stand-in stopwatch): the first model lands far under the budget, and the search
    loosens its target toward the budget and keeps the measured model nearest under it."""
    import pqd.structured.search as S
    from pqd.compress.channels.graph import prune_to_widths

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=0.25).eval()
    graph = ChannelGraph(model, X)

    def stopwatch(models, **kw):
        return {k: 1.2 * sum(r.macs for r in ChannelGraph(m, X).layers) / 1e6 for k, m in models.items()}

    monkeypatch.setattr(S, "measure_int8", stopwatch)
    scores = group_scores(graph, "l1")
    dense = stopwatch({"d": model})["d"]
    lm = L.LatencyModel(key={"runtime": "pytorch", "batch": 1, "threads": 1}, pad=1)
    for w in L.sample_widths(graph, 16, round_to=4, min_keep=0.1):
        lm.add(
            w, 2 * stopwatch({"m": prune_to_widths(model, w, example=X, round_to=1, scores=scores)})["m"], "slow state"
        )
    pruned, rec = search(
        model,
        lm,
        graph,
        target=L.Target("pytorch", 1, 1),
        input_shape=(3, 32, 32),
        dense_ms=dense,
        budget=Budget(fraction=0.6),
        selection=Selection(scores=scores),
        options=SearchOptions(max_iters=6, use_cache=False),
    )
    first = rec["iterations"][0]
    assert (
        first["measured_ms"] < (1 - S.UNDERSHOOT) * first["goal_ms_same_run"]
    )  # the undershoot the search must repair
    assert rec["met"] and rec["chosen_iteration"] > 0
    assert first["measured_ms"] < rec["measured_ms"] <= rec["budget_ms_same_run"]
    assert rec["widths"] == rec["iterations"][rec["chosen_iteration"]]["widths"] == ChannelGraph(pruned, X).widths()
    met = [it["measured_ms"] for it in rec["iterations"] if it["measured_ms"] <= it["goal_ms_same_run"]]
    assert rec["measured_ms"] == max(met)  # the measured model nearest under the goal is the one returned


def test_structured_config_margin_is_validated():
    from pqd.stages.structured import StructuredConfig

    assert StructuredConfig(margin=0.1).margin == 0.1
    for bad in (-0.1, 0.5):
        with pytest.raises(ConfigError, match="margin"):
            StructuredConfig(margin=bad)


def test_a_missed_budget_keeps_the_fastest_model_relative_to_dense_and_says_why(monkeypatch):
    """No iteration meets the budget (the latency model was calibrated in a machine state twice as fast, and
    the later timing runs are disturbed): the search returns the model measured fastest relative to the dense
    model of its own run, not the last one, and the record says why it missed."""
    import pqd.structured.search as S
    from pqd.compress.channels.graph import prune_to_widths
    from pqd.stages.structured import missed_budget_message

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=0.125).eval()
    graph = ChannelGraph(model, X)

    def stopwatch(models, **kw):
        return {k: 1.2 * sum(r.macs for r in ChannelGraph(m, X).layers) / 1e6 for k, m in models.items()}

    calls = []

    def disturbed(models, **kw):  # the timing runs after the first measure the chosen model 3x slow
        calls.append(1)
        ms = stopwatch(models)
        return ms | {"chosen": ms["chosen"] * (3.0 if len(calls) > 1 else 1.0)}

    scores = group_scores(graph, "l1")
    dense = stopwatch({"d": model})["d"]
    lm = L.LatencyModel(key={"runtime": "pytorch", "batch": 1, "threads": 1}, pad=1)
    for w in L.sample_widths(graph, 10, round_to=4, min_keep=0.1):
        lm.add(
            w,
            0.5 * stopwatch({"m": prune_to_widths(model, w, example=X, round_to=1, scores=scores)})["m"],
            "fast state",
        )
    monkeypatch.setattr(S, "measure_int8", disturbed)
    pruned, rec = search(
        model,
        lm,
        graph,
        target=L.Target("pytorch", 1, 1),
        input_shape=(3, 32, 32),
        dense_ms=dense,
        budget=Budget(fraction=0.3),
        selection=Selection(scores=scores),
        options=SearchOptions(max_iters=3, use_cache=False),
    )
    its = rec["iterations"]
    assert len(its) >= 2 and not any(it["met"] for it in its) and not rec["met"]
    ratios = [it["measured_ms"] / it["dense_ms_same_run"] for it in its]
    assert rec["chosen_iteration"] == ratios.index(min(ratios)) != len(its) - 1
    assert rec["widths"] == its[rec["chosen_iteration"]]["widths"] == ChannelGraph(pruned, X).widths()
    assert "every group at its floor" in rec["missed_because"]  # tightening could not change the widths
    message = missed_budget_message(rec)
    assert f"{rec['measured_ms']:.3f} ms" in message and f"{rec['budget_ms_same_run']:.3f} ms" in message
    assert rec["missed_because"] in message
