"""Fit a PRD schedule to a compute budget: the decoder FLOPs ratio (MoD / dense) or the KV-cache ratio.

Every schedule here is a curve over *positions* plus one monotone parameter:

- ``shiftedcos`` / ``shiftedlinear``: ``raw = curve[pos] + a`` with the family's curve
  (``cos(pi t) / 2`` or ``0.5 - t``, ``t = pos / (L - 1)``); a position is an MoD layer when
  ``raw <= max_ratio`` and keeps ``max(raw, min_ratio)``; ``a`` (the average factor) is searched in [0, 1].
  With the identity ``order`` (position = layer) this is exactly ``mod.schedule.layer_ratios``.
- a measured curve (``measured_curve``): the same rule over a curve fitted to per-layer measurements.
- ``order`` maps positions to layers: the identity for PRD, or layers sorted from least to most
  redundant (ARank). Every layer costs the same for the same ratio, so reordering never changes the cost.
- ``constant``: every layer keeps ``ratio``, searched in [min_ratio, 1].

The cost is ``efficiency.estimate`` over the real per-sample token counts of the calibration data. Raising
the parameter never lowers any layer's ratio, so the cost is monotone in it and bisection applies. The
cost is a step function (``kept_count`` floors, a layer turning dense jumps from ``max_ratio`` to 1): when
the target falls into a step wider than the tolerance, the layers that change across the step are moved
one at a time through intermediate ratios ("gap filling", an explicit schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..efficiency import Estimate, TextShape, estimate
from ..errors import RecipeError
from ..mod import schedule as prd
from ..recipe import ScheduleSettings

FAMILIES = ("shiftedcos", "shiftedlinear", "constant")
METRICS = ("flops", "kv")
SHIFT_RANGE = (0.0, 1.0)  # the average factor a, as ScheduleSettings validates it
BISECTION_STEPS = 60
SWEEP_POINTS = 41


class BudgetError(RecipeError):
    """The budget cannot be met by the requested schedule family on this model and data."""


@dataclass(frozen=True)
class Workload:
    """What the budget is measured on: the decoder shape and per-sample token counts of the data."""

    shape: TextShape
    n_vision: list[int]
    n_text: list[int]
    vision_flops: list[float] | float = 0.0  # per sample, added to dense and MoD alike (0: decoder only)
    convention: str = "exact"  # efficiency.CONVENTIONS: "paper" budgets in the p-MoD paper's count
    scorer: str = "router"  # "attention": every MoD layer pays efficiency.scorer_flops

    def estimate(self, ratios: Sequence[float | None]) -> Estimate:
        scorers = [None if r is None else self.scorer for r in ratios]
        return estimate(self.shape, list(ratios), self.n_vision, self.n_text, vision_flops=self.vision_flops,
                        convention=self.convention, scorers=scorers)

    def metric(self, ratios: Sequence[float | None], metric: str) -> float:
        est = self.estimate(ratios)
        return est.flops_ratio if metric == "flops" else est.kv_ratio


@dataclass
class BudgetSolution:
    settings: ScheduleSettings  # what goes into the recipe
    ratios: list[float | None]  # per layer; None = dense
    metric: str  # "flops" | "kv"
    target: float
    achieved: float
    reachable: tuple[float, float]
    parameter: str  # "avg_ratio" (shifted curves) or "ratio" (constant)
    value: float
    estimate: Estimate
    gap_filled_layers: list[int] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)  # parameter -> flops/kv ratio, for the budget plot


def family_curve(kind: str, num_layers: int) -> list[float]:
    """The family's curve at every position (the raw ratio with average factor 0)."""
    return [prd.raw_ratio(kind, i, num_layers, 0.0) for i in range(num_layers)]


def curve_ratios(curve: Sequence[float], shift: float, *, max_ratio: float, min_ratio: float,
                 order: Sequence[int] | None = None) -> list[float | None]:
    """Per-layer ratios of ``raw = curve[pos] + shift`` (same rule and rounding as ``mod.schedule``)."""
    order = list(range(len(curve))) if order is None else list(order)
    ratios: list[float | None] = [None] * len(curve)
    for pos, layer in enumerate(order):
        raw = curve[pos] + shift
        ratios[layer] = min(1.0, max(raw, min_ratio)) if raw <= max_ratio + 1e-9 else None
    return ratios


