"""Unit tests of the analytic cost model against hand-computed numbers."""

from __future__ import annotations

import json

import pytest

from pmod_convert.efficiency import (
    Estimate,
    TextShape,
    default_vision_tokens,
    estimate,
    format_estimate,
    layer_cost,
    typical_image,
    vision_tower_flops,
)
from pmod_convert.errors import RecipeError
from pmod_convert.mod.schedule import layer_ratios

# Tiny shape: h=8, f=16, 2 layers, q=2 heads, kv=1 head, d=4.
TINY = TextShape(hidden=8, intermediate=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, vocab=32)

# Hand arithmetic for TINY (1 multiply-add = 2 FLOPs):
#   linear per token = 2 * (h*q*d + 2*h*kv*d + q*d*h + 3*h*f)
#                    = 2 * (8*2*4 + 2*8*1*4 + 2*4*8 + 3*8*16) = 2 * (64 + 64 + 64 + 384) = 1152
#   attention per (query, key) pair = 2*2*q*d = 4*2*4 = 32
#   causal prefill of n tokens attends n*(n+1)/2 pairs
LIN_TOK = 1152
ATT_PAIR = 32
#   KV bytes per cached token per layer = 2 * kv * d * bytes = 2 * 1 * 4 * 2 = 16
KV_TOK = 16

