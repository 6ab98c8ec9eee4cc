"""Integrations with tools people already use: experiment trackers (:mod:`pqd.train.tracking`)
and PyTorch Lightning (:mod:`pqd.integrations.lightning`, needs the ``lightning`` extra).
Submodules are imported on use, so an absent optional dependency costs nothing."""
