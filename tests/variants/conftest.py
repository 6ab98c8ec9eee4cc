import pytest


@pytest.fixture()
def digits_config(tiny_config, tiny_teacher):
    """``tiny_config`` from the shared trained teacher, with 400 training digits and the fewest timed runs."""
    return tiny_config | {
        "teacher": tiny_teacher,
        "data": {"dataset": "digits", "train_subset": 400, "test_subset": 200},
        "measure": {"threads": 1, "warmup": 1, "runs": 3, "batch_sizes": [1], "large_batch_runs": 1},
    }
