from __future__ import annotations

import copy
import json

import pytest
import torch
from structured_user_models import Plain

from pqd.compress.channels.graph import ChannelGraph
from pqd.compress.student import Student
from pqd.config import TrainConfig
from pqd.errors import ConfigError, ModelError
from pqd.run.config import RunConfig
from pqd.stages.protocol import StageContext
from pqd.stages.structured import STAGE, StructuredConfig, structured_prune


def test_config_validates():
    assert StructuredConfig().budget_fraction == 0.5
    with pytest.raises(ConfigError, match="exactly one"):
        StructuredConfig(budget_ms=1.0)
    with pytest.raises(ConfigError, match="structured.runtime"):
        StructuredConfig(runtime="tensorrt")
    with pytest.raises(ConfigError, match="structured.importance"):
        StructuredConfig(importance="nope")
    with pytest.raises(ConfigError, match="budget_fraction"):
        StructuredConfig(budget_fraction=1.5)
    cfg = StructuredConfig.from_dict({"budget_fraction": None, "budget_ms": 2.0, "ignore": ["fc"]})
    assert cfg.ignore == ("fc",) and StructuredConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="budget_fractoin"):
        StructuredConfig.from_dict({"budget_fractoin": 0.3})


def test_stage_protocol_attributes():
    assert (STAGE.name, STAGE.letter, STAGE.section, STAGE.quantizes, STAGE.structural) == (
        "structured",
        "S",
        "structured",
        False,
        True,
    )


def test_stage_prunes_fine_tunes_records_and_resumes(tiny_data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Plain(num_classes=4, c=32)
    cfg = StructuredConfig(
        budget_fraction=0.9, runtime="pytorch", threads=1, samples=3, runs=10, max_iters=4, cache_dir=str(tmp_path)
    )
    ctx = StageContext(
        data=tiny_data,
        teacher=copy.deepcopy(model).eval(),
        config=RunConfig(structured=cfg),
        train_config=TrainConfig(batch_size=32, progress=False),
        seed=0,
        augment=True,
        device=torch.device("cpu"),
    )
    import pqd.structured.latency_model as L
    import pqd.structured.search as S

    real = L.measure_int8
    in_process = lambda *a, **k: real(*a, **{**k, "in_process": True})  # noqa: E731  (no worker processes in a unit test)
    monkeypatch.setattr(L, "measure_int8", in_process)
    monkeypatch.setattr(S, "measure_int8", in_process)
    ckpt = tmp_path / "stage.safetensors"
    out = STAGE.run(Student(model), cfg, ctx, epochs=1, checkpoint=ckpt)
    rec = out.records["1_structured"]
    assert json.loads(json.dumps(rec)) == rec
    x = torch.zeros(2, 3, 16, 16)
    assert ChannelGraph(out.model, x).widths() == rec["widths"]
    assert out.model(x).shape == (2, 4) and out.form == "fp32" and not out.masks
    assert rec["measured_ms"] > 0 and rec["predicted_ms"] > 0
    assert sum(rec["widths"].values()) < sum(rec["dense_widths"].values())
    # resume: the widths come back from the file next to the checkpoint, with no measurement
    monkeypatch.setattr(L, "measure_int8", lambda *a, **k: pytest.fail("resume must not measure"))
    monkeypatch.setattr(S, "measure_int8", lambda *a, **k: pytest.fail("resume must not measure"))
    again, rec2 = structured_prune(
        Student(model), cfg, data=tiny_data, epochs=1, train_config=ctx.train_config, checkpoint=ckpt
    )
    assert rec2["widths"] == rec["widths"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.model.state_dict().values(), out.model.state_dict().values(), strict=True)
    )


