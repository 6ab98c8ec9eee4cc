"""pqd sweep: expansion, teacher sharing, skip/resume, results table, executors."""

from __future__ import annotations

import json
import sqlite3
import sys

import pytest

import pqd.run.pipeline
import pqd.stages.protocol  # noqa: F401 (loads the stage modules the spies patch)
from pqd.commands.sweep import TIMING_COLUMNS, expand, finished_metrics, read_table, run_sweep, teacher_identity
from pqd.errors import ConfigError, PqdError
from pqd.run.config import RunConfig


def _base():
    return {
        "seed": 0,
        "model": {"name": "resnet18", "width": 0.125},
        "data": {"dataset": "digits", "train_subset": 256, "test_subset": 128},
        "train": {"batch_size": 64, "progress": False},
        "teacher": {"epochs": 2, "lr": 0.05},
        "prune": {"sparsity": 0.5},
        "measure": {"threads": 1, "warmup": 1, "runs": 3, "batch_sizes": [1], "large_batch_runs": 1},
    }


SPEC = {
    "name": "tiny",
    "base": _base(),
    "grid": {"seed": [0]},
    "variants": {
        "dense": {"stages": ""},
        "prune": {"stages": "P:1"},
        "qat": {"stages": "Q:1"},
        "pd": {"stages": "P:1,D:1"},
    },
}


# ---------------------------------------------------------------------------- expansion (no training)


def test_expand_variants_times_seeds_and_variant_grids(tmp_path):
    spec = {
        "base": _base(),
        "grid": {"seed": [0, 1, 2]},
        "variants": {
            "dense": {"stages": ""},
            "pqd": {"stages": "P:1,Q:1,D:1"},
            "ptq": {"stages": "Q:0", "quantize.mode": "ptq", "quantize": {"calibration_batches": 2}},
            "sp": {"stages": "P:1", "grid": {"prune.sparsity": [0.3, 0.6], "seed": [5]}},
        },
    }
    sweep = expand(spec, tmp_path)
    ids = [r.run_id for r in sweep.pipelines()]
    assert ids == [
        "pqd__seed0",
        "pqd__seed1",
        "pqd__seed2",
        "ptq__seed0",
        "ptq__seed1",
        "ptq__seed2",
        "sp__seed5__sparsity0.3",
        "sp__seed5__sparsity0.6",
    ]
    # one teacher per seed (the teacher identity does not depend on stages / prune / quantize settings)
    teachers = sweep.teachers()
    assert sorted(t.config.seed for t in teachers) == [0, 1, 2, 5]
    assert {t.variant for t in teachers if t.config.seed != 5} == {"dense"}  # the dense variant names its teacher run
    assert next(t for t in teachers if t.config.seed == 5).variant == "teacher"
    by_id = {r.run_id: r for r in sweep.runs}
    ptq = by_id["ptq__seed1"].config
    assert (ptq.quantize.mode, ptq.quantize.calibration_batches, ptq.seed) == ("ptq", 2, 1)
    assert by_id["sp__seed5__sparsity0.6"].config.prune.sparsity == 0.6
    assert by_id["pqd__seed1"].teacher_id == by_id["ptq__seed1"].teacher_id != by_id["pqd__seed0"].teacher_id
    # pipeline runs load the shared teacher from the teacher run's directory, named relative to the
    # sweep folder (a copied or moved sweep folder resumes)
    w = by_id["pqd__seed1"].config.teacher.weights
    assert w == f"runs/teacher-{by_id['pqd__seed1'].teacher_id}/teacher.safetensors"
    assert all(r.config_dict()["stages"] == "" for r in teachers)
    # execution order: each teacher right before the runs that use it
    order = [r.run_id for r in sweep.ordered()]
    assert (
        order.index(f"teacher-{by_id['pqd__seed1'].teacher_id}")
        < order.index("pqd__seed1")
        < order.index(f"teacher-{by_id['pqd__seed2'].teacher_id}")
    )


