"""The tune ladder as pure functions: which candidate to try next given what was measured, and
which candidate wins. No training, files or timing here, so the stop rules are tested on scripted
outcomes (tests/commands/test_tune_ladder.py) and a resumed tune replays the same decisions.

Rungs, cheapest first (every candidate is INT8):

1. ``ptq``: static PTQ of the dense model (no training); when it misses the tolerance, the 1, 2, 4 ...
   layers most sensitive to INT8 (``pqd analyze``'s per-layer ranking) left FP32, up to
   ``tune.fallback_layers``; stops at the first that passes.
2. ``qat``: QAT then KD in the INT8 form (``Q:a,D:b``), only when no PTQ candidate passes.
   If that misses too, no dense INT8 model is within the tolerance and the ladder stops: a
   smaller model would lose more.
3. ``structured``: channels removed to a latency budget, a fraction of dense INT8 latency measured
   on the target (``S:s,Q:q,D:d``: the S stage fine-tunes with KD, then QAT, then KD). Fractions
   ``tune.fractions`` are probed from the largest down until one fails, then bisected between the
   smallest passing and the largest failing fraction until they are ``tune.min_step`` apart.
4. ``unstructured``: when a size budget is set and the fastest passing model is above it, the same
   recipe with unstructured pruning (``P``) added at a sparsity sized to the budget.

Every trained candidate costs its stage epochs from the training budget; a candidate the budget
cannot pay for is not started.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pqd.commands.tune.config import TuneConfig

RUNGS = ("ptq", "qat", "structured", "unstructured")
DENSE = "dense_fp32"  # the dense FP32 model's name in the choice, the timing and the report (never a run of its own)
SMALLEST_FRACTION = 0.05  # below this a latency budget is under any model's fixed per-layer cost


@dataclass(frozen=True)
class Candidate:
    """One model the ladder trains or calibrates: its run's stage list and what it costs."""

    name: str
    rung: str
    stages: str
    epochs: int  # training epochs it spends from the budget
    fallback: int = 0  # ptq: layers left FP32, the most sensitive to INT8
    fraction: float | None = None  # structured: latency budget as a fraction of dense INT8
    sparsity: float | None = None  # unstructured: target sparsity
    base: str | None = None  # unstructured: the candidate whose recipe it extends

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Candidate:
        return cls(**dict(d))


@dataclass(frozen=True)
class Outcome:
    """What the ladder needs to know of a finished candidate. ``ok``: the run finished and was
    evaluated (False: it raised, ``error`` says what); ``drop``: dense FP32 minus candidate top-1 on
    the validation split, in points; ``passed``: within the tolerance by the config's rule."""

    ok: bool
    passed: bool = False
    drop: float | None = None
    size_mb: float | None = None
    error: str | None = None
    floor_fraction: float | None = None  # structured: its budget was below the floor model, measured at this fraction

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Outcome:
        return cls(**dict(d))


@dataclass(frozen=True)
class Plan:
    """The next candidates (several only with a parallel executor), or none and why the ladder stopped."""

    candidates: tuple[Candidate, ...]
    note: str


def passes(drop: float, drop_upper: float, *, tolerance: float, rule: str) -> bool:
    """Within the tolerance (points): the measured drop (rule 'point') or the upper end of its
    95% interval (rule 'upper') is at most ``tolerance``."""
    return (drop if rule == "point" else drop_upper) <= tolerance + 1e-9


def looks_memorised(val: Mapping[str, float], test: Mapping[str, float], *, gap_points: float = 2.0) -> bool:
    """The dense model is clearly better on the validation split than on the test split (intervals apart
    and at least ``gap_points`` between them): its validation images were likely part of its training data,
    so drops measured there overstate those on unseen images. ``val``/``test``: top-1 records
    (``top1``, ``ci_low``, ``ci_high`` as fractions)."""
    return val["ci_low"] > test["ci_high"] and 100 * (val["top1"] - test["top1"]) >= gap_points


