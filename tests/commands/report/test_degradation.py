import pytest
import torch

from pqd.commands.report.degradation import degradation_rows, degradation_section
from pqd.measure.degradation import compare_degradation, degradation_profile, slice_bounds


def _logits(correct: torch.Tensor, labels: torch.Tensor, k: int = 4) -> torch.Tensor:
    pred = torch.where(correct.bool(), labels, (labels + 1) % k)
    return torch.nn.functional.one_hot(pred, k).float()


def test_slice_bounds_halve_down_to_min_slice():
    levels = slice_bounds(200, min_slice=25)
    assert [len(lv) for lv in levels] == [1, 2, 4, 8]
    assert levels[1] == [(0, 100), (100, 200)] and levels[3][-1] == (175, 200)
    assert [len(lv) for lv in slice_bounds(210, min_slice=25)] == [1, 2, 4, 8]  # 210 // 8 = 26 >= 25, 13 < 25
    assert slice_bounds(210, min_slice=25)[3][-1] == (182, 208)  # the remainder is left out at that level


def test_profile_and_factor_on_a_constructed_case():
    labels = torch.zeros(200, dtype=torch.long)
    correct = torch.ones(200, dtype=torch.long)
    correct[150:175] = 0  # one 25-image slice entirely wrong
    p = degradation_profile(_logits(correct, labels), labels)
    assert p["top1"] == pytest.approx(0.875)
    assert [lv["min"] for lv in p["levels"]] == pytest.approx([0.875, 0.75, 0.5, 0.0])
    assert p["degradation_factor"] == pytest.approx(1.0)
    uniform = degradation_profile(_logits(torch.ones(200, dtype=torch.long), labels), labels)
    assert uniform["degradation_factor"] == 0.0


def test_flag_fires_when_the_mean_is_kept_but_a_slice_fails():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=g)
    teacher = torch.ones(400, dtype=torch.long)
    teacher[torch.arange(0, 400, 10)] = 0  # 90 % spread evenly
    final = torch.ones(400, dtype=torch.long)
    final[100:135] = 0  # 35 errors in one slice: 91.25 % on average, but a 50-image slice drops to ~30 %
    d = compare_degradation(_logits(teacher, labels), _logits(final, labels), labels)
    assert d["mean_gap"] <= 0.0 and d["slice_failure"]
    w = d["worst_slice"]
    assert 100 <= w["start"] < 135 and w["gap"] > 0.3 and w["p_adjusted"] < 0.05
    # the same number of errors spread evenly: no slice fails
    spread = torch.ones(400, dtype=torch.long)
    spread[torch.arange(5, 400, 11)[:35]] = 0
    assert not compare_degradation(_logits(teacher, labels), _logits(spread, labels), labels)["slice_failure"]
    # a model that loses the mean is not flagged as "keeps the mean"
    worse = final.clone()
    worse[200:260] = 0
    assert not compare_degradation(_logits(teacher, labels), _logits(worse, labels), labels)["slice_failure"]


class _Doc:
    def __init__(self):
        self.blocks = []

    def h(self, level, text):
        self.blocks.append(("h", text))

    def p(self, text):
        self.blocks.append(("p", text))

    def table(self, headers, rows):
        self.blocks.append(("table", headers, rows))


def test_report_section_flags_the_configuration():
    import json

    labels = torch.zeros(400, dtype=torch.long)
    t = torch.ones(400, dtype=torch.long)
    f = t.clone()
    f[0:40] = 0
    t[torch.arange(3, 400, 10)] = 0
    d = compare_degradation(_logits(t, labels), _logits(f, labels), labels)
    aggs = [
        {"label": "teacher", "kind": "teacher", "stages": "", "runs": []},
        {
            "label": "imp",
            "kind": "pipeline",
            "stages": "L:6",
            "runs": [{"metrics_json": json.dumps({"degradation": d})}],
        },
        {"label": "old", "kind": "pipeline", "stages": "P:6", "runs": [{"metrics_json": "{}"}]},
    ]
    rows = degradation_rows(aggs)
    assert [r["label"] for r in rows] == ["imp"] and rows[0]["flagged"] == 1
    doc = _Doc()
    degradation_section(doc, aggs)
    table = [b for b in doc.blocks if b[0] == "table"][0]
    assert "flagged" in table[2][0][-1]
