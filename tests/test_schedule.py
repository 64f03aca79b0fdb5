import math

import pytest

from pmod_convert.errors import RecipeError
from pmod_convert.mod.schedule import kept_count, layer_ratios
from pmod_convert.recipe import Recipe


def test_published_schedule_on_32_layers():
    ratios = layer_ratios(32)  # shiftedcos_decay_0.85_0.15, a = 0.5
    # raw(l) = cos(pi l / 31) / 2 + 0.5 <= 0.85  <=>  l >= 8 (raw(7) = 0.8706, raw(8) = 0.8470)
    assert ratios[:8] == [None] * 8
    assert all(r is not None for r in ratios[8:])
    assert ratios[8] == pytest.approx(math.cos(math.pi * 8 / 31) / 2 + 0.5)
    assert ratios[20] == pytest.approx(math.cos(math.pi * 20 / 31) / 2 + 0.5)
    assert ratios[31] == pytest.approx(0.15)  # raw(31) = 0 is floored at min_ratio
    assert all(a >= b for a, b in zip(ratios[8:], ratios[9:]))  # decays with depth


def test_schedule_generalises_to_other_depths():
    ratios = layer_ratios(24)
    assert ratios[0] is None and ratios[-1] == pytest.approx(0.15)
    raw = [math.cos(math.pi * i / 23) / 2 + 0.5 for i in range(24)]
    assert [r is not None for r in ratios] == [x <= 0.85 for x in raw]
    single = layer_ratios(1, "constant", ratio=0.5)
    assert single == [0.5]


def test_shifted_linear_and_avg_ratio():
    ratios = layer_ratios(11, "shiftedlinear", avg_ratio=0.5, max_ratio=0.85, min_ratio=0.15)
    raw = [0.5 - i / 10 + 0.5 for i in range(11)]
    expected = [None if x > 0.85 + 1e-9 else max(x, 0.15) for x in raw]
    assert ratios == pytest.approx(expected)
    lower = layer_ratios(11, "shiftedlinear", avg_ratio=0.3, max_ratio=0.85, min_ratio=0.15)
    assert sum(r or 1 for r in lower) < sum(r or 1 for r in ratios)


def test_constant_layers_and_explicit():
    assert layer_ratios(4, "constant", ratio=0.5) == [0.5] * 4
    assert layer_ratios(4, "constant", ratio=0.5, layers=[0, 3]) == [0.5, None, None, 0.5]
    assert layer_ratios(4, "shiftedcos", layers=[3]) == [None, None, None, 0.15]
    assert layer_ratios(3, "explicit", ratios=[None, 1.0, 0.25]) == [None, 1.0, 0.25]


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="constant", ratio=1.5), "ratio must be in (0, 1]"),
    (dict(kind="constant", ratio=0.0), "ratio must be in (0, 1]"),
    (dict(kind="constant"), "needs ratio"),
    (dict(min_ratio=0.9, max_ratio=0.5), "must not exceed"),
    (dict(kind="shiftedcos", layers=[7]), "outside 0..3"),
    (dict(kind="explicit", ratios=[0.5]), "one ratio per layer"),
    (dict(kind="zigzag"), "unknown schedule"),
])
def test_bad_schedules(kwargs, message):
    kind = kwargs.pop("kind", "shiftedcos")
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        layer_ratios(4, kind, **kwargs)


def test_kept_count_is_floor_and_float_safe():
    assert kept_count(0.85, 20) == 17  # 0.85 * 20 = 16.999999999999996 in floating point
    assert kept_count(0.5, 7) == 3
    assert kept_count(1.0, 5) == 5
    assert kept_count(0.15, 0) == 0


def test_recipe_roundtrip_and_strictness(tmp_path):
    recipe = Recipe()
    recipe.schedule.kind, recipe.schedule.ratio, recipe.schedule.layers = "constant", 0.4, [1, 2]
    path = tmp_path / "r.yaml"
    recipe.save(path)
    assert Recipe.load(path) == recipe
    path.write_text("schedule:\n  kind: constant\n  ratio: 0.5\n  rato: 0.3\n")
    with pytest.raises(RecipeError, match="unknown key"):
        Recipe.load(path)
    path.write_text("schedule:\n  ratio: high\n")
    with pytest.raises(RecipeError, match="must be a number"):
        Recipe.load(path)
    path.write_text("router: [1, 2]\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        Recipe.load(path)


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        Recipe.load(path)
    assert Recipe.load(Path(__file__).parent.parent / "recipes" / "pmod-published.yaml") == Recipe()
