import importlib
import math

import numpy as np
import pytest

from pqd.measure.stats import (
    EXACT_BELOW,
    bootstrap_interval,
    correct_vector,
    counts_record,
    mcnemar,
    mcnemar_paired,
    spearman,
    top1_record,
    wilson_interval,
)


def test_wilson_known_values():
    # textbook values (Newcombe 1998 / Agresti-Coull tables), z = 1.959964
    assert wilson_interval(50, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    # a Wald interval would give 0.5 +- 0.098 = (0.402, 0.598) for 50/100 and (0.552, 1.048) for 8/10
    assert wilson_interval(8, 10)[1] < 0.95
    # 90% confidence is narrower; z = 1.644854
    lo, hi = wilson_interval(50, 100, confidence=0.90)
    assert (lo, hi) == pytest.approx((0.41885, 0.58115), abs=1e-5)


def test_wilson_hand_formula_and_edges():
    k, n, z = 6086, 10000, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), rel=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for bad in ((-1, 5), (6, 5), (1, -1)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


def test_bootstrap_interval_is_seeded_and_close_to_the_normal_interval():
    x = np.array([1] * 200 + [0] * 200)
    a = bootstrap_interval(x, seed=3)
    assert a == bootstrap_interval(x, seed=3)
    assert a != bootstrap_interval(x, seed=4)
    # sd of the mean = 0.025: the percentile interval sits near 0.5 +- 1.96 * 0.025
    assert a[0] == pytest.approx(0.451, abs=0.008) and a[1] == pytest.approx(0.549, abs=0.008)
    assert bootstrap_interval(np.ones(50)) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_interval([])
    with pytest.raises(ValueError):
        bootstrap_interval(np.ones((3, 2)))


def test_mcnemar_exact_known_tables():
    # b=6, c=16 (Wikipedia's example): 2 * sum_{i<=6} C(22, i) / 2^22 = 0.05248
    r = mcnemar(6, 16)
    assert r["method"] == "exact_binomial"
    assert r["p_value"] == pytest.approx(2 * sum(math.comb(22, i) for i in range(7)) / 2**22)
    assert r["p_value"] == pytest.approx(0.052479, abs=1e-6)
    # b=1, c=9: 2 * (1 + 10) / 1024
    assert mcnemar(1, 9)["p_value"] == pytest.approx(22 / 1024)
    assert mcnemar(9, 1)["p_value"] == mcnemar(1, 9)["p_value"]
    # a one-sided sum (forgetting the factor 2) or P(X < k) instead of P(X <= k) would give 11/1024 or 2/1024
    assert mcnemar(0, 5)["p_value"] == pytest.approx(2 / 32)
    assert mcnemar(3, 3)["p_value"] == 1.0


def test_mcnemar_mid_p():
    # mid-p = 2 * (P(X < 6) + P(X = 6) / 2) for n = 22
    want = (2 * sum(math.comb(22, i) for i in range(6)) + math.comb(22, 6)) / 2**22
    r = mcnemar(6, 16, mid_p=True)
    assert r["method"] == "exact_binomial_mid_p"
    assert r["p_value"] == pytest.approx(want) and r["p_value"] == pytest.approx(0.034690, abs=1e-6)
    assert mcnemar(1, 9, mid_p=True)["p_value"] == pytest.approx((2 * 1 + 10) / 1024)
    assert mcnemar(4, 4, mid_p=True)["p_value"] == pytest.approx(1.0)
    assert mcnemar(6, 16, mid_p=True)["p_value"] < mcnemar(6, 16)["p_value"]


def test_mcnemar_chi_squared_path():
    r = mcnemar(30, 15)
    assert r["method"] == "chi2_continuity_corrected"
    assert r["statistic"] == pytest.approx(196 / 45)
    assert r["p_value"] == pytest.approx(0.0368884, abs=1e-6)
    assert mcnemar(EXACT_BELOW - 1, 0)["method"] == "exact_binomial"
    assert mcnemar(EXACT_BELOW, 0)["method"] == "chi2_continuity_corrected"
    with pytest.raises(ValueError):
        mcnemar(-1, 2)


def test_faithfulness_uses_the_one_mcnemar():
    faith_mod = importlib.import_module("pqd.measure.faithfulness")
    assert faith_mod.mcnemar is mcnemar and faith_mod.EXACT_BELOW == EXACT_BELOW


def test_mcnemar_paired_builds_the_table():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    r = mcnemar_paired(a, b)
    assert r["table"] == {"both_right": 2, "a_only": 3, "b_only": 1, "both_wrong": 2}
    assert (r["b"], r["c"], r["n"]) == (3, 1, 8)
    assert (
        r["top1_a"] == pytest.approx(5 / 8)
        and r["top1_b"] == pytest.approx(3 / 8)
        and r["difference"] == pytest.approx(0.25)
    )
    assert r["p_value"] == pytest.approx(2 * (1 + 4) / 16)
    assert mcnemar_paired([1, 0, 1], [1, 1, 0])["table"]["a_only"] == 1
    with pytest.raises(ValueError):
        mcnemar_paired(a, b[:-1])
    with pytest.raises(ValueError):
        mcnemar_paired([0, 2], [1, 1])


def test_correct_vector():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert correct_vector(logits, np.array([1, 1, 1])).tolist() == [True, False, True]
    with pytest.raises(ValueError):
        correct_vector(logits, np.array([1, 1]))


def test_top1_records():
    x = np.array([True] * 50 + [False] * 50)
    r = top1_record(x)
    assert r == {
        "top1": 0.5,
        "ci_low": pytest.approx(0.40383, abs=1e-5),
        "ci_high": pytest.approx(0.59617, abs=1e-5),
        "n": 100,
        "method": "wilson",
        "confidence": 0.95,
    }
    assert counts_record(50, 100) == r
    rb = top1_record(x, method="bootstrap", seed=1, resamples=500)
    assert rb["method"] == "bootstrap" and rb["n"] == 100 and rb["top1"] == 0.5 and rb["ci_low"] < 0.5 < rb["ci_high"]
    assert rb == top1_record(x, method="bootstrap", seed=1, resamples=500)
    with pytest.raises(ValueError):
        top1_record(x, method="wald")


def test_mcnemar_pooled_sums_strata():
    from pqd.measure.stats import mcnemar_pooled

    r = mcnemar_pooled([(3, 1), (2, 2), (5, 0)])
    assert (r["b"], r["c"]) == (10, 3) and r["p_value"] == mcnemar(10, 3)["p_value"]
    assert r["strata_a_better"] == 2 and r["strata_b_better"] == 0
    with pytest.raises(ValueError):
        mcnemar_pooled([])


def test_paired_difference_interval():
    from pqd.measure.stats import paired_difference_interval

    # 100 images: 10 only A right, 4 only B right, 60 both, 26 neither
    a = np.array([1] * 10 + [0] * 4 + [1] * 60 + [0] * 26, dtype=bool)
    b = np.array([0] * 10 + [1] * 4 + [1] * 60 + [0] * 26, dtype=bool)
    r = paired_difference_interval(a, b)
    half = 1.959963984540054 * math.sqrt(14 - 36 / 100) / 100  # = 0.0724
    assert r["difference"] == pytest.approx(0.06) and (r["ci_low"], r["ci_high"]) == pytest.approx(
        (0.06 - half, 0.06 + half)
    )
    rb = paired_difference_interval(a, b, method="bootstrap", seed=0)
    assert rb["ci_low"] == pytest.approx(r["ci_low"], abs=0.02) and rb["ci_high"] == pytest.approx(
        r["ci_high"], abs=0.02
    )
    with pytest.raises(ValueError):
        paired_difference_interval(a, b, method="exact")


def test_holm():
    from pqd.measure.stats import holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([]) == []


def test_spearman_known_values_ties_and_degenerate_inputs():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(3**0.5 / 2)  # tied values share the mean rank
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