def test_teacher_identity_ignores_stage_settings_but_not_training():
    a = RunConfig.from_dict(_base() | {"stages": "P:1"}).to_dict()
    b = RunConfig.from_dict(_base() | {"stages": "Q:3", "prune": {"sparsity": 0.9}}).to_dict()
    c = RunConfig.from_dict(_base() | {"stages": "P:1", "teacher": {"epochs": 3, "lr": 0.05}}).to_dict()
    d = RunConfig.from_dict(_base() | {"stages": "P:1", "seed": 1}).to_dict()
    assert teacher_identity(a) == teacher_identity(b)
    assert len({teacher_identity(x) for x in (a, c, d)}) == 3


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"variants": {"a": {"stages": "P:1"}, "b": {"stages": "P:1"}}}, "same config"),
        ({"variants": {"a": {"stages": "P:1", "prune.sparsty": 0.5}}}, "sparsity"),
        ({"variants": {}}, "non-empty"),
        ({"variants": {"a": {"stages": "P:1"}}, "grid": {"seed": 3}}, "list"),
        ({"variants": {"a": {"stages": "P:1"}}, "extra": 1}, "unknown top-level"),
        ({"variants": {"a": "P:1"}}, "expected a mapping"),
    ],
)
def test_bad_sweeps_are_refused(spec, match):
    with pytest.raises(ConfigError, match=match):
        expand({"base": _base()} | spec)


# ---------------------------------------------------------------------------- running (one tiny sweep, shared)


class _Killed(BaseException):  # like KeyboardInterrupt / SystemExit: stops the whole sweep
    pass


@pytest.fixture(scope="session")
def swept(tmp_path_factory):
    """Run SPEC three times: killed during 'pd''s distill stage, resumed, then again (all finished).

    Records how often the teacher was trained and the stages ran in each attempt.
    """
    out = tmp_path_factory.mktemp("sweep")
    # teacher training (pqd.run.pipeline.train) and the stage functions the registry's adapters call
    where = {"train": pqd.run.pipeline, **{n: sys.modules[f"pqd.stages.{n}"] for n in ("prune", "quantize", "distill")}}
    real = {n: getattr(where[n], n) for n in where}
    calls = []

    def spy(name, die=False):
        def f(*a, **k):
            calls[-1][name] += 1
            if die:
                raise _Killed("simulated kill")
            return real[name](*a, **k)

        return f

    rows = []
    for attempt in range(3):
        calls.append({n: 0 for n in real})
        with pytest.MonkeyPatch.context() as mp:
            for n in real:
                mp.setattr(where[n], n, spy(n, die=(attempt == 0 and n == "distill")))
            if attempt == 0:
                with pytest.raises(_Killed):
                    run_sweep(SPEC, out, progress=False)
                rows.append(read_table(out))
                pd_dir = out / "runs" / "pd__seed0"
                killed_state = {
                    "prune_done": (pd_dir / "stages" / "1_prune" / "student.safetensors").is_file(),
                    "metrics": (pd_dir / "metrics.json").exists(),
                }
            else:
                rows.append(run_sweep(SPEC, out, progress=False))
    return out, calls, rows, killed_state


def test_teacher_trained_once_and_shared(swept):
    out, calls, rows, killed_state = swept
    assert calls[0]["train"] == 1, "one teacher for 3 pipeline runs: trained exactly once"
    final = {r["run_id"]: r for r in rows[-1]}
    teacher = next(r for r in final.values() if r["kind"] == "teacher")
    for rid in ("prune__seed0", "qat__seed0", "pd__seed0"):
        assert final[rid]["teacher_top1"] == teacher["final_top1"] == teacher["teacher_top1"]
        cfg = json.loads(final[rid]["config_json"])
        assert cfg["teacher"]["weights"].endswith(f"runs/{teacher['run_id']}/teacher.safetensors")
    assert (out / "runs" / teacher["run_id"] / "teacher.safetensors").is_file()


