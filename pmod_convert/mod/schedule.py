"""Progressive ratio decay (PRD): which decoder layers become MoD layers, and their retention ratios.

A schedule maps a model depth to a list with one entry per decoder layer: ``None`` for a dense
layer (no router), or the fraction of vision tokens the layer keeps, in (0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import RecipeError

SCHEDULE_KINDS = ("shiftedcos", "shiftedlinear", "constant", "explicit")

# Published p-MoD settings (LLaVA-NeXT-7B): shiftedcos_decay_0.85_0.15 with average factor 0.5.
DEFAULT_AVG_RATIO = 0.5
DEFAULT_MAX_RATIO = 0.85
DEFAULT_MIN_RATIO = 0.15


def _check_ratio(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < float(value) <= 1.0):
        raise RecipeError(f"{name} must be in (0, 1], got {value!r}")


def _depth_fraction(layer: int, num_layers: int) -> float:
    # The reference hard-codes L - 1 = 31; we use the model's own depth. A 1-layer model is at fraction 0.
    return layer / (num_layers - 1) if num_layers > 1 else 0.0


def raw_ratio(kind: str, layer: int, num_layers: int, avg_ratio: float) -> float:
    """The undecayed curve value at ``layer``: shifted cosine or shifted linear around ``avg_ratio``."""
    t = _depth_fraction(layer, num_layers)
    if kind == "shiftedcos":
        return math.cos(math.pi * t) / 2 + avg_ratio
    if kind == "shiftedlinear":
        return 0.5 - t + avg_ratio
    raise RecipeError(f"raw_ratio is defined for shiftedcos/shiftedlinear, not {kind!r}")


def layer_ratios(
    num_layers: int,
    kind: str = "shiftedcos",
    *,
    avg_ratio: float = DEFAULT_AVG_RATIO,
    max_ratio: float = DEFAULT_MAX_RATIO,
    min_ratio: float = DEFAULT_MIN_RATIO,
    ratio: float | None = None,
    layers: Sequence[int] | None = None,
    ratios: Sequence[float | None] | None = None,
) -> list[float | None]:
    """Per-layer retention ratios (``None`` = dense layer) for a model with ``num_layers`` decoder layers.

    - ``shiftedcos`` / ``shiftedlinear``: layers whose curve value is <= ``max_ratio`` become MoD
      layers with ratio ``max(curve, min_ratio)``; earlier layers stay dense.
    - ``constant``: every layer (or every layer in ``layers``) keeps ``ratio``.
    - ``explicit``: ``ratios`` gives one entry per layer (``None`` or 1.0 with no router = dense).
    ``layers``, when given, restricts MoD conversion to those indices for every kind but ``explicit``.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise RecipeError(f"the model must have at least one decoder layer, got {num_layers!r}")
    if kind not in SCHEDULE_KINDS:
        raise RecipeError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    if layers is not None:
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
        if bad:
            raise RecipeError(f"layer indices {bad} are outside 0..{num_layers - 1}")
        if len(set(layers)) != len(layers):
            raise RecipeError(f"layer indices {list(layers)} contain duplicates")
    chosen = set(range(num_layers)) if layers is None else set(layers)

    if kind == "explicit":
        if ratios is None or len(ratios) != num_layers:
            got = "none" if ratios is None else len(ratios)
            raise RecipeError(f"an explicit schedule needs one ratio per layer ({num_layers}), got {got}")
        if layers is not None:
            raise RecipeError("an explicit schedule lists every layer's ratio; do not combine it with layers")
        out: list[float | None] = []
        for i, r in enumerate(ratios):
            if r is not None:
                _check_ratio(f"ratio of layer {i}", r)
            out.append(None if r is None else float(r))
        return out

    if kind == "constant":
        if ratio is None:
            raise RecipeError("a constant schedule needs ratio (e.g. --ratio 0.5)")
        _check_ratio("ratio", ratio)
        return [float(ratio) if i in chosen else None for i in range(num_layers)]

    _check_ratio("max_ratio", max_ratio)
    _check_ratio("min_ratio", min_ratio)
    if min_ratio > max_ratio:
        raise RecipeError(f"min_ratio ({min_ratio}) must not exceed max_ratio ({max_ratio})")
    if not (isinstance(avg_ratio, (int, float)) and 0.0 <= avg_ratio <= 1.0):
        raise RecipeError(f"avg_ratio must be in [0, 1], got {avg_ratio!r}")
    out = []
    for i in range(num_layers):
        raw = raw_ratio(kind, i, num_layers, avg_ratio)
        # 1e-9 keeps a layer that sits exactly on max_ratio on the MoD side despite rounding in cos().
        out.append(min(1.0, max(raw, min_ratio)) if (i in chosen and raw <= max_ratio + 1e-9) else None)
    return out


def kept_count(ratio: float, n_targets: int) -> int:
    """Number of target tokens kept: floor(ratio * n), robust to float error (0.85 * 20 is 17, not 16)."""
    return min(n_targets, int(math.floor(ratio * n_targets + 1e-6)))
