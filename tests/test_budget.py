"""The budget solver and the cost-model addition, against hand-computed numbers (no model needed)."""

from __future__ import annotations

import math

import pytest

from pmod_convert.calibration.budget import (
    BudgetError,
    Workload,
    curve_ratios,
    family_curve,
    isotonic_decreasing,
    measured_curve,
    solve_budget,
)
from pmod_convert.efficiency import TextShape, vision_tower_flops, vision_tower_flops_for_tokens
from pmod_convert.errors import RecipeError
from pmod_convert.mod.schedule import layer_ratios

# h=8, f=16, q=2 heads, kv=1 head, d=4 (the shape of tests/test_efficiency.py), 2 layers.
TINY = TextShape(hidden=8, intermediate=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, vocab=32)
# Per token: linears 2*(8*2*4 + 2*8*1*4 + 2*4*8 + 3*8*16) = 1152 FLOPs; per causal (query, key) pair 4*2*4 = 32.
# A layer processing n tokens costs 1152*n + 32*n*(n+1)/2 = 1152*n + 16*n*(n+1).


def cost(n: int) -> int:
    return 1152 * n + 16 * n * (n + 1)


# One sample: 10 vision + 4 text tokens. Dense layer: cost(14) = 19488; the model: 38976.
DENSE = 2 * cost(14)
assert cost(14) == 19488
ONE = Workload(TINY, [10], [4])


def test_constant_budget_hand_computed():
    # kept 7 of 10 vision tokens in both layers: 2 * cost(11) / 38976 = 29568 / 38976 = 0.7586
    sol = solve_budget(ONE, target_flops=0.76, kind="constant")
    assert sol.settings.kind == "constant" and 0.7 <= sol.settings.ratio < 0.8
    assert sol.achieved == pytest.approx(2 * cost(11) / DENSE) == pytest.approx(0.758621, abs=1e-6)
    assert sol.reachable == pytest.approx((2 * cost(5) / DENSE, 1.0))  # min_ratio 0.15 keeps 1 token
    assert sol.settings.layer_ratios(2) == sol.ratios


def test_constant_budget_in_a_kept_count_step_moves_one_layer():
    # 0.80 lies between kept 7 (0.7586) and kept 8 (0.8374) in both layers; one layer at 8, one at 7:
    # (cost(12) + cost(11)) / 38976 = (16320 + 14784) / 38976 = 0.79803
    sol = solve_budget(ONE, target_flops=0.80, kind="constant")
    assert sol.achieved == pytest.approx((cost(12) + cost(11)) / DENSE) == pytest.approx(0.798030, abs=1e-6)
    assert sol.settings.kind == "explicit" and sol.gap_filled_layers == [0]
    kept = [math.floor(r * 10 + 1e-6) for r in sol.ratios]
    assert kept == [8, 7]


def test_shiftedcos_budget_hand_computed():
    # 2 layers: curve cos(0)/2 = 0.5 and cos(pi)/2 = -0.5. With avg a <= 0.35 layer 0 keeps 0.5 + a and
    # layer 1 keeps max(a - 0.5, 0.15) = 0.15 (1 token). Target 0.54: kept 7 in layer 0 (a in [0.2, 0.3)):
    # (cost(11) + cost(5)) / 38976 = (14784 + 6240) / 38976 = 0.53941
    sol = solve_budget(ONE, target_flops=0.54)
    assert sol.settings.kind == "shiftedcos" and 0.2 <= sol.settings.avg_ratio < 0.3
    assert sol.ratios == [pytest.approx(0.5 + sol.value), 0.15]
    assert sol.achieved == pytest.approx((cost(11) + cost(5)) / DENSE) == pytest.approx(0.539409, abs=1e-6)
    # a = 0: layers keep 0.5, 0.15 -> (11808 + 6240) / 38976; a = 1: layer 0 dense, layer 1 keeps 0.5.
    assert sol.reachable == pytest.approx(((cost(9) + cost(5)) / DENSE, (cost(14) + cost(9)) / DENSE))
    assert sol.settings.layer_ratios(2) == sol.ratios
    assert sol.ratios == layer_ratios(2, "shiftedcos", avg_ratio=sol.value)


