"""``pqd report DIR``: Markdown + self-contained HTML from a sweep's results table.

``pareto_front`` / ``dominators`` are pure and dependency-free; the plots need matplotlib
(``pip install 'pqd[report]'``), which :func:`build_report` imports only when called.
"""

from pqd.commands.report.pareto import dominates, dominators, pareto_front

__all__ = ["build_report", "dominates", "dominators", "pareto_front"]


def build_report(sweep_dir, out_dir=None):
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` for the sweep in ``sweep_dir``."""
    from pqd.commands.report.build import build_report as _build

    return _build(sweep_dir, out_dir)