# n_vision = 10, n_text = 4 -> dense layer: n = 14
DENSE_LAYER_14 = 14 * LIN_TOK + (14 * 15 // 2) * ATT_PAIR  # 16128 + 105*32 = 16128 + 3360 = 19488
# MoD layer with ratio 0.5: kept = floor(0.5 * 10) = 5 -> n = 4 + 5 = 9
MOD_LAYER_9 = 9 * LIN_TOK + (9 * 10 // 2) * ATT_PAIR  # 10368 + 45*32 = 10368 + 1440 = 11808


def test_hand_numbers_are_what_we_think():
    assert DENSE_LAYER_14 == 19488
    assert MOD_LAYER_9 == 11808


def test_layer_cost_conventions():
    # Full product (causal=False): 2*2*n_query*n_ctx*q*d.
    assert layer_cost(TINY, 3, 7) == 3 * LIN_TOK + 3 * 7 * ATT_PAIR
    # Causal prefill: n*(n+1)/2 pairs.
    assert layer_cost(TINY, 14, 14, causal=True) == DENSE_LAYER_14
    # Decode step: one query attends to the whole context.
    assert layer_cost(TINY, 1, 20, causal=True) == LIN_TOK + 20 * ATT_PAIR
    # Last 2 queries of a 5-key context: 4 + 5 keys.
    assert layer_cost(TINY, 2, 5, causal=True) == 2 * LIN_TOK + 9 * ATT_PAIR


def test_tiny_estimate_prefill_and_kv():
    est = estimate(TINY, [None, 0.5], 10, 4)
    assert est.dense_decoder_flops == 2 * 19488 == 38976
    assert est.mod_decoder_flops == 19488 + 11808 == 31296
    assert est.flops_ratio == pytest.approx(31296 / 38976)
    assert est.dense_kv_bytes == 2 * 14 * KV_TOK == 448
    assert est.mod_kv_bytes == (14 + 9) * KV_TOK == 368
    assert est.kv_ratio == pytest.approx(368 / 448)
    rows = est.layers
    assert [(r.layer, r.ratio, r.prefill_tokens, r.cached_tokens) for r in rows] == [(0, None, 14, 14), (1, 0.5, 9, 9)]
    assert rows[1].dense_flops == 19488 and rows[1].mod_flops == 11808
    assert est.decode_flops_ratio is None and est.dense_decode_flops == 0
    assert est.num_mod_layers == 1
    assert "decoder layers" in est.counted


def test_tiny_decode():
    # 3 new tokens, step i attends to cached + i + 1 keys:
    #   dense layer (cached 14): pairs = 15 + 16 + 17 = 48 -> 3*1152 + 48*32 = 3456 + 1536 = 4992
    #   MoD layer (cached 9):    pairs = 10 + 11 + 12 = 33 -> 3456 + 33*32 = 3456 + 1056 = 4512
    est = estimate(TINY, [None, 0.5], 10, 4, new_tokens=3)
    assert est.dense_decode_flops == 2 * 4992
    assert est.mod_decode_flops == 4992 + 4512
    assert est.decode_flops_ratio == pytest.approx(9504 / 9984)
    # prefill unchanged; KV after decode adds 3 tokens per layer to both
    assert est.mod_decoder_flops == 31296
    assert est.dense_kv_bytes_final == 448 + 2 * 3 * KV_TOK
    assert est.mod_kv_bytes_final == 368 + 2 * 3 * KV_TOK


def test_ratio_one_everywhere_is_exactly_dense():
    est = estimate(TINY, [1.0, 1.0], 10, 4, new_tokens=5)
    assert est.mod_decoder_flops == est.dense_decoder_flops == 38976
    assert est.mod_kv_bytes == est.dense_kv_bytes
    assert est.mod_decode_flops == est.dense_decode_flops
    assert est.flops_ratio == 1.0 and est.kv_ratio == 1.0 and est.decode_flops_ratio == 1.0


def test_all_dense_gives_ratio_one():
    est = estimate(TINY, [None, None], 10, 4)
    assert est.flops_ratio == 1.0 and est.kv_ratio == 1.0 and est.num_mod_layers == 0


def test_gqa_changes_kv_bytes():
    mha = TextShape(hidden=8, intermediate=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4, vocab=32)
    a = estimate(TINY, [None, 0.5], 10, 4)
    b = estimate(mha, [None, 0.5], 10, 4)
    # 2 kv heads: 2 * 2 * 4 * 2 = 32 bytes per token per layer
    assert b.dense_kv_bytes == 2 * 14 * 32 == 2 * a.dense_kv_bytes
    assert b.mod_kv_bytes == 23 * 32
    # and the k/v projections: linear per token = 2 * (64 + 2*8*2*4 + 64 + 384) = 1280
    assert b.dense_decoder_flops == 2 * (14 * 1280 + 105 * ATT_PAIR)


def test_non_gated_mlp():
    plain = TextShape(8, 16, 2, 2, 1, 4, 32, gated_mlp=False)
    # linear per token = 2 * (64 + 64 + 64 + 2*8*16) = 896
    assert layer_cost(plain, 14, 14, causal=True) == 14 * 896 + 105 * ATT_PAIR


def test_per_sample_lists():
    # sample 1: 10 vision + 4 text (as above); sample 2: 20 vision + 2 text
    #   dense n = 22: 22*1152 + 253*32 = 25344 + 8096 = 33440
    #   MoD (0.5): kept floor(10.0) = 10 -> n = 12: 12*1152 + 78*32 = 13824 + 2496 = 16320
    est = estimate(TINY, [None, 0.5], [10, 20], [4, 2])
    assert est.samples == 2 and est.n_vision == 30 and est.n_text == 6
    assert est.dense_decoder_flops == 2 * (19488 + 33440) == 105856
    assert est.mod_decoder_flops == (19488 + 11808) + (33440 + 16320) == 81056
    assert est.flops_ratio == pytest.approx(81056 / 105856)  # ratio of sums
    assert est.dense_kv_bytes == 2 * (14 + 22) * KV_TOK
    assert est.mod_kv_bytes == ((14 + 22) + (9 + 12)) * KV_TOK
    assert est.layers[1].prefill_tokens == 9 + 12
    # an int broadcasts against a list
    same = estimate(TINY, [None, 0.5], [10, 10], 4)
    assert same.mod_decoder_flops == 2 * 31296
    with pytest.raises(RecipeError):
        estimate(TINY, [None, 0.5], [10, 20, 30], [4, 2])


def test_batch_multiplies():
    est = estimate(TINY, [None, 0.5], 10, 4, batch=3)
    assert est.mod_decoder_flops == 3 * 31296 and est.dense_kv_bytes == 3 * 448
    assert est.flops_ratio == pytest.approx(31296 / 38976)


def test_kept_counts_use_floor():
    # 0.35 * 10 = 3.5 -> 3 kept; 0.29 * 10 = 2.9 -> 2 kept; 0.85 * 20 = 17 exactly -> 17 kept
    est = estimate(TINY, [0.35, 0.29], 10, 4)
    assert [r.prefill_tokens for r in est.layers] == [4 + 3, 4 + 2]
    assert est.mod_decoder_flops == (7 * LIN_TOK + 28 * ATT_PAIR) + (6 * LIN_TOK + 21 * ATT_PAIR)
    est = estimate(TINY, [0.85, None], 20, 0)
    assert est.layers[0].prefill_tokens == 17


def test_vision_flops_added_to_both():
    est = estimate(TINY, [None, 0.5], [10, 20], [4, 2], vision_flops=1000.0)
    assert est.vision_flops == 2000
    assert est.dense_prefill_flops == 105856 + 2000
    assert est.mod_prefill_flops == 81056 + 2000
    assert est.flops_ratio == pytest.approx(83056 / 107856)
    assert est.decoder_flops_ratio == pytest.approx(81056 / 105856)
    assert "vision" in est.counted


def test_to_dict_and_format():
    est = estimate(TINY, [None, 0.5], 10, 4, new_tokens=2, vision_flops=10.0)
    d = est.to_dict()
    text = json.dumps(d)
    assert json.loads(text)["layers"][1]["ratio"] == 0.5
    assert d["counted"] == est.counted and d["shape"]["num_kv_heads"] == 1
    table = format_estimate(est)
    assert "dense" in table and "0.500" in table and "%" in table and "decode 2 new tokens" in table
    assert isinstance(est, Estimate)


def test_bad_inputs():
    with pytest.raises(RecipeError):
        estimate(TINY, [None], 10, 4)  # wrong number of layers
    with pytest.raises(RecipeError):
        estimate(TINY, [None, 1.5], 10, 4)
    with pytest.raises(RecipeError):
        estimate(TINY, [None, 0.5], -1, 4)
    with pytest.raises(RecipeError):
        estimate(TINY, [None, 0.5], 0, 0)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

VICUNA_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
CLIP_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}
LLAVA_NEXT_7B = {
    "model_type": "llava_next",
    "text_config": VICUNA_7B,
    "vision_config": CLIP_336,
    "vision_feature_select_strategy": "default",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
}


def test_text_shape_from_dicts():
    s = TextShape.from_config(LLAVA_NEXT_7B)
    assert s == TextShape(4096, 11008, 32, 32, 32, 128, 32000)  # head_dim = 4096 // 32
    assert TextShape.from_config(VICUNA_7B) == s  # bare text config
    # num_key_value_heads missing -> heads; head_dim missing -> hidden // heads
    bare = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}
    assert TextShape.from_config(bare) == TextShape(64, 128, 3, 4, 4, 16, 0)
    # explicit head_dim and GQA; older Qwen2-VL config.json with text fields at the top level
    qwen = {"model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "vision_config": {"patch_size": 14, "spatial_merge_size": 2}}
    assert TextShape.from_config(qwen) == TextShape(3584, 18944, 28, 28, 4, 128, 152064)
    with pytest.raises(RecipeError):
        TextShape.from_config({"hidden_size": 64})


def test_llava_next_7b_matches_published_figures():
    """p-MoD reports 55.6% TFLOPs and 53.8% KV cache for LLaVA-NeXT-7B (~2,880 vision tokens).

    We assume 100 text tokens (a short benchmark prompt). Our count: decoder FLOPs 54.50%, KV 55.29%;
    with the CLIP-L/336 tower over 5 crops added to both: 56.53%.
    """
    shape = TextShape.from_config(LLAVA_NEXT_7B)
    ratios = layer_ratios(32)
    assert sum(r is None for r in ratios) == 8
    est = estimate(shape, ratios, 2880, 100)
    with_vision = estimate(shape, ratios, 2880, 100, vision_flops=vision_tower_flops(LLAVA_NEXT_7B, 1))
    print(
        f"\nLLaVA-NeXT-7B, 2880 vision + 100 text: FLOPs {est.flops_ratio:.4f}, KV {est.kv_ratio:.4f}, "
        f"FLOPs incl. vision tower {with_vision.flops_ratio:.4f}"
    )
    assert est.flops_ratio == pytest.approx(0.556, abs=0.03)
    assert est.kv_ratio == pytest.approx(0.538, abs=0.03)
    assert with_vision.flops_ratio == pytest.approx(0.556, abs=0.03)
    # pinned values of this calculator (regression guard)
    assert est.flops_ratio == pytest.approx(0.5450, abs=5e-4)
    assert est.kv_ratio == pytest.approx(0.5529, abs=5e-4)
    # KV by hand: dense 32 * 2980 tokens; MoD 8 * 2980 + sum over 24 MoD layers of (100 + floor(r * 2880))
    kept = sum(100 + int(r * 2880) for r in ratios if r is not None)
    assert est.kv_ratio == pytest.approx((8 * 2980 + kept) / (32 * 2980))


def test_default_vision_tokens_per_family():
    assert default_vision_tokens(LLAVA_NEXT_7B) == 576 + 48 * 48 + 48 == 2928
    assert typical_image(LLAVA_NEXT_7B)["tiles"] == 5
    llava = {"model_type": "llava", "vision_config": CLIP_336, "vision_feature_select_strategy": "default"}
    assert default_vision_tokens(llava) == 576
    assert default_vision_tokens({**llava, "vision_feature_select_strategy": "full"}) == 577
    siglip = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
              "num_hidden_layers": 26, "image_size": 384, "patch_size": 14}
    ov = {"model_type": "llava_onevision", "vision_config": siglip, "vision_feature_select_strategy": "full",
          "vision_aspect_ratio": "anyres_max_9",
          "image_grid_pinpoints": [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]}
    assert default_vision_tokens(ov) == 729 + 81 * 81 + 81 == 7371
    qwen = {"model_type": "qwen2_5_vl", "vision_config": {"patch_size": 14, "spatial_merge_size": 2}}
    assert default_vision_tokens(qwen) == (448 // 14) ** 2 // 4 == 256
    assert default_vision_tokens({**qwen, "model_type": "qwen2_vl"}) == 256
    idefics = {"model_type": "idefics3", "scale_factor": 2, "vision_config": {"image_size": 364, "patch_size": 14}}
    assert default_vision_tokens(idefics) == 169 * 5
    assert default_vision_tokens({**idefics, "image_seq_len": 64}) == 64 * 5
    with pytest.raises(RecipeError, match="--vision-tokens"):
        default_vision_tokens({"model_type": "mystery_vlm"})


def test_anyres_tiny_by_hand():
    vis = {"model_type": "clip_vision_model", "image_size": 28, "patch_size": 14}
    # side 2 -> 4 patches (+CLS dropped by "default"); largest pinpoint 56x56 -> 2x2 tiles -> 4x4 grid
    cfg = {"model_type": "llava_next", "vision_config": vis, "vision_feature_select_strategy": "default",
           "image_grid_pinpoints": [[56, 56], [28, 84]]}
    assert default_vision_tokens(cfg) == 4 + 16 + 4
    sig = {"model_type": "siglip_vision_model", "image_size": 28, "patch_size": 14}
    ov = {"model_type": "llava_onevision", "vision_config": sig, "vision_feature_select_strategy": "full",
          "vision_aspect_ratio": "anyres_max_1", "image_grid_pinpoints": [[84, 84]]}
    # 3x3 tiles -> 6x6 grid, scale sqrt(36 / (1 * 4)) = 3 > 1.1 -> 2x2 + 2 newlines, + base 4
    assert default_vision_tokens(ov) == 4 + 4 + 2


def test_vision_tower_flops_by_hand():
    vis = {"model_type": "clip_vision_model", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
           "image_size": 28, "patch_size": 14}
    cfg = {"model_type": "llava", "vision_config": vis, "vision_feature_select_strategy": "default"}
    # p = 4 patches + CLS = 5; per layer 2*5*(4*8*8 + 2*8*16) + 4*5*5*8 = 5120 + 800 = 5920; 2 layers
    assert vision_tower_flops(cfg, 1) == 2 * 5920
    assert vision_tower_flops(cfg, 3) == 3 * 2 * 5920
    qwen = {"model_type": "qwen2_vl",
            "vision_config": {"embed_dim": 8, "depth": 1, "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2}}
    # 448px -> 1024 patches; 2*1024*(4*64 + 2*8*16) + 4*1024*1024*8
    assert vision_tower_flops(qwen, 1) == 2 * 1024 * 512 + 4 * 1024 * 1024 * 8
    q25 = {"model_type": "qwen2_5_vl",
           "vision_config": {"hidden_size": 8, "intermediate_size": 16, "depth": 2, "patch_size": 14,
                             "window_size": 112, "fullatt_block_indexes": [1], "spatial_merge_size": 2}}
    # gated MLP: 2*1024*(4*64 + 3*8*16) per layer; layer 0 windowed (8x8 = 64 keys), layer 1 full
    lin = 2 * 1024 * (256 + 384)
    assert vision_tower_flops(q25, 1) == 2 * lin + 4 * 1024 * 64 * 8 + 4 * 1024 * 1024 * 8