def test_resume_after_kill_finishes_only_what_is_missing(swept):
    out, calls, rows, killed_state = swept
    assert sorted(r["variant"] for r in rows[0]) == ["dense", "prune", "qat"]  # pd was killed
    assert killed_state == {"prune_done": True, "metrics": False}  # killed inside its second stage
    # attempt 2: no teacher training, pd's finished prune stage restored, only its distill stage runs
    assert calls[1] == {"train": 0, "prune": 0, "quantize": 0, "distill": 1}
    assert len(rows[1]) == 4
    # attempt 3: everything finished -> nothing recomputed
    assert calls[2] == {"train": 0, "prune": 0, "quantize": 0, "distill": 0}


def test_finished_runs_are_skipped_without_touching_the_pipeline(swept, monkeypatch):
    out, _, rows, _ = swept

    def boom(*a, **k):
        raise AssertionError("a finished run was executed again")

    monkeypatch.setattr(pqd.run.pipeline, "run_pipeline", boom)  # the one path for teacher (dense) and pipeline runs
    again = run_sweep(SPEC, out, progress=False)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "recorded_at"} for r in rs]  # noqa: E731
    assert strip(again) == strip(rows[-1])


def test_result_table_holds_flat_keys_full_config_and_metrics(swept):
    out, _, rows, _ = swept
    table = {r["run_id"]: r for r in rows[-1]}
    assert len(table) == 4
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 4
    for r in table.values():
        m = json.loads((out / r["run_dir"] / "metrics.json").read_text())
        assert json.loads(r["metrics_json"]) == m
        cfg = json.loads(r["config_json"])
        assert (r["model"], r["width"], r["dataset"], r["seed"]) == ("resnet18", 0.125, "digits", 0)
        assert r["stages"] == cfg["stages"] == m["stages"]
        assert r["final_top1"] == m["accuracy"]["final_top1"] and r["size_final_bytes"] == m["size_bytes"]["final"]
        assert r["lat_teacher_label"] == "teacher FP32 @ PyTorch eager" and r["test_n"] == 128
        assert r["final_top1_ci_low"] <= r["final_top1"] <= r["final_top1_ci_high"]
        lat = {(x["model"], x["batch"]): x["median_ms"] for x in m["latency"]}
        assert r["lat_b1_teacher_ms"] == lat[("teacher_fp32", 1)]
        assert r["lat_b1_final_ms"] == lat[(f"final_{m['final_form']}", 1)]
    assert table["pd__seed0"]["stage_order"] == "P>D" and table["pd__seed0"]["sparsity_target"] == 0.5
    assert table["pd__seed0"]["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    assert table["qat__seed0"]["final_form"] == "int8" and table["qat__seed0"]["quantize_mode"] == "qat"
    assert table["qat__seed0"]["lat_final_label"] == "INT8 @ PyTorch TorchScript"
    assert table["qat__seed0"]["lat_speedup_kind"] == "pytorch_eager_vs_compiled"
    dense = next(r for r in table.values() if r["kind"] == "teacher")
    assert (dense["variant"], dense["stages"], dense["stage_order"], dense["final_form"]) == (
        "dense",
        "",
        "dense",
        "fp32",
    )
    assert dense["size_final_bytes"] == dense["size_teacher_bytes"]
    assert table["qat__seed0"]["size_final_bytes"] < dense["size_final_bytes"]


def test_finished_run_with_changed_config_is_refused(swept):
    out, _, _, _ = swept
    changed = {**SPEC, "variants": {**SPEC["variants"], "qat": {"stages": "Q:1", "quantize.lr": 0.001}}}
    run = next(r for r in expand(changed, out).runs if r.run_id == "qat__seed0")
    with pytest.raises(ConfigError, match="different config"):
        finished_metrics(out, run)


def test_missing_ray_names_the_extra(swept, monkeypatch):
    out, _, _, _ = swept
    monkeypatch.setitem(sys.modules, "ray", None)  # makes 'import ray' raise ImportError
    with pytest.raises(PqdError, match=r"pip install 'pqd\[ray\]'"):
        run_sweep(SPEC, out, executor="ray", progress=False)


def _comparable(rows, root):
    """Rows minus timings. A TorchScript file's size depends by a few hundred bytes on how many modules
    the process scripted before (mangled class names such as ___torch_mangle_12), so sizes are rounded."""
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k not in TIMING_COLUMNS}
        r["size_final_bytes"] = round(r["size_final_bytes"], -4)
        cfg = json.loads(r.pop("config_json"))
        if cfg["teacher"]["weights"]:
            cfg["teacher"]["weights"] = cfg["teacher"]["weights"].replace(str(root.resolve()), "ROOT")
        r["config"] = cfg
        out.append(r)
    return out


