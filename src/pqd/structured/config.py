"""The ``structured`` section of a run config (to be added to :class:`pqd.config.RunConfig`).

Written in the style of :mod:`pqd.config`'s sections; it subclasses ``pqd.config.Section``
(the public name of the sections' dict round-trip mixin) when that exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from pqd.errors import ConfigError

try:  # the lead exposes the mixin publicly as pqd.config.Section
    from pqd.config import Section
except ImportError:  # until then: a plain base with the same to_dict/from_dict contract
    import dataclasses
    import difflib

    class Section:  # type: ignore[no-redef]
        @classmethod
        def from_dict(cls, data=None, *, prefix: str = ""):
            data = dict(data or {})
            names = [f.name for f in dataclasses.fields(cls)]
            for k in data:
                if k not in names:
                    close = difflib.get_close_matches(str(k), names, n=1)
                    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
                    raise ConfigError(f"{prefix}{k}: unknown key.{hint} Valid keys: {', '.join(names)}")
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

        def to_dict(self) -> dict:
            return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}


RUNTIMES = ("openvino", "onnxruntime", "pytorch")
CRITERIA = ("l1", "l2", "bn", "taylor", "random")


def _fail(key: str, msg: str):
    raise ConfigError(f"structured.{key}: {msg}")


@dataclass(frozen=True)
class StructuredConfig(Section):
    """Structured (channel) pruning under a latency budget measured on the deployment runtime.

    Budget: ``budget_ms``, or ``budget_fraction`` × the dense model's INT8 latency (exactly
    one); ``size_budget_mb``: optional cap on INT8 weight bytes. Target: ``runtime``
    ('openvino', 'onnxruntime', 'pytorch'), ``batch``, ``threads``. ``importance``: 'l1',
    'l2', 'bn', 'taylor', 'random'; ``sensitivity``: a CSV from ``pqd analyze`` to minimise
    predicted accuracy loss instead. Channel counts are multiples of ``round_to``; a group
    keeps at least ``min_keep`` of its channels. ``samples``: measured width configurations
    for the latency model (cached per machine and target); ``runs``: timed calls per
    measurement; ``max_iters``: measure-and-correct rounds. The stage then fine-tunes for
    its epochs at ``lr``, against the dense teacher's soft targets when ``distill`` is true
    (temperature and alpha of the ``distill`` section), else with cross-entropy. ``ignore``:
    module paths whose output channels are never pruned.
    """

    budget_fraction: float | None = 0.5
    budget_ms: float | None = None
    size_budget_mb: float | None = None
    runtime: str = "openvino"
    batch: int = 1
    threads: int = 2
    importance: str = "l1"
    sensitivity: str | None = None
    round_to: int = 8
    min_keep: float = 0.1
    samples: int = 12
    runs: int = 100
    max_iters: int = 4
    lr: float = 0.01
    distill: bool = True
    ignore: tuple[str, ...] = ()
    cache_dir: str | None = None

    def __post_init__(self):
        if (self.budget_ms is None) == (self.budget_fraction is None):
            _fail("budget_fraction", "give exactly one of structured.budget_fraction and structured.budget_ms "
                  "(set the other to null)")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            _fail("budget_fraction", f"{self.budget_fraction!r} must be in (0, 1]")
        if self.budget_ms is not None and not self.budget_ms > 0:
            _fail("budget_ms", f"{self.budget_ms!r} must be > 0")
        if self.size_budget_mb is not None and not self.size_budget_mb > 0:
            _fail("size_budget_mb", f"{self.size_budget_mb!r} must be > 0")
        if self.runtime not in RUNTIMES:
            _fail("runtime", f"{self.runtime!r} is not valid; choose one of {', '.join(map(repr, RUNTIMES))}")
        if self.importance not in CRITERIA:
            _fail("importance", f"{self.importance!r} is not valid; choose one of {', '.join(map(repr, CRITERIA))}")
        for k in ("batch", "threads", "round_to", "samples", "runs", "max_iters"):
            if getattr(self, k) < 1:
                _fail(k, f"{getattr(self, k)!r} must be >= 1")
        if self.samples < 2:
            _fail("samples", f"{self.samples} must be >= 2 (the latency model is fitted on them)")
        if not 0 < self.min_keep <= 1:
            _fail("min_keep", f"{self.min_keep!r} must be in (0, 1]")
        if not self.lr >= 0:
            _fail("lr", f"{self.lr!r} must be >= 0")
