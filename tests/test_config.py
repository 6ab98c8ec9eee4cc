import pytest
import yaml

from pqd.errors import ConfigError
from pqd.run.config import RunConfig, load_config, parse_stages


def test_defaults_round_trip():
    c = RunConfig()
    assert RunConfig.from_dict(c.to_dict()) == c
    assert c.stage_string() == "P:20,Q:40,D:40"


def test_stage_string_parsing_all_orders():
    specs = parse_stages("q:3, D:1,prune:2")
    assert [(s.stage, s.epochs) for s in specs] == [("quantize", 3), ("distill", 1), ("prune", 2)]


@pytest.mark.parametrize(
    "data, key, fragment",
    [
        ({"prun": {}}, "prun", "Did you mean 'prune'"),
        ({"prune": {"sparsty": 0.5}}, "prune.sparsty", "Did you mean 'prune.sparsity'"),
        ({"prune": {"sparsity": 1.0}}, "prune.sparsity", "< 1.0"),
        ({"prune": {"sparsity": -0.1}}, "prune.sparsity", "minimum"),
        ({"prune": {"schedule": "linear"}}, "prune.schedule", "'gradual', 'oneshot'"),
        ({"model": {"name": "resnet19"}}, "model.name", "resnet18"),
        ({"data": {"dataset": "imagenet"}}, "data.dataset", "cifar10"),
        ({"train": {"batch_size": "big"}}, "train.batch_size", "integer"),
        ({"train": {"nesterov": "yes"}}, "train.nesterov", "true or false"),
        ({"teacher": {"epochs": -1}}, "teacher.epochs", "minimum"),
        ({"teacher": {"epochs": 0}}, "teacher.epochs", "weights"),
        ({"stages": "Q:2,P:2,Q:1"}, "stages", "quantizes 2 times"),
        ({"stages": "P:2,P:0"}, "prune.schedule", "oneshot"),  # each repeat is checked
        ({"stages": "X:2"}, "stages", "P/prune"),
        ({"stages": "P:x"}, "stages", "integer"),
        ({"stages": "Q:0,D:2", "quantize": {"mode": "ptq"}}, "quantize.mode", "last stage"),
        ({"stages": "P:2,Q:3", "quantize": {"mode": "ptq"}}, "stages", "no epochs"),
        ({"stages": "P:2,Q:0"}, "stages", "ptq"),
        ({"stages": "P:0"}, "prune.schedule", "oneshot"),
        ({"data": {"dataset": "folder"}}, "data.root", "train/<class>"),
        ({"measure": {"batch_sizes": []}}, "measure.batch_sizes", "positive"),
    ],
)
def test_bad_configs_name_the_key(data, key, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(data)
    msg = str(err.value)
    assert msg.startswith(key + ":"), msg
    assert fragment in msg


def test_load_config_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"stages": "P:1,Q:1", "prune": {"sparsity": 0.5}}))
    c = load_config(p, ["prune.sparsity=0.8", "model.width=0.5", "stages=D:3,P:1"])
    assert c.prune.sparsity == 0.8 and c.model.width == 0.5
    assert c.stage_string() == "D:3,P:1"


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["prune.sparsity"])


def test_configs_are_frozen():
    c = RunConfig()
    with pytest.raises(AttributeError):
        c.seed = 3


def test_stage_lists_may_repeat_or_be_empty():
    assert RunConfig.from_dict({"stages": "P:2,P:2,Q:1"}).stage_string() == "P:2,P:2,Q:1"
    for dense in ("", "dense", [], None):
        cfg = RunConfig.from_dict({"stages": dense})
        assert cfg.stages == () and cfg.stage_string() == "" and not cfg.quantizes
    assert RunConfig.from_dict(RunConfig.from_dict({"stages": ""}).to_dict()).stages == ()
