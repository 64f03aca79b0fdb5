"""Recipes: the settings of a conversion, as dataclasses with a strict YAML form.

Unknown keys are rejected (a typo must not silently fall back to a default), values are validated
as a whole, and the applied recipe is saved next to every output as ``recipe.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError
from .mod import schedule as prd

RECIPE_VERSION = 1
# Upper bound on decoder layers (the deepest released LLMs have ~130): a larger count in a config or an
# option (--layers 0-999999999) is refused before anything is allocated.
MAX_LAYERS = 4096
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class RouterSettings:
    tanh_alpha: float = 0.2
    tanh_beta: float = 1.0
    bias: bool = True

    def validate(self) -> None:
        for name in ("tanh_alpha", "tanh_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RecipeError(f"router.{name} must be a finite number, got {value!r}")
        if not self.tanh_alpha >= 0:
            raise RecipeError(f"router.tanh_alpha must be >= 0, got {self.tanh_alpha}")
        if self.tanh_beta - self.tanh_alpha < 0:
            raise RecipeError(
                f"router.tanh_beta ({self.tanh_beta}) - tanh_alpha ({self.tanh_alpha}) is negative: token weights could flip sign"
            )


@dataclass
class ScheduleSettings:
    kind: str = "shiftedcos"
    avg_ratio: float = prd.DEFAULT_AVG_RATIO
    max_ratio: float = prd.DEFAULT_MAX_RATIO
    min_ratio: float = prd.DEFAULT_MIN_RATIO
    ratio: float | None = None  # constant schedule
    layers: list[int] | None = None  # restrict MoD layers to these indices
    ratios: list[float | None] | None = None  # explicit schedule: one entry per layer, null = dense

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        return prd.layer_ratios(
            num_layers, self.kind, avg_ratio=self.avg_ratio, max_ratio=self.max_ratio, min_ratio=self.min_ratio,
            ratio=self.ratio, layers=self.layers, ratios=self.ratios,
        )

    def validate(self) -> None:
        # Depth-independent checks; the rest happen when a depth is known.
        if self.kind not in prd.SCHEDULE_KINDS:
            raise RecipeError(f"unknown schedule {self.kind!r}; choose one of {', '.join(prd.SCHEDULE_KINDS)}")
        if self.layers is not None:
            if not self.layers:
                raise RecipeError("schedule.layers is empty: no layer would become an MoD layer; list at least one "
                                  "layer or leave it out")
            bad = [i for i in self.layers if not 0 <= i < MAX_LAYERS]
            if bad:
                raise RecipeError(f"schedule.layers {bad[:3]} are outside 0..{MAX_LAYERS - 1}")
        if self.ratios is not None and len(self.ratios) > MAX_LAYERS:
            raise RecipeError(f"schedule.ratios has {len(self.ratios)} entries, more than {MAX_LAYERS} layers")
        if self.kind == "explicit":
            prd.layer_ratios(len(self.ratios or [None]), "explicit", ratios=self.ratios or [None])
        else:
            prd.layer_ratios(max(self.layers or [0]) + 1, self.kind, avg_ratio=self.avg_ratio,
                             max_ratio=self.max_ratio, min_ratio=self.min_ratio, ratio=self.ratio, layers=self.layers)


@dataclass
class Recipe:
    router: RouterSettings = field(default_factory=RouterSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    dtype: str = "auto"
    version: int = RECIPE_VERSION

    def validate(self) -> "Recipe":
        if isinstance(self.version, bool) or self.version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {self.version!r} is not supported (this pmod-convert reads version "
                              f"{RECIPE_VERSION}); write the recipe for version {RECIPE_VERSION} or upgrade pmod-convert")
        if self.dtype not in DTYPES:
            raise RecipeError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.router.validate()
        self.schedule.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        return build_settings(cls, data, where).validate()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(read_yaml_mapping(path, "recipe"), where=str(path))


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping, with one-line errors naming ``what`` it is."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{what} file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{what} {path} must be a mapping, got {type(data).__name__}")
    return data


def build_settings(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` for a settings dataclass: unknown keys rejected, values type-checked, nested sections built."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_settings(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, fields[name].type, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    text = str(annotation)
    if value is None:
        if "None" in text:
            return None
        raise RecipeError(f"{where} must not be null")
    if text.startswith("list"):
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        inner = text[text.index("[") + 1:text.rindex("]")]
        return [_coerce(v, inner, where) for v in value]
    if text.startswith("bool"):
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}")
        return value
    if text.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, got {value!r}")
        return value
    if text.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if text.startswith("str"):
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}")
        return value
    return value