def test_shiftedcos_gap_when_a_layer_turns_dense_is_filled():
    # Layer 0 jumps from 0.85 (kept 8: 0.5788) to dense (0.6601) when a passes 0.35. Target 0.62 is filled by
    # giving layer 0 an intermediate ratio in [0.9, 1): kept 9 -> (17888 + 6240) / 38976 = 0.61905
    sol = solve_budget(ONE, target_flops=0.62)
    assert sol.gap_filled_layers == [0] and sol.settings.kind == "explicit"
    assert 0.9 <= sol.ratios[0] < 1.0 and sol.ratios[1] == 0.15
    assert sol.achieved == pytest.approx((cost(13) + cost(5)) / DENSE) == pytest.approx(0.619048, abs=1e-6)


def test_kv_budget_and_vision_tower():
    # KV: kept 5 of 10 in both layers: (4 + 5) / 14 = 0.642857
    sol = solve_budget(ONE, target_kv=0.64, kind="constant")
    assert sol.metric == "kv" and sol.achieved == pytest.approx(9 / 14)
    # A vision tower as expensive as the dense decoder, added to both: kept 5 ->
    # (2 * cost(9) + 38976) / (38976 + 38976) = 62592 / 77952 = 0.80296
    with_tower = Workload(TINY, [10], [4], vision_flops=[float(DENSE)])
    sol = solve_budget(with_tower, target_flops=0.80, kind="constant")
    assert sol.achieved == pytest.approx((2 * cost(9) + DENSE) / (2 * DENSE)) == pytest.approx(0.802956, abs=1e-6)
    assert sol.reachable[0] == pytest.approx((2 * cost(5) + DENSE) / (2 * DENSE))


def test_per_sample_token_counts_are_summed():
    # Two samples (10 + 4 and 20 + 2 tokens), constant ratio 0.5: kept 5 and 10.
    two = Workload(TINY, [10, 20], [4, 2])
    sol = solve_budget(two, target_flops=(cost(9) + cost(12)) / (cost(14) + cost(22)), kind="constant")
    assert [math.floor(r * 10 + 1e-6) for r in sol.ratios] == [5, 5]
    assert sol.achieved == pytest.approx((cost(9) + cost(12)) / (cost(14) + cost(22)))


def test_out_of_reach_budget_names_the_range():
    with pytest.raises(BudgetError) as info:
        solve_budget(ONE, target_flops=0.3, kind="constant")  # lowest: 2 * cost(5) / 38976 = 0.3202
    message = str(info.value)
    assert "\n" not in message and "reachable 0.320-1.000" in message
    with pytest.raises(BudgetError, match=r"reachable 0\.463-0\.803"):
        solve_budget(ONE, target_flops=0.9)


def test_too_coarse_token_counts_are_reported():
    # 0.55 sits between 0.5394 (kept 7) and 0.5788 (kept 8) in the only layer that can move: off by 0.0106.
    with pytest.raises(BudgetError, match=r"cannot be met within 0.01.*0\.539"):
        solve_budget(ONE, target_flops=0.55)


def test_bad_requests():
    with pytest.raises(RecipeError, match="exactly one budget"):
        solve_budget(ONE, target_flops=0.5, target_kv=0.5)
    with pytest.raises(RecipeError, match="exactly one budget"):
        solve_budget(ONE)
    with pytest.raises(RecipeError, match="cannot fit"):
        solve_budget(ONE, target_flops=0.5, kind="explicit")
    with pytest.raises(RecipeError, match="ratio > 0"):
        solve_budget(ONE, target_flops=-1)
    with pytest.raises(RecipeError, match="no curve or layer order"):
        solve_budget(ONE, target_flops=0.5, kind="constant", order=[1, 0])