def isotonic_decreasing(values: Sequence[float]) -> list[float]:
    """Least-squares non-increasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    out: list[float] = []
    for mean, weight in blocks:
        out += [mean] * int(weight)
    return out


def measured_curve(profile: Sequence[float], order: Sequence[int]) -> list[float]:
    """A curve for the shifted-curve rule from a per-layer importance profile (high = keep more tokens).

    The profile is read in ``order`` (position -> layer), made non-increasing (isotonic fit), and scaled
    to [-0.5, 0.5], the span of the cosine and linear curves, so the average factor means the same.
    """
    values = isotonic_decreasing([float(profile[layer]) for layer in order])
    hi, lo = max(values), min(values)
    if hi - lo <= 1e-12:
        return [0.0] * len(values)
    return [(v - lo) / (hi - lo) - 0.5 for v in values]


def _bisect(f: Callable[[float], float], lo: float, hi: float, target: float) -> tuple[float, float]:
    """Largest ``x`` with ``f(x) < target`` and smallest with ``f(x) >= target`` (f monotone, f(lo) < target <= f(hi))."""
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return lo, hi


def solve_budget(workload: Workload, *, target_flops: float | None = None, target_kv: float | None = None,
                 kind: str = "shiftedcos", max_ratio: float = prd.DEFAULT_MAX_RATIO,
                 min_ratio: float = prd.DEFAULT_MIN_RATIO, curve: Sequence[float] | None = None,
                 order: Sequence[int] | None = None, tolerance: float = 0.01, dense_first: int = 0) -> BudgetSolution:
    """The schedule of family ``kind`` whose cost on ``workload`` is within ``tolerance`` of the target.

    ``curve`` / ``order``: a measured curve and a position -> layer order (see the module docstring);
    when either is given the result is an explicit schedule. ``dense_first``: the first layers that stay dense
    whatever the curve says (the schedule's ``layers`` then lists the others). A budget outside the reachable
    range raises ``BudgetError`` naming the range.
    """
    if (target_flops is None) == (target_kv is None):
        raise RecipeError("give exactly one budget: target_flops (--target-flops R) or target_kv (--target-kv R)")
    metric, target = ("flops", target_flops) if target_flops is not None else ("kv", target_kv)
    label = "FLOPs" if metric == "flops" else "KV-cache"
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise RecipeError(f"the {label} budget must be a ratio > 0 (MoD / dense, e.g. 0.6), got {target!r}")
    target = float(target)
    if kind not in FAMILIES:
        raise RecipeError(f"cannot fit a {kind!r} schedule to a budget; choose one of {', '.join(FAMILIES)}")
    if not 0 < tolerance < 1:
        raise RecipeError(f"tolerance must be in (0, 1), got {tolerance!r}")
    # Validates max/min the same way a recipe would.
    prd.layer_ratios(2, "shiftedcos", max_ratio=max_ratio, min_ratio=min_ratio)
    num_layers = workload.shape.num_layers
    if order is not None and sorted(order) != list(range(num_layers)):
        raise RecipeError(f"order must be a permutation of the {num_layers} layer indices")
    if curve is not None and len(curve) != num_layers:
        raise RecipeError(f"curve has {len(curve)} values for {num_layers} layers")

    if not isinstance(dense_first, int) or not 0 <= dense_first < num_layers:
        raise RecipeError(f"dense_first must be in 0..{num_layers - 1}, got {dense_first!r}")
    routed = list(range(dense_first, num_layers)) if dense_first else None

    if kind == "constant":
        if curve is not None or order is not None:
            raise RecipeError("a constant schedule keeps the same ratio in every layer: it has no curve or layer order "
                              "to fit (use --schedule shiftedcos with --shape measured / --layer-selection arank)")
        parameter, lo, hi = "ratio", float(min_ratio), 1.0

        def ratios_at(x: float) -> list[float | None]:
            return [min(1.0, max(x, min_ratio)) if i >= dense_first else None for i in range(num_layers)]

        positions = list(range(dense_first, num_layers))
        described = f"constant schedule (ratio in [{min_ratio:g}, 1])"
    else:
        parameter, (lo, hi) = "avg_ratio", SHIFT_RANGE
        base = list(curve) if curve is not None else family_curve(kind, num_layers)

        def ratios_at(x: float) -> list[float | None]:
            out = curve_ratios(base, x, max_ratio=max_ratio, min_ratio=min_ratio, order=order)
            return [None if i < dense_first else r for i, r in enumerate(out)]

        positions = [i for i in (list(order) if order is not None else range(num_layers)) if i >= dense_first]
        described = (f"{'measured' if curve is not None else kind} schedule (max_ratio {max_ratio:g}, "
                     f"min_ratio {min_ratio:g}, avg_ratio in [0, 1])")
    if dense_first:
        described += f" with layers 0-{dense_first - 1} dense"

    def f(x: float) -> float:
        return workload.metric(ratios_at(x), metric)

    f_lo, f_hi = f(lo), f(hi)
    if not (f_lo - tolerance <= target <= f_hi + tolerance):
        raise BudgetError(
            f"a {label} ratio of {target:g} is out of reach for the {described} on this {num_layers}-layer model "
            f"with the calibration data's token counts: reachable {f_lo:.3f}-{f_hi:.3f}; choose a target in that "
            f"range or another schedule / --min-ratio / --max-ratio")

    if target <= f_lo:
        x_below = x_above = lo
    elif target > f_hi:
        x_below = x_above = hi
    else:
        x_below, x_above = _bisect(f, lo, hi, target)
    candidates = sorted({x_below, x_above}, key=lambda x: (abs(f(x) - target), x))
    value = candidates[0]
    ratios = ratios_at(value)
    filled: list[int] = []
    if abs(f(value) - target) > tolerance:
        ratios, filled = _fill_gap(workload, metric, target, ratios_at(x_below), ratios_at(x_above), positions)
    achieved = workload.metric(ratios, metric)
    if abs(achieved - target) > tolerance:
        raise BudgetError(
            f"a {label} ratio of {target:g} cannot be met within {tolerance:g} by the {described}: the nearest "
            f"reachable value is {achieved:.3f} (too few vision tokens per sample for finer steps, "
            f"kept = floor(ratio * vision tokens)); choose a target near {achieved:.3f} or a larger tolerance")

    if filled or curve is not None or order is not None:
        settings = ScheduleSettings(kind="explicit", max_ratio=max_ratio, min_ratio=min_ratio, ratios=list(ratios))
    elif kind == "constant":
        settings = ScheduleSettings(kind="constant", max_ratio=max_ratio, min_ratio=min_ratio,
                                    ratio=ratios[dense_first], layers=routed)
    else:
        settings = ScheduleSettings(kind=kind, avg_ratio=value, max_ratio=max_ratio, min_ratio=min_ratio,
                                    layers=routed)
    if settings.layer_ratios(num_layers) != ratios:  # the recipe must reproduce what was costed
        raise AssertionError("schedule settings do not reproduce the solved ratios")

    sweep = []
    for i in range(SWEEP_POINTS):
        x = lo + (hi - lo) * i / (SWEEP_POINTS - 1)
        est = workload.estimate(ratios_at(x))
        sweep.append({parameter: x, "flops_ratio": est.flops_ratio, "kv_ratio": est.kv_ratio})
    return BudgetSolution(settings=settings, ratios=ratios, metric=metric, target=target, achieved=achieved,
                          reachable=(f_lo, f_hi), parameter=parameter, value=value,
                          estimate=workload.estimate(ratios), gap_filled_layers=filled, sweep=sweep)


def _fill_gap(workload: Workload, metric: str, target: float, below: list[float | None],
              above: list[float | None], positions: list[int]) -> tuple[list[float | None], list[int]]:
    """Move the layers that differ between ``below`` and ``above`` one at a time (in position order)
    through intermediate ratios until the cost reaches the target; returns the ratios and moved layers."""
    changed = [layer for layer in positions if below[layer] != above[layer]]

    def at(s: float) -> list[float | None]:
        out = list(below)
        for j, layer in enumerate(changed):
            frac = min(1.0, max(0.0, s - j))
            if frac <= 0.0:
                continue
            start, end = below[layer] if below[layer] is not None else 1.0, above[layer] if above[layer] is not None else 1.0
            r = start + frac * (end - start)
            out[layer] = above[layer] if frac >= 1.0 else r
        return out

    def f(s: float) -> float:
        return workload.metric(at(s), metric)

    s_below, s_above = _bisect(f, 0.0, float(len(changed)), target)
    best = min((s_below, s_above), key=lambda s: (abs(f(s) - target), s))
    ratios = at(best)
    moved = [layer for layer in changed if ratios[layer] != below[layer]]
    return ratios, moved


@dataclass
class BaselineSolution:
    """A FastV / PyramidDrop schedule fitted to a budget (see :func:`solve_baseline_budget`)."""

    method: str  # "fastv" | "pdrop"
    ratios: list[float | None]  # per layer; None = dense
    score_layers: list[int]
    metric: str
    target: float
    achieved: float
    reachable: tuple[float, float]
    parameter: str  # "keep" (FastV: 1 - R) or "lambda" (PyramidDrop)
    value: float
    k: int | None  # FastV: first pruned layer; None for PyramidDrop
    boundaries: list[int]  # first layer of every pruned stage
    estimate: Estimate
    notes: list[str] = field(default_factory=list)

    @property
    def drop_rate(self) -> float | None:
        """FastV's R (share of vision tokens dropped), None for PyramidDrop."""
        return None if self.method != "fastv" else 1.0 - self.value


def solve_baseline_budget(workload: Workload, method: str, *, target_flops: float | None = None,
                          target_kv: float | None = None, k: int | None = None, stages: int | None = None,
                          tolerance: float = 0.01) -> BaselineSolution:
    """Fit FastV's keep share ``1 - R`` for a given ``k``, or PyramidDrop's ``lambda`` for ``stages`` evenly
    spaced stages, so the estimated decoder FLOPs (or KV) ratio on ``workload`` meets the target within
    ``tolerance`` (bisection: the cost grows with the parameter).

    ``k`` (FastV; the paper's K, 0-based first pruned layer): default the paper's 2, lowered to the deepest
    ``k`` that can still reach the target (said in ``notes``). ``stages`` (PyramidDrop): default the paper's 4
    (at most the layer count). Raises ``BudgetError`` when the target is out of reach (naming the range) or
    cannot be met within ``tolerance``; ``RecipeError`` for a bad method / ``k`` / ``stages`` / target.
    """
    from ..mod import scoring

    if (target_flops is None) == (target_kv is None):
        raise RecipeError("give exactly one budget: target_flops (--target-flops R) or target_kv (--target-kv R)")
    metric, target = ("flops", target_flops) if target_flops is not None else ("kv", target_kv)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise RecipeError(f"the budget must be a ratio > 0 (pruned / dense, e.g. 0.6), got {target!r}")
    target = float(target)
    num_layers = workload.shape.num_layers
    notes: list[str] = []
    if num_layers < 2:
        raise BudgetError("the pruning baselines need at least 2 decoder layers (one to score, one to prune)")

    if method == "fastv":
        parameter, boundaries = "keep", []

        def ratios_for(kk: int):
            return lambda x: scoring.fastv_ratios(num_layers, kk, min(1.0, max(x, 1e-9)))

        if k is None:
            k = min(scoring.FASTV_DEFAULT_K, num_layers - 1)
            while k > 1 and workload.metric(ratios_for(k)(1e-9), metric) > target + tolerance:
                k -= 1
            if k != scoring.FASTV_DEFAULT_K:
                notes.append(f"FastV K lowered from the paper's {scoring.FASTV_DEFAULT_K} to {k} so that "
                             f"{metric} {target:g} is reachable on this {num_layers}-layer model")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < num_layers:
            raise RecipeError(f"--fastv-k must be in 1..{num_layers - 1} for this {num_layers}-layer model, got {k!r}")
        ratios_at = ratios_for(k)
        boundaries = [k]
        described = f"FastV with K={k}"
    elif method == "pdrop":
        parameter, k = "lambda", None
        stages = min(scoring.PDROP_DEFAULT_STAGES, num_layers) if stages is None else stages
        if isinstance(stages, bool) or not isinstance(stages, int) or not 2 <= stages <= num_layers:
            raise RecipeError(f"--pdrop-stages must be in 2..{num_layers} for this {num_layers}-layer model, "
                              f"got {stages!r}")
        boundaries = scoring.pdrop_boundaries(num_layers, stages)

        def ratios_at(x: float) -> list[float | None]:
            return scoring.pdrop_ratios(num_layers, boundaries, min(1.0, max(x, 1e-9)))

        described = f"PyramidDrop with {stages} stages (pruned from layers {boundaries})"
    else:
        raise RecipeError(f"unknown baseline {method!r}; choose fastv or pdrop")

    def f(x: float) -> float:
        return workload.metric(ratios_at(x), metric)

    lo, hi = 0.0, 1.0
    f_lo, f_hi = f(lo), f(hi)
    if not (f_lo - tolerance <= target <= f_hi + tolerance):
        raise BudgetError(f"a {metric} ratio of {target:g} is out of reach for {described} with the calibration "
                          f"data's token counts: reachable {f_lo:.3f}-{f_hi:.3f}" +
                          ("; choose a smaller --fastv-k" if method == "fastv" else "; use more --pdrop-stages"))
    if target <= f_lo:
        value = lo
    elif target > f_hi:
        value = hi
    else:
        below, above = _bisect(f, lo, hi, target)
        value = min((below, above), key=lambda x: (abs(f(x) - target), x))
    value = min(1.0, max(value, 1e-9))
    ratios = ratios_at(value)
    achieved = workload.metric(ratios, metric)
    if abs(achieved - target) > tolerance:
        raise BudgetError(f"a {metric} ratio of {target:g} cannot be met within {tolerance:g} by {described}: the "
                          f"nearest reachable value is {achieved:.3f} (kept = floor(ratio * vision tokens)); "
                          f"choose a target near {achieved:.3f} or a larger tolerance")
    return BaselineSolution(method=method, ratios=ratios, score_layers=scoring.score_layers_for(ratios),
                            metric=metric, target=target, achieved=achieved, reachable=(f_lo, f_hi),
                            parameter=parameter, value=value, k=k, boundaries=boundaries,
                            estimate=workload.estimate(ratios), notes=notes)