def test_stage_refuses_wrong_order(tiny_data):
    from pqd.compress.qat import prepare

    model = Plain(num_classes=4, c=16)
    cfg = StructuredConfig()
    qat = Student(prepare(model, torch.zeros(2, 3, 16, 16)), form="qat")
    with pytest.raises(ModelError, match="before quantize, e.g. S:"):
        structured_prune(qat, cfg, data=tiny_data, epochs=0, train_config=TrainConfig())
    masked = Student(model, masks={"features.0": torch.ones(16, 3, 3, 3, dtype=torch.bool)})
    with pytest.raises(ModelError, match="before prune"):
        structured_prune(masked, cfg, data=tiny_data, epochs=0, train_config=TrainConfig())


def test_stage_with_adapted_bn_selection_records_the_ranked_recipes(tiny_data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Plain(num_classes=4, c=32)
    cfg = StructuredConfig(
        budget_fraction=0.7,
        runtime="pytorch",
        threads=1,
        samples=3,
        runs=10,
        max_iters=3,
        cache_dir=str(tmp_path),
        select="adapted_bn",
        select_images=64,
    )
    import pqd.structured.latency_model as L
    import pqd.structured.search as S

    real = L.measure_int8
    in_process = lambda *a, **k: real(*a, **{**k, "in_process": True})  # noqa: E731
    monkeypatch.setattr(L, "measure_int8", in_process)
    monkeypatch.setattr(S, "measure_int8", in_process)
    out, rec = structured_prune(
        Student(model), cfg, data=tiny_data, epochs=0, train_config=TrainConfig(batch_size=32, progress=False)
    )
    assert rec["select"] == "adapted_bn" and rec["ranked_on"] == "192 training images (no validation split)"
    assert rec["recipe"] in {c["recipe"] for c in rec["candidates"]} and "uniform" in {
        c["recipe"] for c in rec["candidates"]
    }
    best = max(c["score"] for c in rec["candidates"])
    test = rec["choice_test"]
    if test:  # the best was not uniform: it is kept only if it beat uniform beyond noise on the ranking images
        assert next(c for c in rec["candidates"] if c["recipe"] == test["best"])["score"] == best
        assert rec["recipe"] == (
            test["best"] if test["p_value"] < test["alpha"] and test["difference"] > 0 else "uniform"
        )
    else:
        assert next(c for c in rec["candidates"] if c["recipe"] == rec["recipe"])["score"] == best
    assert ChannelGraph(out.model, torch.zeros(2, 3, 16, 16)).widths() == rec["widths"]


def test_stage_quantizes_its_latency_models_with_the_runs_quantize_settings(tiny_data, tmp_path, monkeypatch):
    """A model the quantize stage accepts only with quantize.leaf_modules (data-dependent control
    flow): the S stage's INT8 latency measurements use the same leaf modules and weight options."""
    import pqd_user_models as um

    import pqd.structured.latency_model as L
    import pqd.structured.search as S
    from pqd.stages.quantize import QuantizeConfig

    torch.manual_seed(0)
    model = um.Untraceable(num_classes=4)
    cfg = StructuredConfig(
        budget_fraction=0.9, runtime="pytorch", threads=1, samples=3, runs=5, max_iters=2, cache_dir=str(tmp_path)
    )
    quant = QuantizeConfig(leaf_modules=("gate",), granularity="per_tensor")
    ctx = StageContext(
        data=tiny_data,
        teacher=None,
        config=RunConfig(structured=cfg, quantize=quant),
        train_config=TrainConfig(batch_size=32, progress=False),
        seed=0,
        augment=False,
        device=torch.device("cpu"),
    )
    seen = []
    real = L.export_int8

    def spy(*a, **k):
        seen.append(k.get("target"))
        return real(*a, **k)

    monkeypatch.setattr(L, "export_int8", spy)
    real_measure = L.measure_int8
    in_process = lambda *a, **k: real_measure(*a, **{**k, "in_process": True})  # noqa: E731
    monkeypatch.setattr(L, "measure_int8", in_process)
    monkeypatch.setattr(S, "measure_int8", in_process)
    out = STAGE.run(Student(model), cfg, ctx, epochs=0, checkpoint=None)
    assert out.model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    assert seen and all(t.leaf_modules == ("gate",) and t.options.granularity == "per_tensor" for t in seen)
    assert out.records["1_structured"]["latency_model"]["target"]["quantization"] == {
        "weights": "per_tensor/symmetric",
        "leaf_modules": ["gate"],
    }


def test_reinit_trains_the_chosen_widths_from_a_fresh_initialisation(tiny_data, tmp_path, monkeypatch):
    """structured.reinit (the trained-from-scratch control): the same widths as without it, none of the
    teacher's kept weights, and the same fresh weights for the same seed."""
    import pqd.structured.latency_model as L
    import pqd.structured.search as S

    real = L.measure_int8
    in_process = lambda *a, **k: real(*a, **{**k, "in_process": True})  # noqa: E731
    monkeypatch.setattr(L, "measure_int8", in_process)
    monkeypatch.setattr(S, "measure_int8", in_process)
    torch.manual_seed(0)
    model = Plain(num_classes=4, c=32)
    tc = TrainConfig(batch_size=32, progress=False)
    common = dict(budget_fraction=0.7, runtime="pytorch", threads=1, samples=3, runs=10, max_iters=2)
    kept, rec = structured_prune(
        Student(model),
        StructuredConfig(**common, cache_dir=str(tmp_path / "a")),
        data=tiny_data,
        epochs=0,
        train_config=tc,
    )
    runs = [
        structured_prune(
            Student(model),
            StructuredConfig(**common, reinit=True, cache_dir=str(tmp_path / "a")),
            data=tiny_data,
            epochs=0,
            train_config=tc,
            checkpoint=tmp_path / f"r{i}.safetensors",
        )
        for i in range(2)
    ]
    (fresh, rec_fresh), (again, _) = runs
    assert rec_fresh["reinitialized"] and rec_fresh["widths"] == rec["widths"]
    convs = [k for k, v in kept.model.state_dict().items() if k.endswith("weight") and v.dim() == 4]
    assert convs and all(not torch.equal(kept.model.state_dict()[k], fresh.model.state_dict()[k]) for k in convs)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.model.state_dict().values(), again.model.state_dict().values(), strict=True)
    )


