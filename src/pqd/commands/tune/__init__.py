"""``pqd tune``: the fastest deployable INT8 model within the accuracy you are willing to lose.

    pqd tune CONFIG --out DIR [--set tune.max_drop=0.5] [--executor ray]

CONFIG is a run config (model, data, teacher.weights, train, measure ...) without ``stages`` plus a
``tune:`` section (:class:`TuneConfig`). In Python: ``pqd.tune(config, out_dir, tune_config=TuneConfig(...))``.
The ladder is :mod:`pqd.commands.tune.ladder`, the runs and measurements :mod:`pqd.commands.tune.runner`,
the report :mod:`pqd.commands.tune.report`; docs/TUNE.md explains the rules.
"""

from pqd.commands.tune.config import TuneConfig, load_tune_config, split_tune_dict
from pqd.commands.tune.runner import tune

__all__ = ["TuneConfig", "load_tune_config", "split_tune_dict", "tune"]
