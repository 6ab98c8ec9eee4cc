"""The README's examples are executed, so they cannot rot."""

import re
from pathlib import Path

import yaml

from pqd.run.config import RunConfig

README = (Path(__file__).parents[1] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may save files (e.g. model_int8.pt)
    blocks = _blocks("python")
    assert blocks, "README lost its Python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_yaml_config_is_valid_and_complete():
    (block,) = _blocks("yaml")
    data = yaml.safe_load(block)
    cfg = RunConfig.from_dict(data)
    assert set(data) == set(cfg.to_dict()), "README config must list every section"
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            assert set(data[section]) == set(values), f"README config section {section!r} is incomplete"