def test_widths_from_a_finished_run_are_used_without_a_search(tiny_data, tmp_path, monkeypatch):
    import pqd.structured.latency_model as L
    import pqd.structured.search as S

    never = lambda *a, **k: pytest.fail("widths_from must not measure")  # noqa: E731
    monkeypatch.setattr(L, "measure_int8", never)
    monkeypatch.setattr(S, "measure_int8", never)
    model = Plain(num_classes=4, c=32)
    dense = ChannelGraph(model, torch.zeros(2, 3, 16, 16)).widths()
    half = {g: max(8, c // 2) for g, c in dense.items()}
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(
        json.dumps({"stage_records": [{"stage": "structured", "records": {"widths": half, "measured_ms": 0.1}}]})
    )
    tc = TrainConfig(batch_size=32, progress=False)
    out, rec = structured_prune(
        Student(model), StructuredConfig(widths_from=str(run)), data=tiny_data, epochs=0, train_config=tc
    )
    assert ChannelGraph(out.model, torch.zeros(2, 3, 16, 16)).widths() == half
    assert rec["widths_from"] == str(run) and rec["measured_ms"] == 0.1
    (run / "metrics.json").write_text(json.dumps({"stage_records": [{"records": {"widths": {**half, "nope": 8}}}]}))
    with pytest.raises(ConfigError, match="do not fit"):
        structured_prune(
            Student(model), StructuredConfig(widths_from=str(run)), data=tiny_data, epochs=0, train_config=tc
        )
    with pytest.raises(ConfigError, match="not a finished run folder"):
        structured_prune(
            Student(model), StructuredConfig(widths_from=str(tmp_path)), data=tiny_data, epochs=0, train_config=tc
        )