@pytest.mark.parametrize("kind", ["shiftedcos", "shiftedlinear"])
@pytest.mark.parametrize("depth", [1, 2, 7, 32])
def test_curve_rule_is_the_prd_schedule(kind, depth):
    for a in (0.0, 0.17, 0.5, 0.83, 1.0):
        ours = curve_ratios(family_curve(kind, depth), a, max_ratio=0.85, min_ratio=0.15)
        assert ours == layer_ratios(depth, kind, avg_ratio=a, max_ratio=0.85, min_ratio=0.15)


def test_reordering_layers_keeps_the_cost():
    shape = TextShape(hidden=8, intermediate=16, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=4, vocab=32)
    work = Workload(shape, [10, 30], [4, 6])
    prd = solve_budget(work, target_flops=0.6)
    shuffled = solve_budget(work, target_flops=0.6, order=[2, 0, 3, 1])
    assert shuffled.achieved == pytest.approx(prd.achieved)
    assert sorted(r or 2 for r in shuffled.ratios) == sorted(r or 2 for r in prd.ratios)
    assert shuffled.ratios[2] == prd.ratios[0] and shuffled.ratios[1] == prd.ratios[3]


def test_measured_curve_is_monotone_and_spans_the_cosine_range():
    assert isotonic_decreasing([0.2, 0.8, 0.5, 0.1]) == pytest.approx([0.5, 0.5, 0.5, 0.1])
    assert measured_curve([0.2, 0.8, 0.5, 0.1], [0, 1, 2, 3]) == pytest.approx([0.5, 0.5, 0.5, -0.5])
    # In another order (position -> layer) the profile is read in that order.
    # read: 0.8, 0.5, 0.2, 0.1 (already decreasing), scaled by (v - 0.1) / 0.7 - 0.5
    assert measured_curve([0.2, 0.8, 0.5, 0.1], [1, 2, 0, 3]) == pytest.approx([0.5, 0.4 / 0.7 - 0.5, 0.1 / 0.7 - 0.5, -0.5])
    assert measured_curve([0.3, 0.3], [0, 1]) == [0.0, 0.0]


def test_vision_tower_flops_for_real_token_counts():
    # Fixed-crop family: proportional to the image's tokens (576 = the typical LLaVA-1.5 image).
    llava = {"model_type": "llava", "vision_feature_select_strategy": "default",
             "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14,
                               "hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 4096}}
    one = vision_tower_flops(llava, 1)
    assert vision_tower_flops_for_tokens(llava, [576]) == one
    assert vision_tower_flops_for_tokens(llava, [576, 576]) == 2 * one
    assert vision_tower_flops_for_tokens(llava, [288]) == round(one / 2)
    # Qwen2-VL: n tokens = n * 4 patches (merge 2x2); per layer 2*p*(4h^2 + 2hf) + 4*p*p*h.
    # h=8, f=16 (mlp_ratio 2), 2 layers. 3 tokens -> p=12: 2*12*(256 + 256)*2 + 4*144*8*2 = 24576 + 9216 = 33792
    # 1 token -> p=4: 2*4*512*2 + 4*16*8*2 = 8192 + 1024 = 9216
    qwen = {"model_type": "qwen2_vl", "vision_config": {"embed_dim": 8, "depth": 2, "mlp_ratio": 2,
                                                         "patch_size": 14, "spatial_merge_size": 2}}
    assert vision_tower_flops_for_tokens(qwen, [3]) == 33792
    assert vision_tower_flops_for_tokens(qwen, [3, 1]) == 33792 + 9216
    assert vision_tower_flops_for_tokens(qwen, []) == 0
    with pytest.raises(RecipeError):
        vision_tower_flops_for_tokens(qwen, [-1])