@pytest.mark.slow
def test_ray_executor_gives_the_local_table(swept, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    import os
    from pathlib import Path

    out, _, rows, _ = swept
    src = str(Path(pqd.run.pipeline.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_rows = run_sweep(SPEC, tmp_path, executor="ray", only=["pd"], progress=False)
    finally:
        ray.shutdown()
    assert sorted(r["variant"] for r in ray_rows) == ["dense", "pd"]  # pd and the teacher run it depends on
    ids = {r["run_id"] for r in ray_rows}
    assert _comparable(ray_rows, tmp_path) == _comparable([r for r in rows[-1] if r["run_id"] in ids], out)
    for r in ray_rows:  # metrics equal too, apart from timings
        m = json.loads(r["metrics_json"].replace(str(tmp_path.resolve()), "ROOT"))
        local = json.loads(
            next(x for x in rows[-1] if x["run_id"] == r["run_id"])["metrics_json"].replace(str(out.resolve()), "ROOT")
        )
        for k in ("latency", "speedup", "wall_time_s"):  # timings (and which model timed fastest) vary
            m.pop(k), local.pop(k)
        # the workers timed in the same controlled environment; only what each caller had set (and
        # the workers therefore ignored) differs between a Ray worker and this process
        env, local_env = m.pop("latency_env"), local.pop("latency_env")
        assert env["inherited"] is False and local_env["inherited"] is False
        assert env["variables"] == local_env["variables"]
        for rec in m["stage_records"] + local["stage_records"]:
            rec.pop("wall_time_s")
        assert m["size_bytes"].pop("final") == pytest.approx(local["size_bytes"].pop("final"), rel=0.01)
        assert m == local


def test_cli_sweep_dry_run_and_errors_exit_2(tmp_path, capsys):
    import yaml

    from pqd.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run", "--set", "prune.sparsity=0.6"]) == 0
    out = capsys.readouterr().out
    assert "pd__seed0" in out and "4 runs (1 teachers)" in out
    assert not (tmp_path / "o").exists()
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--set", "prune.sparsity=2"]) == 2
    assert "prune.sparsity" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no results table" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failing_run_does_not_stop_the_others(tmp_path, monkeypatch):
    spec = {
        **SPEC,
        "base": _base() | {"teacher": {"epochs": 1, "lr": 0.05}},
        "variants": {"qat": {"stages": "Q:1"}, "bad": {"stages": "D:1"}, "prune": {"stages": "P:1"}},
    }
    distill_module = sys.modules["pqd.stages.distill"]
    real = distill_module.distill

    def broken(*a, **k):
        raise RuntimeError("distill exploded")

    monkeypatch.setattr(distill_module, "distill", broken)
    with pytest.raises(PqdError, match=r"1 of 4 runs failed \(bad__seed0: distill exploded\)"):
        run_sweep(spec, tmp_path, progress=False)
    assert sorted(r["variant"] for r in read_table(tmp_path)) == [
        "prune",
        "qat",
        "teacher",
    ]  # the run after 'bad' ran too
    monkeypatch.setattr(distill_module, "distill", real)
    assert len(run_sweep(spec, tmp_path, progress=False)) == 4


# ---------------------------------------------------------------------------- peers, evidence columns


def test_peer_variant_expands_to_a_peer_run_after_its_teacher(tmp_path):
    spec = {
        **SPEC,
        "variants": {
            "dense": {"stages": ""},
            "qat": {"stages": "Q:1"},
            "nncf": {"peer": "nncf_ptq"},
            "nncf_long": {"peer": "nncf_ptq", "teacher.epochs": 3},
        },
    }
    sweep = expand(spec, tmp_path)
    peers = {r.variant: r for r in sweep.peers()}
    assert set(peers) == {"nncf", "nncf_long"}
    teachers = {t.teacher_id: t for t in sweep.teachers()}
    assert len(teachers) == 2 and peers["nncf"].teacher_id != peers["nncf_long"].teacher_id
    assert teachers[peers["nncf"].teacher_id].variant == "dense"  # the same teacher as the dense variant
    order = [r.run_id for r in sweep.ordered()]
    for p in peers.values():
        assert order.index(p.run_id) > order.index(f"teacher-{p.teacher_id}")
        assert p.kind == "peer" and p.peer == "nncf_ptq" and p.config.stages == ()
        assert p.config_dict()["peer"] == "nncf_ptq" and p.config_dict()["stages"] == ""
        assert p.config.teacher.weights.endswith(f"teacher-{p.teacher_id}/teacher.safetensors")
    with pytest.raises(ConfigError, match="not a known peer"):
        expand({**SPEC, "variants": {"x": {"peer": "tflite"}}})


@pytest.mark.parametrize("name", ["cifar10_evidence", "cifar100_evidence"])
def test_evidence_sweeps_dry_run(name, capsys):
    from pathlib import Path

    from pqd.cli import main

    path = Path(__file__).resolve().parents[3] / "configs" / "sweeps" / f"{name}.yaml"
    assert main(["sweep", str(path), "--out", "unused", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for run in ("PQD_kdoff__seed2", "ft_ce2__seed0", "nncf_ptq__seed1", "nncf_ptq_long__seed0"):
        assert run in out
    assert "peer:nncf_ptq" in out


@pytest.mark.slow
def test_peer_runs_in_the_sweep_table_with_runtime_labels_and_failures_do_not_stop_it(tmp_path, monkeypatch):
    import pqd.commands.peers
    from pqd.measure.speedup import speedup_summary

    def fake_peer_run(config, out_dir, *, peer):
        assert config.teacher.weights and (tmp_path / "runs").is_dir()
        from pathlib import Path

        assert Path(config.teacher.weights).is_file(), "the peer runs after its teacher"
        lat = [
            {
                "model": m,
                "batch": 1,
                "threads": 1,
                "median_ms": ms,
                "p90_ms": ms,
                "runtime": "openvino",
                "precision": p,
                "source_model": s,
            }
            for m, ms, p, s in (("openvino_fp32", 2.0, "fp32", "teacher"), ("nncf_ptq_int8", 1.0, "int8", "nncf_ptq"))
        ]
        ci = {"top1": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 128, "method": "wilson", "confidence": 0.95}
        m = {
            "kind": "peer",
            "peer": peer,
            "model": "resnet18",
            "width": 0.125,
            "dataset": "digits",
            "stages": "",
            "final_form": "int8",
            "accuracy": {
                "teacher_top1": 0.5,
                "final_top1": 0.5,
                "teacher_top1_ci": ci,
                "final_top1_ci": ci,
                "test_n": 128,
                "predictions_file": "nncf_int8_predictions.npy",
            },
            "size_bytes": {"final": 1000, "final_file": "nncf_int8.xml"},
            "latency": lat,
            "speedup": speedup_summary(lat),
        }
        (Path(out_dir) / "metrics.json").write_text(json.dumps(m))
        return m

    spec = {
        **SPEC,
        "base": _base() | {"teacher": {"epochs": 1, "lr": 0.05}},
        "variants": {"nncf": {"peer": "nncf_ptq"}, "dense": {"stages": ""}},
    }
    monkeypatch.setattr(pqd.commands.peers, "peer_run", fake_peer_run)
    rows = {r["variant"]: r for r in run_sweep(spec, tmp_path, progress=False)}
    peer, dense = rows["nncf"], rows["dense"]
    assert peer["kind"] == "peer" and peer["peer"] == "nncf_ptq" and peer["stage_order"] == "peer:nncf_ptq"
    assert peer["lat_b1_speedup"] == 2.0 and peer["lat_speedup_kind"] == "same_runtime"
    assert (
        peer["lat_teacher_label"] == "teacher FP32 @ OpenVINO" and peer["lat_final_label"] == "nncf_ptq INT8 @ OpenVINO"
    )
    assert (peer["final_top1_ci_low"], peer["final_top1_ci_high"], peer["test_n"]) == (0.4, 0.6, 128)
    assert (
        dense["lat_teacher_label"] == "teacher FP32 @ PyTorch eager"
        and dense["test_n"] == 128
        and dense["test_full_split"] == 0
    )
    assert dense["final_top1_ci_low"] < dense["final_top1"] < dense["final_top1_ci_high"]
    # resume: the finished peer run is skipped (its saved config, with the peer key, matches)
    monkeypatch.setattr(
        pqd.commands.peers, "peer_run", lambda *a, **k: pytest.fail("a finished peer run must be skipped")
    )
    assert len(run_sweep(spec, tmp_path, progress=False)) == 2

    def missing(config, out_dir, *, peer):
        raise PqdError("the NNCF peer baseline needs NNCF: pip install 'pqd[peers]'")

    monkeypatch.setattr(pqd.commands.peers, "peer_run", missing)
    spec2 = {**spec, "variants": {"nncf": {"peer": "nncf_ptq"}, "qat": {"stages": "Q:1"}}}
    with pytest.raises(PqdError, match=r"1 of 3 runs failed \(nncf__seed0: .*pqd\[peers\]"):
        run_sweep(spec2, tmp_path / "b", progress=False)
    assert sorted(r["variant"] for r in read_table(tmp_path / "b")) == ["qat", "teacher"]


def test_a_full_disk_never_leaves_an_empty_results_table(tmp_path, monkeypatch):
    """sqlite creates the file on connect; a full disk then failed CREATE TABLE and left a 0-byte
    results.sqlite. The table is made under a temporary name and renamed only when complete."""
    from pathlib import Path

    from pqd.commands.sweep import ResultTable
    from pqd.errors import DiskFullError

    real = sqlite3.connect

    def full_disk(path, *args, **kwargs):
        Path(path).touch()  # what sqlite does on open
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sqlite3, "connect", full_disk)
    with pytest.raises(DiskFullError, match="no space left"):
        ResultTable(tmp_path / "results.sqlite")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(sqlite3, "connect", real)
    table = ResultTable(tmp_path / "results.sqlite")  # space freed: the same command makes it
    assert table.rows() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]


def test_a_relative_teacher_weights_path_is_read_from_the_working_directory(tmp_path, monkeypatch):
    """As `pqd run` reads it, not against the sweep folder (where a sweep keeps its own teachers' files)."""
    from pqd.commands.sweep import load_sweep

    (tmp_path / "w").mkdir()
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(
        "base: {model: {name: resnet18}, teacher: {weights: w/teacher.safetensors}}\n"
        "variants:\n  a: {stages: 'Q:1'}\n  b: {stages: 'Q:1', teacher.weights: w/other.safetensors}\n"
    )
    monkeypatch.chdir(tmp_path)
    spec = load_sweep(spec_file)
    assert spec["base"]["teacher"]["weights"] == str(tmp_path / "w" / "teacher.safetensors")
    assert spec["variants"]["b"]["teacher.weights"] == str(tmp_path / "w" / "other.safetensors")
    over = load_sweep(spec_file, ["teacher.weights=w/third.safetensors"])
    assert over["base"]["teacher"]["weights"] == str(tmp_path / "w" / "third.safetensors")