def split_epochs(total: int, shares: Sequence[float]) -> list[int]:
    """``total`` epochs over stages in proportion to ``shares``, each stage at least one epoch."""
    n = len(shares)
    if total <= n:
        return [1] * n
    raw = [total * s / sum(shares) for s in shares]
    out = [max(1, int(r)) for r in raw]
    by_remainder = sorted(range(n), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(out) < total:
        out[by_remainder[i % n]] += 1
        i += 1
    return out


QAT_SHARES = (0.5, 0.5)  # Q, D
STRUCTURED_SHARES = (0.4, 0.3, 0.3)  # S, Q, D
SPARSE_SHARES = (0.3, 0.2, 0.25, 0.25)  # S, P, Q, D (P, Q, D without S)


def qat_candidate(candidate_epochs: int) -> Candidate:
    q, d = split_epochs(candidate_epochs, QAT_SHARES)
    return Candidate("qat_kd", "qat", f"Q:{q},D:{d}", q + d)


def ptq_candidate(fallback: int) -> Candidate:
    return Candidate("ptq" if not fallback else f"ptq_fp32x{fallback}", "ptq", "Q:0", 0, fallback=fallback)


def structured_candidate(fraction: float, candidate_epochs: int) -> Candidate:
    s, q, d = split_epochs(candidate_epochs, STRUCTURED_SHARES)
    return Candidate(f"s{fraction:.3f}".rstrip("0"), "structured", f"S:{s},Q:{q},D:{d}", s + q + d, fraction=fraction)


def sparse_candidate(base: Candidate, sparsity: float, candidate_epochs: int) -> Candidate:
    name = f"{base.name}_sparse{round(100 * sparsity)}"
    if base.rung == "structured":
        s, p, q, d = split_epochs(candidate_epochs, SPARSE_SHARES)
        stages = f"S:{s},P:{p},Q:{q},D:{d}"
    else:
        p, q, d = split_epochs(candidate_epochs, SPARSE_SHARES[1:])
        s, stages = 0, f"P:{p},Q:{q},D:{d}"
    return Candidate(
        name,
        "unstructured",
        stages,
        s + p + q + d,
        fraction=base.fraction,
        sparsity=sparsity,
        base=base.name,
    )


def fallback_counts(max_layers: int) -> list[int]:
    """1, 2, 4 ... up to ``max_layers`` (which is always included)."""
    out, k = [], 1
    while k < max_layers:
        out.append(k)
        k *= 2
    return out + ([max_layers] if max_layers else [])


def sparsity_for(size_mb: float, budget_mb: float) -> float:
    """Sparsity aimed at ``budget_mb`` from an INT8 file of ``size_mb``: zeros compress to almost
    nothing but their positions cost some bytes, so aim 30% below the proportional cut."""
    return round(min(0.95, max(0.3, 1 - 0.7 * budget_mb / size_mb)), 2)


def _probes(tune: TuneConfig, cap: float | None) -> list[float]:
    probes = list(tune.fractions)
    if cap is not None and cap < 1:
        probes = [cap] + [f for f in probes if f < cap]
    return probes


def plan(
    tune: TuneConfig,
    done: Sequence[tuple[Candidate, Outcome]],
    *,
    candidate_epochs: int,
    budget_epochs: int,
    latency_cap: float | None = None,
    parallel: bool = False,
) -> Plan:
    """The next step of the ladder after ``done`` (candidates in the order they ran, with outcomes).

    ``latency_cap``: the user's latency budget as a fraction of dense INT8 (when given), the
    first structured fraction probed. ``parallel``: return every structured probe that can start
    now (an executor that runs them at once) instead of one at a time.
    """
    by_name = {c.name: o for c, o in done}
    left = budget_epochs - sum(c.epochs for c, _ in done)
    if "ptq" not in by_name:
        return Plan((ptq_candidate(0),), "static PTQ of the dense model (calibration only, no training)")
    dense = [c for c, o in done if c.rung in ("ptq", "qat") and o.passed]
    if not dense:
        for k in fallback_counts(tune.fallback_layers):
            cand = ptq_candidate(k)
            if cand.name not in by_name:
                return Plan((cand,), f"PTQ missed the tolerance: the {k} layer(s) most sensitive to INT8 left FP32")
        qat = qat_candidate(candidate_epochs)
        if qat.name not in by_name:
            if qat.epochs > left:
                return Plan(
                    (),
                    f"no INT8 model within the tolerance, and QAT + KD ({qat.epochs} epochs) exceeds the "
                    f"training budget left ({left} epochs)",
                )
            return Plan((qat,), "no PTQ model within the tolerance: QAT with KD from the dense teacher")
        return Plan(
            (),
            "no dense INT8 model is within the tolerance; a smaller model would lose more, "
            "so channel pruning is not tried",
        )
    step = _structured_step(tune, done, candidate_epochs, left, latency_cap, parallel)
    if step.candidates:
        return step
    sparse = _sparse_step(tune, done, candidate_epochs, left)
    if sparse is not None:
        return sparse
    return step


def _structured_step(
    tune: TuneConfig,
    done: Sequence[tuple[Candidate, Outcome]],
    candidate_epochs: int,
    left: int,
    latency_cap: float | None,
    parallel: bool,
) -> Plan:
    tried = [(c, o) for c, o in done if c.rung == "structured" and c.fraction is not None]
    fractions = {round(c.fraction, 4) for c, _ in tried if c.fraction is not None}
    if len(tried) >= tune.max_structured:
        return Plan((), f"structured: {len(tried)} candidates tried (tune.max_structured)")
    hi = min((c.fraction for c, o in tried if o.passed and c.fraction is not None), default=1.0)
    lo = max(
        (c.fraction for c, o in tried if not o.passed and c.fraction is not None and c.fraction < hi), default=None
    )
    cost = structured_candidate(0.5, candidate_epochs).epochs
    room = min(tune.max_structured - len(tried), left // cost if cost else 0)
    floor = max((o.floor_fraction for _, o in tried if o.floor_fraction is not None), default=0.0)
    at_floor = Plan(
        (),
        f"structured: channel pruning reaches only {floor:.2f} of dense INT8 latency on this model (every group at "
        "its floor): smaller budgets give the same model",
    )
    if lo is None:
        nxt = [f for f in _probes(tune, latency_cap) if floor < f < hi and round(f, 4) not in fractions]
        if not nxt:  # every probe passed: keep cutting by a third while above the smallest useful fraction
            f = round(hi * 2 / 3, 4)
            nxt = [f] if f >= SMALLEST_FRACTION and round(f, 4) not in fractions else []
        if not nxt:
            if floor:
                return at_floor
            return Plan((), f"structured: every fraction down to {hi:g} of dense INT8 latency passed")
        why = f"structured: {nxt[0]:g} of dense INT8 latency" + (
            f" (the smallest passing so far: {hi:g})" if hi < 1 else ""
        )
    else:
        if hi - lo <= tune.min_step + 1e-9:
            return Plan((), f"structured: bisection converged, {hi:g} passes and {lo:g} fails")
        mid = round((hi + lo) / 2, 4)
        if mid <= floor:
            return at_floor
        if mid in fractions:
            return Plan((), f"structured: bisection converged, {hi:g} passes and {lo:g} fails")
        nxt, why = [mid], f"structured: bisection between {hi:g} (passes) and {lo:g} (fails)"
    if room < 1:
        return Plan(
            (), f"structured: the training budget left ({left} epochs) cannot pay for another candidate ({cost} epochs)"
        )
    picks = nxt[:room] if parallel else nxt[:1]
    return Plan(tuple(structured_candidate(f, candidate_epochs) for f in picks), why)


def _sparse_step(
    tune: TuneConfig, done: Sequence[tuple[Candidate, Outcome]], candidate_epochs: int, left: int
) -> Plan | None:
    if tune.size_budget_mb is None or any(c.rung == "unstructured" for c, _ in done):
        return None
    passing = [(c, o) for c, o in done if o.passed and o.size_mb is not None]
    if not passing or any((o.size_mb or 0) <= tune.size_budget_mb for _, o in passing):
        return None
    # the fastest passing recipe: the smallest latency fraction (dense INT8 counts as 1)
    base, out = min(passing, key=lambda co: co[0].fraction if co[0].fraction is not None else 1.0)
    if base.rung == "ptq":  # a PTQ model has no training recipe to extend: prune the dense model
        base = Candidate("dense", "qat", "", 0)
    cand = sparse_candidate(base, sparsity_for(out.size_mb or 0.0, tune.size_budget_mb), candidate_epochs)
    if cand.epochs > left:
        return Plan((), f"size budget: unstructured pruning ({cand.epochs} epochs) exceeds the training budget left")
    return Plan(
        (cand,),
        f"size budget {tune.size_budget_mb:g} MB: unstructured pruning of {base.name} at {cand.sparsity:.0%} sparsity",
    )


@dataclass(frozen=True)
class Measured:
    """A finished candidate as the choice sees it: the final interleaved latency and the file size."""

    name: str
    passed: bool
    drop: float
    latency_ms: float
    size_mb: float


@dataclass(frozen=True)
class Choice:
    winner: str | None
    met: bool  # the winner is within the tolerance and every budget
    message: str
    verdicts: dict[str, str]  # candidate -> why it was kept or rejected


def choose(
    rows: Sequence[Measured], *, latency_budget_ms: float | None = None, size_budget_mb: float | None = None
) -> Choice:
    """The fastest candidate within the tolerance and the budgets. When none is, the fastest within
    the tolerance (budgets missed), else the most accurate: never no model while one was measured."""
    verdicts: dict[str, str] = {}
    eligible = []
    for r in rows:
        why = []
        if not r.passed:
            why.append(f"drop {r.drop:+.2f} points is outside the tolerance")
        if latency_budget_ms is not None and r.latency_ms > latency_budget_ms:
            why.append(f"{r.latency_ms:.3f} ms is over the {latency_budget_ms:g} ms budget")
        if size_budget_mb is not None and r.size_mb > size_budget_mb:
            why.append(f"{r.size_mb:.2f} MB is over the {size_budget_mb:g} MB budget")
        verdicts[r.name] = "rejected: " + "; ".join(why) if why else "within the tolerance and budgets"
        if not why:
            eligible.append(r)
    if eligible:
        best = min(eligible, key=lambda r: (r.latency_ms, r.drop))
        verdicts[best.name] = "kept: the fastest within the tolerance and budgets"
        return Choice(best.name, True, f"{best.name}: the fastest model within the tolerance", verdicts)
    if not rows:
        return Choice(None, False, "no candidate finished", verdicts)
    within = [r for r in rows if r.passed]
    if within:
        best = min(within, key=lambda r: (r.latency_ms, r.drop))
        verdicts[best.name] = "kept: within the tolerance but over a budget (none meets both)"
        return Choice(
            best.name,
            False,
            f"no candidate within the tolerance meets the budget; handing over the fastest within the tolerance, "
            f"{best.name}",
            verdicts,
        )
    best = min(rows, key=lambda r: (r.drop, r.latency_ms))
    verdicts[best.name] = "kept: the most accurate model found (none is within the tolerance)"
    return Choice(
        best.name,
        False,
        f"no candidate is within the tolerance; handing over the most accurate INT8 model found, {best.name} "
        f"(drop {best.drop:+.2f} points)",
        verdicts,
    )
