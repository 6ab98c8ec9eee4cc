"""Width recipes under one predicted target, ranked by accuracy after adaptive BN (pqd.structured.select)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pqd.compress.channels.graph import ChannelGraph, prune_to_widths
from pqd.compress.channels.importance import group_scores, uniform_widths
from pqd.errors import ConfigError
from pqd.models.registry import create_model
from pqd.structured import latency_model as L
from pqd.structured.search import Budget, SearchOptions, Selection, cost_function, refill_widths, search
from pqd.structured.select import adapt_bn, adapted_bn_ranker, choose, fit_scale, normalized_images, width_recipes

X = torch.zeros(2, 3, 32, 32)


def _macs_model():
    lm = L.LatencyModel(key={"runtime": "pytorch", "batch": 1, "threads": 1}, pad=1)
    lm.coef = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # exactly proportional to conv MACs
    return lm


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=0.25).eval()
    graph = ChannelGraph(model, X)
    return model, graph, group_scores(graph, "l1")


def test_every_recipe_meets_the_predicted_target_and_uniform_is_the_largest_uniform_ratio(resnet):
    model, graph, scores = resnet
    lm = _macs_model()
    target = 0.5 * lm.predict(graph, graph.widths())
    recipes = width_recipes(graph, scores, round_to=8, min_keep=0.1)
    assert set(recipes) == {
        "greedy",
        "greedy_fraction",
        "uniform",
        "blend0.5_greedy",
        "blend0.5_greedy_fraction",
        "uniform_refill",
    }
    got = {name: r(lm, target) for name, r in recipes.items()}
    for name, w in got.items():
        assert lm.predict(graph, w) <= target, name
        assert all(w[g] % 8 == 0 or w[g] == c for g, c in graph.widths().items()), name
    # uniform: one keep ratio everywhere, and the next ratio up (one rounding step in some group) misses the target
    u = got["uniform"]
    ratios = {round(u[g] / c, 1) for g, c in graph.widths().items()}
    assert len(ratios) <= 2  # rounding up to multiples of 8 can split one ratio into two neighbours
    chans = graph.widths()
    r = max(u[g] / c for g, c in chans.items())
    bigger = uniform_widths(chans, r + 0.07, round_to=8)
    assert lm.predict(graph, bigger) > target
    # the two greedy costs disagree about where to cut: one keeps more of the wide groups than the other
    wide = max(chans, key=chans.get)
    assert got["greedy_fraction"][wide] < got["greedy"][wide] or got["greedy_fraction"] != got["greedy"]


def test_refill_starts_from_uniform_and_fills_the_target_until_no_step_fits(resnet):
    _, graph, scores = resnet
    lm = _macs_model()
    chans = graph.widths()
    target = 0.45 * lm.predict(graph, chans)
    recipes = width_recipes(graph, scores, round_to=8, min_keep=0.1)
    u, r = recipes["uniform"](lm, target), recipes["uniform_refill"](lm, target)
    assert all(r[g] >= u[g] for g in chans) and r != u
    assert lm.predict(graph, u) < lm.predict(graph, r) <= target
    for g, k in r.items():  # maximal: one more step in any group overshoots
        if k < chans[g]:
            assert lm.predict(graph, {**r, g: min(chans[g], k + 8)}) > target, g


def test_refill_adds_channels_where_they_restore_the_most_importance_per_millisecond():
    class G:
        def widths(self):
            return {"cheap": 64, "dear": 64}

    class LM:  # a step of "dear" costs 4x the time of a step of "cheap"
        def predict(self, graph, w):
            return w["cheap"] * 1.0 + w["dear"] * 4.0

    cost = lambda g, k: (64 - k) * (2.0 if g == "dear" else 1.0)  # "dear" channels matter 2x as much
    start = {"cheap": 32, "dear": 32}
    got = refill_widths(G(), LM(), cost, start, target_ms=32 + 128 + 64, round_to=8)
    assert got == {"cheap": 64, "dear": 40}  # 2/4 < 1/1 per ms: fill "cheap" first, then one step of "dear" fits
    assert refill_widths(G(), LM(), cost, start, target_ms=32 + 128 - 1, round_to=8) == start  # already over: unchanged


def test_per_group_cost_weighs_groups_equally_whatever_their_size():
    scores = {"small": torch.ones(8), "big": torch.ones(64)}

    class G:  # cost_function reads the group widths and the scores
        def widths(self):
            return {"small": 8, "big": 64}

    cost = cost_function(G(), scores, None, per_group=True)
    assert cost("small", 4) == pytest.approx(cost("big", 32)) == pytest.approx(0.25)
    assert cost("small", 8) == 0 and cost("big", 0) == pytest.approx(0.5)


def test_fit_scale_returns_the_smallest_widths_when_the_target_is_unreachable(resnet):
    _, graph, _ = resnet
    lm = _macs_model()
    w = fit_scale(graph, lm, {g: 1.0 for g in graph.widths()}, 1e-9, round_to=8, min_keep=0.25)
    assert w == uniform_widths(graph.widths(), 0.25, round_to=8)


def test_adapt_bn_sets_running_stats_to_the_calibration_statistics():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    m[1].running_mean.fill_(5.0)
    m[1].running_var.fill_(9.0)
    x = torch.randn(64, 3, 8, 8) * 2 + 1
    adapt_bn(m, x, batch_size=16)
    assert not m.training
    with torch.no_grad():
        a = m[0](x)
    assert torch.allclose(m[1].running_mean, a.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(m[1].running_var, a.var((0, 2, 3)), rtol=0.05)  # averaged per-batch unbiased variances
    assert m[1].momentum == 0.1  # restored


def test_ranker_scores_candidates_without_touching_the_model(tiny_data):
    torch.manual_seed(0)
    shape = tiny_data.image_shape
    model = create_model("resnet18", num_classes=tiny_data.num_classes, width=0.25).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = ChannelGraph(model, torch.zeros(2, *shape))
    scores = group_scores(graph, "l1")
    x, y = normalized_images(tiny_data.train, torch.arange(64), mean=tiny_data.mean, std=tiny_data.std)
    assert x.shape == (64, *shape) and y.shape == (64,)
    rank = adapted_bn_ranker(model, scores, example=torch.zeros(2, *shape), calib=x, val_x=x, val_y=y)
    correct = rank({"half": uniform_widths(graph.widths(), 0.5, round_to=8), "full": graph.widths()})
    assert set(correct) == {"half", "full"}
    assert all(c.dtype == torch.bool and c.shape == (64,) for c in correct.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_choose_keeps_uniform_unless_the_best_beats_it_beyond_noise():
    n = 1000
    base = torch.zeros(n, dtype=torch.bool)
    base[:300] = True  # uniform: 30.0%

    def plus(k):  # k more images right than uniform, none fewer
        c = base.clone()
        c[300 : 300 + k] = True
        return c

    chosen, test = choose({"greedy": plus(3), "uniform": base})  # +0.3 points: noise
    assert chosen == "uniform" and test["best"] == "greedy" and test["p_value"] > 0.05
    chosen, test = choose({"greedy": plus(40), "uniform": base})  # +4 points, 40 discordant images all one way
    assert chosen == "greedy" and test["p_value"] < 1e-6
    assert choose({"greedy": plus(3), "uniform": base}, prefer=None) == ("greedy", {})
    assert choose({"a": base, "b": base}, prefer=None)[0] == "a"  # ties: the first listed
    assert choose({"uniform": plus(5), "greedy": base}) == ("uniform", {})


def _stand_in_stopwatch(resnet, monkeypatch):
    """A stand-in stopwatch for the search (MACs plus a fixed overhead the latency model does not know of,
    so the first measurement misses) and a latency model sampled without that overhead; returns (model, dense)."""
    import pqd.structured.search as S

    model, graph, scores = resnet

    def macs(m):
        return sum(r.macs for r in ChannelGraph(m, X).layers) / 1e6

    overhead = 0.6 * macs(model)
    monkeypatch.setattr(S, "measure_int8", lambda models, **kw: {k: macs(m) + overhead for k, m in models.items()})
    lm = _macs_model()
    for ratio in (1.0, 0.5):  # samples without the overhead: the model's first prediction is too optimistic
        w = uniform_widths(graph.widths(), ratio, round_to=8)
        lm.add(w, macs(prune_to_widths(model, w, example=X, round_to=1, scores=scores)), "sample")
    return lm, macs(model) + overhead


def test_search_ranks_recipes_once_and_corrects_with_the_winner(resnet, monkeypatch):
    """A stand-in stopwatch (MACs plus a fixed overhead the latency model does not know of) makes the
    first measurement miss; a stand-in ranker prefers the uniform recipe. The record lists every
    candidate; later iterations keep the uniform recipe."""
    model, graph, scores = resnet
    lm, dense = _stand_in_stopwatch(resnet, monkeypatch)
    calls = []

    def rank(cands):  # uniform gets all 200 images right, every other recipe half of them
        calls.append(sorted(cands))
        return {n: torch.ones(200, dtype=torch.bool) if n == "uniform" else torch.arange(200) % 2 == 0 for n in cands}

    recipes = width_recipes(graph, scores, round_to=8, min_keep=0.1)
    _, rec = search(
        model,
        lm,
        graph,
        target=L.Target("pytorch", 1, 1),
        input_shape=(3, 32, 32),
        dense_ms=dense,
        budget=Budget(fraction=0.5),
        selection=Selection(scores=scores, recipes=recipes, rank=rank),
        options=SearchOptions(max_iters=6, use_cache=False),
    )
    assert len(calls) == 1  # ranked once
    assert rec["recipe"] == "uniform"
    assert {c["recipe"] for c in rec["candidates"]} == set(recipes)
    assert rec["met"] and len(rec["iterations"]) > 1  # corrected at least once
    for it in rec["iterations"]:
        w = it["widths"]
        assert len({round(w[g] / c, 1) for g, c in graph.widths().items()}) <= 2  # uniform throughout
    json.dumps(rec)
    with pytest.raises(ConfigError, match="need rank"):
        search(
            model,
            lm,
            graph,
            target=L.Target("pytorch", 1, 1),
            input_shape=(3, 32, 32),
            dense_ms=dense,
            budget=Budget(fraction=0.5),
            selection=Selection(scores=scores, recipes=recipes),
        )


def test_structured_config_select_is_validated():
    from pqd.stages.structured import StructuredConfig

    assert StructuredConfig(select="adapted_bn").select == "adapted_bn"
    with pytest.raises(ConfigError, match="select"):
        StructuredConfig(select="best")
    assert StructuredConfig(select="uniform").select == "uniform"
    for select in ("adapted_bn", "uniform"):
        with pytest.raises(ConfigError, match="size budget"):
            StructuredConfig(select=select, size_budget_mb=1.0)
    with pytest.raises(ConfigError, match="select_images"):
        StructuredConfig(select_images=4)


def test_select_uniform_is_one_recipe_corrected_against_the_stopwatch(resnet, monkeypatch):
    """select 'uniform' (the control for the other recipes): no ranking, one keep ratio everywhere in every
    iteration, and the measured model meets the budget the stand-in stopwatch sets."""
    model, graph, scores = resnet
    lm, dense = _stand_in_stopwatch(resnet, monkeypatch)
    only = {"uniform": width_recipes(graph, scores, round_to=8, min_keep=0.1)["uniform"]}
    _, rec = search(
        model,
        lm,
        graph,
        target=L.Target("pytorch", 1, 1),
        input_shape=(3, 32, 32),
        dense_ms=dense,
        budget=Budget(fraction=0.6),
        selection=Selection(scores=scores, recipes=only),
        options=SearchOptions(max_iters=6, use_cache=False),
    )
    assert rec["recipe"] == "uniform" and rec["candidates"] is None and rec["met"]
    assert rec["measured_ms"] <= 0.6 * dense
    for it in rec["iterations"]:
        assert len({round(it["widths"][g] / c, 1) for g, c in graph.widths().items()}) <= 2
    with pytest.raises(ConfigError, match="rank"):
        search(
            model,
            lm,
            graph,
            target=L.Target("pytorch", 1, 1),
            input_shape=(3, 32, 32),
            dense_ms=dense,
            budget=Budget(fraction=0.6),
            selection=Selection(scores=scores, recipes={**only, "greedy": only["uniform"]}),
        )
