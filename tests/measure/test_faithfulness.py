import math

import pytest
import torch

from pqd.measure.faithfulness import EXACT_BELOW, faithfulness, mcnemar


def test_mcnemar_exact_on_a_known_table():
    # Wikipedia's McNemar example (b=6, c=16): exact two-sided binomial p = 0.0525
    r = mcnemar(6, 16)
    assert r["method"] == "exact_binomial"
    assert r["p_value"] == pytest.approx(2 * sum(math.comb(22, i) for i in range(7)) / 2**22)
    assert r["p_value"] == pytest.approx(0.05248, abs=1e-5)
    # b=10, c=2: 2 * (1 + 12 + 66) / 4096
    assert mcnemar(10, 2)["p_value"] == pytest.approx(158 / 4096)
    assert mcnemar(2, 10)["p_value"] == mcnemar(10, 2)["p_value"]


def test_mcnemar_chi_squared_with_continuity_correction():
    r = mcnemar(30, 15)  # 45 discordant pairs: chi-squared
    assert r["method"] == "chi2_continuity_corrected"
    assert r["statistic"] == pytest.approx((15 - 1) ** 2 / 45)
    assert r["p_value"] == pytest.approx(0.0368884, abs=1e-6)  # chi2.sf(196/45, df=1)
    # the same table forced to chi-squared: Wikipedia's corrected statistic 81/22 = 3.682, p = 0.055
    r = mcnemar(6, 16, exact=False)
    assert r["statistic"] == pytest.approx(81 / 22) and r["p_value"] == pytest.approx(0.0550, abs=5e-4)


def test_mcnemar_edges():
    assert mcnemar(0, 0)["p_value"] == 1.0
    assert mcnemar(7, 7)["p_value"] == 1.0
    # |b - c| - 1 is floored at 0: equal discordant counts are no evidence at all (p = 1)
    assert mcnemar(40, 40)["statistic"] == 0.0 and mcnemar(40, 40)["p_value"] == 1.0
    assert mcnemar(41, 40)["p_value"] == 1.0
    assert mcnemar(EXACT_BELOW, 0)["method"] == "chi2_continuity_corrected"
    assert mcnemar(EXACT_BELOW - 1, 0)["method"] == "exact_binomial"
    with pytest.raises(ValueError):
        mcnemar(-1, 3)


def test_mcnemar_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(0, 5), (3, 9), (11, 12), (20, 4), (25, 40), (100, 130), (7, 300)]:
        r = mcnemar(b, c)
        if r["method"] == "exact_binomial":
            want = stats.binomtest(min(b, c), b + c, 0.5).pvalue
        else:
            want = stats.chi2.sf((abs(b - c) - 1) ** 2 / (b + c), 1)
        assert r["p_value"] == pytest.approx(want, rel=1e-9, abs=1e-12), (b, c)


def _onehot(pred, n_classes=3, second=None):
    x = torch.zeros(len(pred), n_classes)
    x[torch.arange(len(pred)), torch.tensor(pred)] = 2.0
    if second is not None:
        x[torch.arange(len(pred)), torch.tensor(second)] += 1.0
    return x


def test_faithfulness_on_a_hand_made_case():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    teacher = _onehot([0, 0, 1, 0, 2, 1])  # right on 0,1,2,4
    final = _onehot([0, 1, 1, 0, 2, 2], second=[1, 0, 0, 1, 0, 0])  # right on 0,2,4,5
    f = faithfulness(teacher, final, labels, class_names=["a", "b", "c"])
    assert f["n"] == 6 and f["k"] == 3
    assert f["teacher"]["top1"] == pytest.approx(4 / 6) and f["final"]["top1"] == pytest.approx(4 / 6)
    assert f["teacher"]["per_class"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.5})
    assert f["final"]["per_class"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.0})
    assert f["agreement_with_teacher"] == pytest.approx(4 / 6)
    assert f["contingency"] == {"both_right": 3, "teacher_only": 1, "final_only": 1, "both_wrong": 1}
    assert f["mcnemar"]["b"] == 1 and f["mcnemar"]["c"] == 1 and f["mcnemar"]["p_value"] == 1.0
    assert f["final"]["top5"] == 1.0  # k = 3 = number of classes


def test_faithfulness_top5_and_empty_class():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    logits = torch.arange(8, dtype=torch.float).repeat(8, 1)  # always ranks 7 > 6 > 5 > 4 > 3 first
    f = faithfulness(logits, logits, labels)
    assert f["k"] == 5
    assert f["final"]["top1"] == 0.0
    assert f["final"]["top5"] == pytest.approx(4 / 8)  # the top 5 are classes 3..7: labels 3, 4, 5, 6 hit
    assert f["final"]["per_class"]["7"] is None  # no test image of class 7
    assert f["mcnemar"]["p_value"] == 1.0 and f["agreement_with_teacher"] == 1.0


def test_faithfulness_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        faithfulness(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long))
