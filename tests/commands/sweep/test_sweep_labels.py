import pytest

from pqd.commands.report.build import build_report
from pqd.commands.sweep import read_table, run_sweep


@pytest.mark.slow
def test_variants_are_labelled_in_the_sweep_table_and_the_report(digits_config, tmp_path):
    base = digits_config | {"data": {"dataset": "digits", "train_subset": 300, "test_subset": 100}}
    spec = {
        "name": "labels",
        "base": base,
        "variants": {
            "dense": {"stages": ""},
            "imp": {"stages": "L:2", "imp": {"rounds": 1, "fraction": 0.5}},
            "kd_feature": {"stages": "D:1", "distill": {"kind": "feature"}},
            "dynamic": {"stages": "Q:0", "quantize": {"mode": "dynamic"}},
        },
    }
    run_sweep(spec, tmp_path, progress=False)
    rows = {r["variant"]: r for r in read_table(tmp_path)}
    assert rows["imp"]["stage_order"] == "L" and rows["imp"]["sparsity_target"] == 0.5
    assert rows["imp"]["prune_criterion"] == "magnitude"
    assert rows["kd_feature"]["stage_order"] == "D" and rows["dynamic"]["quantize_mode"] == "dynamic"
    md = build_report(tmp_path)["markdown"].read_text()
    for label in ("imp", "kd_feature", "dynamic"):
        assert f"| {label} |" in md
    assert "Degradation on contiguous test slices" in md
