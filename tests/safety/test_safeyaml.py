"""Bounded YAML reading (YAML bombs, deep nesting, huge grids) and the `1e-3` float."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from pqd.errors import ConfigError
from pqd.safety.safeyaml import grid_size_guard, load_yaml, parse_scalar


def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "\n".join(lines) + "\n"


def test_billion_laughs_refused_fast():
    text = billion_laughs()
    assert len(text.encode()) < 900  # a bomb of well under 1 kB
    # plain safe_load accepts it: the data is a DAG that expands to 9**9 strings when walked
    assert len(yaml.safe_load(text)["b"]) == 9
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="YAML bomb"):
        load_yaml(text)
    assert time.perf_counter() - t0 < 2.0


def test_alias_count_limit_and_small_limits():
    text = "x: &x 1\ny: [" + ",".join(["*x"] * 50) + "]\n"
    assert load_yaml(text)["y"] == [1] * 50
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml(text, max_aliases=10)
    with pytest.raises(ConfigError, match="YAML bomb"):
        load_yaml(text, max_nodes=20)


def test_deep_nesting_is_a_clear_error_not_recursion(tmp_path: Path):
    p = tmp_path / "deep.yaml"
    p.write_text("[" * 5000 + "]" * 5000)  # 10 KB
    with pytest.raises(ConfigError, match="nested deeper than 64"):
        load_yaml(p)
    assert load_yaml("[" * 10 + "]" * 10, max_depth=11) == [[[[[[[[[[]]]]]]]]]]


def test_size_limit_checked_before_reading(tmp_path: Path):
    p = tmp_path / "big.yaml"
    p.write_text("a: 1\n" + "#" * 5000 + "\n")
    with pytest.raises(ConfigError, match="more than the 1,000"):
        load_yaml(p, max_bytes=1000)
    assert load_yaml(p) == {"a": 1}


def test_invalid_and_non_utf8(tmp_path: Path):
    with pytest.raises(
        ConfigError,
        match=r"^YAML text is not valid YAML at line 1, column 9: while parsing a flow sequence, "
        r"expected ',' or '\]', but got '<stream end>'$",
    ):
        load_yaml("a: [1, 2")
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot be read as text: it is not UTF-8"):
        load_yaml(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="special characters are not allowed"):
        parse_scalar("\x1f")  # found by the config fuzzer: the reader fails while the loader is built
    # only plain data: python tags are refused as by SafeLoader
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml("!!python/object/apply:os.system ['true']")


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-3", 1e-3),
        ("-2E5", -2e5),
        ("+3e+2", 300.0),
        ("1.0e-3", 1e-3),
        ("1.5", 1.5),
        (".5e-1", 0.05),
        ("10", 10),
        ("0x10", 16),
        ("1_000", 1000),
        (".inf", float("inf")),
        ("1e", "1e"),
        ("e5", "e5"),
        ("1.2.3", "1.2.3"),
    ],
)
def test_float_resolver(text, value):
    assert parse_scalar(text) == value
    assert type(parse_scalar(text)) is type(value)
    # the float rule must not leak into PyYAML's global SafeLoader
    if text == "1e-3":
        assert yaml.safe_load(text) == "1e-3"


def test_floats_inside_documents():
    assert load_yaml("prune: {lr: 1e-3, sparsity: 5e-1}\nteacher: {lr: [2E-2]}") == {
        "prune": {"lr": 1e-3, "sparsity": 0.5},
        "teacher": {"lr": [0.02]},
    }


def test_grid_size_guard():
    grid = {f"axis{i}": list(range(10)) for i in range(8)}  # 10**8 combinations
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="100,000,000 runs"):
        grid_size_guard(grid)
    assert time.perf_counter() - t0 < 2.0  # counted, not enumerated: listing 10**8 runs would take minutes
    assert grid_size_guard({"seed": [0, 1], "prune.sparsity": [0.5, 0.9]}, limit=4) == 4
    assert grid_size_guard({}) == 1
    with pytest.raises(ConfigError, match="expected a list"):
        grid_size_guard({"seed": "0,1"})


def test_duplicate_keys_refused_but_merge_overrides_allowed():
    with pytest.raises(ConfigError, match=r"key 'sparsity' appears twice in one mapping \(lines 2 and 4\)"):
        load_yaml("prune:\n  sparsity: 0.5\n  lr: 0.01\n  sparsity: 0.9\n")
    assert load_yaml("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  y: 3\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3}}
    assert load_yaml("{1: a, '1': b}") == {1: "a", "1": "b"}
