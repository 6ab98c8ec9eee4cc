"""Integrations with tools people already use: PyTorch Lightning (:mod:`pqd.integrations.lightning`,
needs the ``lightning`` extra) and evaluation helpers (:mod:`pqd.integrations.evaluation`).
Experiment trackers are part of training (:mod:`pqd.train.tracking`). Submodules are imported on
use, so an absent optional dependency costs nothing."""
