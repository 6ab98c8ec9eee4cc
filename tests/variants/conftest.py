import pytest


@pytest.fixture()
def digits_config():
    """A whole-pipeline config small enough for seconds: width 0.125, 400 digits, 1-epoch teacher."""
    return {
        "seed": 0,
        "model": {"name": "resnet18", "width": 0.125},
        "data": {"dataset": "digits", "train_subset": 400, "test_subset": 200},
        "train": {"batch_size": 32, "progress": False, "threads": 2},
        "teacher": {"epochs": 2, "lr": 0.05},
        "measure": {"threads": 1, "warmup": 1, "runs": 3, "batch_sizes": [1], "large_batch_runs": 1},
    }
