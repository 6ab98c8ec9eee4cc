from __future__ import annotations

import pytest
import torch
from structured_user_models import Plain

from pqd.compress.channels.graph import ChannelGraph, trace_layers
from pqd.structured.sensitivity import analyze, analyze_main, read_csv, write
from pqd.train.loop import train


def test_rows_per_group_and_per_layer(tiny_data, tmp_path):
    from pqd.config import TrainConfig

    torch.manual_seed(0)
    model = Plain(num_classes=4, c=16)
    train(model, tiny_data, epochs=1, lr=0.05, config=TrainConfig(batch_size=32, progress=False))
    rows = analyze(model, tiny_data, keep_ratios=(0.5,), calib_batches=1, batch_size=64)
    x = torch.zeros(2, 3, 16, 16)
    groups = ChannelGraph(model, x).groups
    layers = trace_layers(model, x)
    prune_rows = [r for r in rows if r["kind"] == "prune"]
    quant_rows = [r for r in rows if r["kind"] == "quantize"]
    assert sorted(r["group"] for r in prune_rows) == sorted(g.id for g in groups)
    assert [r["layer"] for r in quant_rows] == [layer.name for layer in layers]
    assert all(0 <= r["accuracy"] <= 1 and abs(r["baseline"] - r["accuracy"] - r["drop"]) < 1e-9 for r in rows)
    # a row's accuracy is that of the model with only that group pruned
    from pqd.compress.channels.graph import prune_to_widths
    from pqd.measure.accuracy import predict, top1

    row = prune_rows[0]
    alone = prune_to_widths(model, {row["group"]: row["kept"]}, example=x, round_to=1)
    assert alone.get_submodule(row["group"]).weight.shape[0] == row["kept"] == row["channels"] // 2
    acc = top1(predict(alone, tiny_data.test, mean=tiny_data.mean, std=tiny_data.std), tiny_data.test.y)
    assert acc == pytest.approx(row["accuracy"])
    paths = write(rows, tmp_path)
    back = read_csv(paths["csv"])
    assert [(r["kind"], r["layer"], r["kept"]) for r in back] == [(r["kind"], r["layer"], r["kept"]) for r in rows]
    assert [r["drop"] for r in back] == pytest.approx([r["drop"] for r in rows])
    assert paths["md"].read_text().count("\n") == len(rows) + 2
    assert "png" not in paths or paths["png"].stat().st_size > 0


def test_cli(tmp_path, capsys):
    rc = analyze_main(
        [
            "--model",
            "structured_user_models:Plain",
            "--dataset",
            "digits",
            "--train-subset",
            "200",
            "--test-subset",
            "100",
            "--keep-ratios",
            "0.5",
            "--no-quantize",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert rc == 0
    assert (tmp_path / "s" / "sensitivity.csv").exists()
