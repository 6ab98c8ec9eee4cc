from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def int8_run(tmp_path_factory) -> Path:
    """A finished P -> Q -> D run of a small trained ResNet-18 on digits (the demo's recipe, shrunk).

    The whole test split (360 images) is kept so that agreement fractions mean something.
    """
    from pqd.run.config import RunConfig
    from pqd.run.pipeline import run_pipeline

    cfg = {
        "seed": 0,
        "stages": "P:1,Q:1,D:1",
        "model": {"name": "resnet18", "width": 0.125},
        "data": {"dataset": "digits", "train_subset": 600},
        "train": {"batch_size": 32, "progress": False, "threads": 2},
        "teacher": {"epochs": 4, "lr": 0.05},
        "prune": {"sparsity": 0.6},
        "measure": {"threads": 1, "warmup": 1, "runs": 3, "batch_sizes": [1], "large_batch_runs": 1},
    }
    out = tmp_path_factory.mktemp("int8_run")
    run_pipeline(RunConfig.from_dict(cfg), out)
    return out
