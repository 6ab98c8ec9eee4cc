import pytest
import torch

from pqd.compress.sparsity import prunable_layers
from pqd.compress.student import Student
from pqd.config import TrainConfig
from pqd.errors import ConfigError
from pqd.models.registry import create_model
from pqd.models.reinit import reinitialize
from pqd.run.config import RunConfig
from pqd.run.metrics import Metrics
from pqd.run.pipeline import run_pipeline
from pqd.stages.imp import ImpConfig, imp, segments
from pqd.stages.protocol import get_stage
from pqd.train.loop import epoch_seed

CFG = TrainConfig(batch_size=32, progress=False, weight_decay=0.0)


def _model():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=4, width=0.125)


def test_segments_split_epochs_and_need_one_per_segment():
    assert segments(7, 2) == [2, 2, 3]
    assert segments(3, 2) == [1, 1, 1]
    with pytest.raises(ConfigError, match="at least 3 epochs"):
        segments(2, 2)


def test_registered_by_name_and_letter():
    assert get_stage("L").name == "imp" and get_stage("lottery").name == "imp"
    cfg = RunConfig.from_dict({"stages": "L:6,Q:2,D:2"})
    assert cfg.stage_string() == "L:6,Q:2,D:2" and not get_stage("imp").quantizes
    with pytest.raises(ConfigError, match="imp.rewind"):
        RunConfig.from_dict({"imp": {"rewind": "later"}})
    assert ImpConfig(rounds=2, fraction=0.5).sparsity == pytest.approx(0.75)


@pytest.mark.parametrize("rewind", ["start", "init"])
def test_survivors_are_rewound_and_mask_hits_sparsity(tiny_data, rewind):
    """With lr 0 training leaves the weights alone, so after IMP every surviving weight must equal
    the rewind point's value exactly, and the pruned ones must be zero."""
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = reinitialize(model, seed=epoch_seed(0, "imp-init", 0)).state_dict() if rewind == "init" else start
    out = imp(
        Student(model),
        ImpConfig(rounds=2, fraction=0.5, rewind=rewind, lr=0.0),
        data=tiny_data,
        epochs=3,
        train_config=CFG,
        seed=0,
    )
    layers = prunable_layers(out.model, ("@first",))
    assert set(out.masks) == set(layers)
    pruned = sum(int((~m).sum()) for m in out.masks.values()) / sum(m.numel() for m in out.masks.values())
    assert pruned == pytest.approx(0.75, abs=1e-3)
    for path, mask in out.masks.items():
        w = out.model.get_submodule(path).weight.detach()
        assert torch.all(w[~mask] == 0)
        assert torch.equal(w[mask], before[f"{path}.weight"][mask])
        if rewind == "init":  # a fresh init, not the weights the stage started from
            assert not torch.equal(w[mask], start[f"{path}.weight"][mask])
    assert out.records["imp"]["history"][0]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_late_rewind_past_first_segment_is_refused(tiny_data):
    with pytest.raises(ConfigError, match="past the first training segment"):
        imp(Student(_model()), ImpConfig(rounds=2, rewind=2), data=tiny_data, epochs=3, train_config=CFG)


def test_winning_ticket_mask_survives_qat_and_kd(digits_config, tmp_path):
    cfg = RunConfig.from_dict(
        digits_config | {"stages": "L:3,Q:1,D:1", "imp": {"rounds": 2, "fraction": 0.5, "rewind": 1}}
    )
    m = run_pipeline(cfg, tmp_path)
    assert m["stages"] == "L:3,Q:1,D:1" and m["final_form"] == "int8"
    assert m["sparsity"]["target"] == pytest.approx(0.75)
    assert m["sparsity"]["achieved"] == pytest.approx(0.75, abs=0.01)
    assert m["sparsity"]["achieved_int8"] >= 0.75 - 0.01
    assert [r["letter"] for r in m["stage_records"]] == ["L", "Q", "D"]
    assert Metrics.from_dict(m).stage_label == "L>Q>D"  # the sweep table's stage_order column
    assert m["stage_records"][0]["records"]["segments"] == [1, 1, 1]
    assert not [p for p in tmp_path.rglob("*.safetensors") if "segment" in p.name or "rewind" in p.name]


def test_interrupted_imp_resumes_to_the_same_ticket(tiny_data, tmp_path, monkeypatch):
    import pqd.stages.imp as imp_module

    cfg = ImpConfig(rounds=2, fraction=0.5, rewind=1, lr=0.05)
    clean = imp(
        Student(_model()),
        cfg,
        data=tiny_data,
        epochs=3,
        train_config=CFG,
        seed=0,
        checkpoint=tmp_path / "a" / "epoch.safetensors",
    )
    assert not list((tmp_path / "a").glob("*.safetensors")), "segment and rewind files are removed at the end"

    real_train = imp_module.train

    def interrupted(*args, **kwargs):
        if kwargs.get("tag") == "imp1":
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(imp_module, "train", interrupted)
    ckpt = tmp_path / "b" / "epoch.safetensors"
    with pytest.raises(KeyboardInterrupt):
        imp(Student(_model()), cfg, data=tiny_data, epochs=3, train_config=CFG, seed=0, checkpoint=ckpt)
    assert (tmp_path / "b" / "epoch.rewind.safetensors").is_file() and (
        tmp_path / "b" / "epoch.segment0.safetensors"
    ).is_file()
    monkeypatch.setattr(imp_module, "train", real_train)
    resumed = imp(Student(_model()), cfg, data=tiny_data, epochs=3, train_config=CFG, seed=0, checkpoint=ckpt)
    assert all(torch.equal(resumed.masks[k], clean.masks[k]) for k in clean.masks)
    state = resumed.model.state_dict()
    assert all(torch.allclose(state[k].float(), v.float(), atol=1e-6) for k, v in clean.model.state_dict().items())
