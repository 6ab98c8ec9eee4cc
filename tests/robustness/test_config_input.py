"""Config and CLI input: every bad value is a ConfigError naming its key, found before any work.

Property-based: generated config dicts (random keys, values and nesting; valid, nearly valid and
invalid) either give a RunConfig or raise ConfigError whose message starts with a key; never
another exception type. Through the CLI, bad configs, overrides and paths exit with code 2 and a
one-line ``pqd: error:``, without a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rbhelpers import tiny, write_config

from pqd.cli import main
from pqd.errors import ConfigError, PqdError
from pqd.run.config import RunConfig, load_config

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_paths() -> dict[str, list[str]]:
    """Section name -> its field names (top-level scalars map to [])."""
    return {
        key: [g.name for g in dataclasses.fields(cls)] if cls is not None else []
        for key, cls in RunConfig.schema().items()
    }


SECTIONS = _valid_paths()
STAGE_KEYS = ["stage", "epochs"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**1100), max_value=2**1100),
    st.integers(min_value=-3, max_value=60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-0.5, max_value=1.5),
    st.text(max_size=12),
    st.sampled_from(
        [
            "P:2,Q:2,D:2",
            "Q:0",
            "resnet18",
            "vgg16_bn",
            "digits",
            "folder",
            "qat",
            "ptq",
            "oneshot",
            "gradual",
            "random",
            "@first",
            "@last",
            "a:b",
            ":",
            "..x:y",
            "",
            "mod.sub:factory",
            "yes",
            "1e3",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def section_dicts(draw, section: str):
    keys = st.sampled_from(SECTIONS[section]) | st.text(max_size=10)
    return draw(st.dictionaries(keys, values, max_size=4))


@st.composite
def config_dicts(draw):
    """Top-level dicts mixing real section names (with random contents) and random keys."""
    out = {}
    for key in draw(st.lists(st.sampled_from(list(SECTIONS)) | st.text(max_size=8), max_size=6)):
        if key in SECTIONS and SECTIONS[key] and draw(st.booleans()):
            out[key] = draw(section_dicts(key))
        elif key == "stages" and draw(st.booleans()):
            out[key] = draw(
                st.lists(
                    st.dictionaries(st.sampled_from(STAGE_KEYS) | st.text(max_size=5), values, max_size=3), max_size=4
                )
            )
        else:
            out[key] = draw(values)
    return out


@st.composite
def mutated_configs(draw):
    """A valid tiny config with one leaf replaced (or added) by a random value: reaches the deep checks."""
    cfg = tiny()
    section = draw(st.sampled_from(list(SECTIONS)))
    if SECTIONS[section]:
        sub = dict(cfg.get(section, {}))
        sub[draw(st.sampled_from(SECTIONS[section]) | st.text(max_size=6))] = draw(values)
        cfg[section] = sub
    else:
        cfg[section] = draw(values)
    return cfg


def _key_paths(data, prefix: str = "") -> set[str]:
    """Every dotted key path in ``data`` ('model', 'model.width', ...), list items as 'key[i]' and 'key[]'."""
    out = set()
    if isinstance(data, dict):
        for k, v in data.items():
            p = f"{prefix}{k}"
            out.add(p)
            out |= _key_paths(v, p + ".")
    elif isinstance(data, list):
        base = prefix.rstrip(".")
        out.add(base + "[]")
        for i, v in enumerate(data):
            out |= {f"{base}[{i}]"} | _key_paths(v, base + "[].")
    return out


KNOWN = {"config", "stages"} | {f"{s}.{f}" for s, fs in SECTIONS.items() for f in fs} | set(SECTIONS)
KNOWN |= {f"stages[].{k}" for k in STAGE_KEYS} | {f"stages.{s}.epochs" for s in ("prune", "quantize", "distill")}


def _check(data) -> RunConfig | None:
    try:
        cfg = RunConfig.from_dict(data)
    except ConfigError as exc:
        msg = str(exc)
        keys = KNOWN | _key_paths(data)
        assert any(msg.startswith((k + ":", k + "[")) for k in keys), f"error does not start with a key: {msg!r}"
        return None
    # anything accepted must survive the config.yaml round trip that resuming compares against
    d = cfg.to_dict()
    assert yaml.safe_load(yaml.safe_dump(d, sort_keys=False)) == d
    assert RunConfig.from_dict(d) == cfg
    return cfg


@FUZZ
@given(config_dicts())
def test_random_config_dicts_give_a_config_or_a_config_error(data):
    _check(data)


@FUZZ
@given(mutated_configs())
def test_nearly_valid_configs_give_a_config_or_a_config_error(data):
    _check(data)


@FUZZ
@given(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.floats()))
def test_a_config_that_is_not_a_mapping_is_a_config_error(data):
    if data is None:
        assert RunConfig.from_dict(data) == RunConfig()
        return
    with pytest.raises(ConfigError, match=r"^config:"):
        RunConfig.from_dict(data)


override_keys = st.sampled_from([f"{s}.{f}" for s, fs in SECTIONS.items() for f in fs] + list(SECTIONS)) | st.text(
    max_size=12
)
override_values = st.text(max_size=12) | st.sampled_from(
    ["[a", "{", "]", "!!python/object:os.system", "*x", "&a [1", ": :", "'", "- - -"]
)


@FUZZ
@given(
    st.lists(
        st.tuples(override_keys, override_values).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=12), max_size=3
    )
)
def test_random_overrides_give_a_config_or_a_config_error(overrides):
    with contextlib.suppress(ConfigError):
        load_config(None, overrides)


def test_gaps_found_by_fuzzing_are_config_errors():
    """Each of these raised a non-pqd exception (or nothing) before the robustness pass."""
    cases = {
        "config": [1, 2],
        "prune.sparsity": {"prune": {"sparsity": 10**400}},  # OverflowError converting to float
        "seed": {"seed": 2**70},  # torch.manual_seed overflowed at run start
        "train.threads": {"train": {"threads": 10**30}},  # torch.set_num_threads overflowed
        "model.name": {"model": {"name": ":"}},  # ValueError: Empty module name, at run time
        "stages.prune.epochs": {"stages": [{"stage": "prune", "epochs": -1}]},  # was 'stages[].stages.prune.epochs'
    }
    for key, data in cases.items():
        with pytest.raises(ConfigError, match=rf"^{key}:"):
            RunConfig.from_dict(data)
    for bad in ("..x:y", "mod:", "a b:c", "mod:fac tory"):
        with pytest.raises(ConfigError, match="model.name: .*import path"):
            RunConfig.from_dict({"model": {"name": bad}})
    with pytest.raises(ConfigError, match=r"--set 'prune.exclude=\[a': prune.exclude: .*not valid YAML"):
        load_config(None, ["prune.exclude=[a"])


# ---- through the CLI: exit code 2, 'pqd: error:', no traceback ----------------------------------


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert sum(line.startswith("pqd: error: ") for line in err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "content, overrides, fragment",
    [
        ("prune: {sparsity: 1.0}\n", [], "prune.sparsity"),
        ("prune: {sparsty: 0.5}\n", [], "Did you mean 'prune.sparsity'"),
        ("model: {name: resnet81}\n", [], "resnet18"),
        ("data: {dataset: imagenet}\n", [], "'cifar10'"),
        ("stages: X:2\n", [], "unknown stage 'X'"),
        ("stages: Q:2,D:2,Q:1\n", [], "quantizes 2 times"),
        ("teacher: {epochs: 0}\n", [], "teacher.weights"),  # KD (and every stage) needs a teacher source
        ("teacher: {epochs: -3}\n", [], "teacher.epochs"),
        ("- a\n- b\n", [], "must hold a mapping"),
        ("a: [unclosed\n", [], "not valid YAML"),
        ("seed: 0\n", ["prune.exclude=[a"], "not valid YAML"),
        ("seed: 0\n", ["prune.sparsity"], "KEY=VALUE"),
        ("seed: 0\n", ["seed.x=1"], "not a section"),
        ("seed: 0\n", ["seed=123456789012345678901234567890"], "seed:"),
        ("seed: 0\n", ["model.name=..evil:x"], "import path"),
        ("seed: 0\n", ["train.batch_size=1.5"], "train.batch_size: expected an integer"),
        ("seed: " + "9" * 5000 + "\n", [], "an integer of 5,000 digits at line 1"),
        ("seed: 0\n", ["seed=" + "1" * 4301], "an integer of 4,301 digits"),
        ("seed: 0\n", ["prune.sparsity=-" + "1" * 4400], "an integer of 4,400 digits"),
    ],
)
def test_bad_config_or_override_exits_2(capsys, tmp_path, content, overrides, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    err = _cli_error(
        capsys, ["run", str(cfg), "--out", str(tmp_path / "run"), *sum((["--set", o] for o in overrides), [])]
    )
    assert fragment in err
    assert not (tmp_path / "run").exists(), "a bad config must be refused before the run directory is made"


def test_a_huge_integer_in_a_sweep_file_is_a_config_error(capsys, tmp_path):
    (tmp_path / "s.yaml").write_text("base: {seed: 0}\nvariants: {a: {seed: " + "7" * 4400 + "}}\n")
    err = _cli_error(capsys, ["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "sw")])
    assert "an integer of 4,400 digits" in err
    assert not (tmp_path / "sw").exists()


def test_bad_config_paths_exit_2(capsys, tmp_path):
    out = str(tmp_path / "run")
    assert "does not exist" in _cli_error(capsys, ["run", str(tmp_path / "missing.yaml"), "--out", out])
    assert "is a directory" in _cli_error(capsys, ["run", str(tmp_path), "--out", out])
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff\xfe\xfa")
    assert "cannot be read as text" in _cli_error(capsys, ["run", str(binary), "--out", out])


def test_bad_out_paths_exit_2(capsys, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny())
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert "is a file" in _cli_error(capsys, ["run", str(cfg), "--out", str(a_file)])
    assert "Not a directory" in _cli_error(capsys, ["run", str(cfg), "--out", str(a_file / "run")])
    assert a_file.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_out_dir_exits_2(capsys, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny())
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert "Permission denied" in _cli_error(capsys, ["run", str(cfg), "--out", str(locked / "run")])
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (a directory nobody can write into)")
def test_out_dir_on_a_read_only_tree_exits_2(capsys, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny())
    assert "cannot be used as the run directory" in _cli_error(capsys, ["run", str(cfg), "--out", "/proc/self/pqd-run"])


def test_corrupt_config_yaml_in_run_dir_exits_2(capsys, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny())
    out = tmp_path / "run"
    out.mkdir()
    from pqd.safety.fsguard import mark_dir

    mark_dir(
        out, kind="run"
    )  # a pqd run folder whose config.yaml got damaged (an unmarked one is refused as not pqd's)
    (out / "config.yaml").write_bytes(b"seed: [\xff")
    assert "config.yaml cannot be read" in _cli_error(capsys, ["run", str(cfg), "--out", str(out)])


def test_fixing_a_config_error_lets_the_same_out_dir_be_reused(capsys, tmp_path):
    """A run that failed before computing anything holds no results: the corrected command must not
    be refused as 'a different config' (it was, since config.yaml is written first)."""
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny(model={"width": 1.0}, teacher={"epochs": 0, "weights": str(tmp_path / "missing.safetensors")}),
    )
    assert "missing.safetensors" in _cli_error(capsys, ["run", str(cfg), "--out", str(out)])
    assert (out / "config.yaml").exists() and not (out / "teacher.safetensors").exists()
    # fixed config (a different one) into the same directory: accepted; stop it at the model step to stay fast
    assert "model factory 'pqd_user_models:not_a_module' returned str" in _cli_error(
        capsys,
        [
            "run",
            str(cfg),
            "--out",
            str(out),
            "--set",
            "teacher.weights=null",
            "--set",
            "teacher.epochs=1",
            "--set",
            "model.name=pqd_user_models:not_a_module",
        ],
    )
    assert "pqd_user_models:not_a_module" in (out / "config.yaml").read_text()


def test_model_import_errors_are_model_errors(capsys, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny(model={"width": 1.0}))  # user factories take no width
    out = str(tmp_path / "run")
    for name, fragment in [
        ("no_such_module_xyz:factory", "cannot import module 'no_such_module_xyz'"),
        ("pqd_user_models:missing", "has no attribute 'missing'"),
        (
            "pqd_user_models:broken",
            "model factory 'pqd_user_models:broken' failed: RuntimeError: the user's factory failed",
        ),
        ("pqd_user_models:not_a_module", "returned str, not a torch.nn.Module"),
    ]:
        assert fragment in _cli_error(capsys, ["run", str(cfg), "--out", out, "--set", f"model.name={name}"])


def test_every_pqd_error_is_a_pqd_error_subclass():
    from pqd import errors

    for name in ("ConfigError", "DataError", "ModelError", "CheckpointError"):
        assert issubclass(getattr(errors, name), PqdError)
