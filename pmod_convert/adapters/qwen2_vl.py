"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``): native-resolution ViT + M-RoPE decoder."""

from __future__ import annotations

from typing import Any

import torch

from .. import tiny
from .base import ArchitectureAdapter, register
from .llava import lora_regex

# (height, width) in pixels of the default dummy images, cycled: 16, 36, 24 tokens.
DEFAULT_IMAGE_SIZES = ((64, 64), (96, 96), (64, 96))
# (t, h, w) patch grid of the default dummy video: 2 temporal patches (4 frames) of 4x4 -> 8 tokens.
DEFAULT_VIDEO_GRID = (2, 4, 4)


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2  # Qwen's [16, 24, 24] for head_dim 128
    hw = 3 * half // 8
    return [half - 2 * hw, hw, hw]


def _tiny_config(family: str, overrides: dict[str, Any]):
    import transformers as tf

    text, vision, top, attn = tiny.split_overrides(overrides)
    t = tiny.text_defaults(pad_token_id=tiny.tok("<|endoftext|>"), bos_token_id=tiny.tok("<|endoftext|>"),
                           eos_token_id=tiny.tok("<|im_end|>"))
    t.update(text)
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    t.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1_000_000.0,
                                     "mrope_section": _mrope_section(head_dim)})
    v: dict[str, Any] = dict(depth=2, num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        tc, cfg_cls = tf.Qwen2VLTextConfig(**t), tf.Qwen2VLConfig
        v.update(embed_dim=32, mlp_ratio=2, hidden_size=t["hidden_size"])
        vc = tf.Qwen2VLVisionConfig(**{**v, **vision})
    else:
        tc, cfg_cls = tf.Qwen2_5_VLTextConfig(**t), tf.Qwen2_5_VLConfig
        v.update(hidden_size=32, intermediate_size=64, out_hidden_size=t["hidden_size"], window_size=32,
                 fullatt_block_indexes=[1])
        vc = tf.Qwen2_5_VLVisionConfig(**{**v, **vision})
    kw = dict(image_token_id=tiny.tok("<|image_pad|>"), video_token_id=tiny.tok("<|video_pad|>"),
              vision_start_token_id=tiny.tok("<|vision_start|>"), vision_end_token_id=tiny.tok("<|vision_end|>"),
              tie_word_embeddings=tc.tie_word_embeddings)
    kw.update(top)
    config = cfg_cls(text_config=tc, vision_config=vc, **kw)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # used by generate()
        setattr(config, key, getattr(tc, key))
    return tiny.finish_config(config, attn)


def tiny_config_qwen2_vl(**overrides: Any):
    """Tiny Qwen2-VL: ViT patch 8, merge 2 (a HxW image gives (H/16)*(W/16) tokens; 64x64 -> 16), LM hidden 64.

    ``mrope_section`` is derived from the head dim ([2, 3, 3] for head_dim 16); the vision merger
    output follows the text ``hidden_size``.
    """
    return _tiny_config("qwen2_vl", overrides)


def tiny_config_qwen2_5_vl(**overrides: Any):
    """Tiny Qwen2.5-VL: like tiny Qwen2-VL, with window attention (window 32px, full attention in block 1)."""
    return _tiny_config("qwen2_5_vl", overrides)


def image_grid(config, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of an image, (height, width) rounded to multiples of patch*merge (min 1)."""
    vc = config.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    gh = max(1, round(height / unit)) * vc.spatial_merge_size
    gw = max(1, round(width / unit)) * vc.spatial_merge_size
    return 1, gh, gw


def grid_tokens(config, grid) -> int:
    t, h, w = grid
    return t * h * w // config.vision_config.spatial_merge_size ** 2


def _patches(g, config, grids) -> torch.Tensor:
    vc = config.vision_config
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    return tiny.rand_pixels(g, sum(t * h * w for t, h, w in grids), dim)


def dummy_inputs(config, *, batch_size: int = 1, text_lengths=None, images_per_row=None,
                 padding_side: str = "left", seed: int = 0, image_sizes=None,
                 videos_per_row=None, video_grid=DEFAULT_VIDEO_GRID) -> dict[str, torch.Tensor]:
    """Inputs for Qwen2-VL / Qwen2.5-VL.

    ``image_sizes``: flat list of (height, width) in pixels per image (rounded to multiples of 16;
    default cycles ``DEFAULT_IMAGE_SIZES``, so rows differ in token count).  Rows may hold 0 or
    more images and ``videos_per_row`` videos (default 0) of patch grid ``video_grid``.  Each vision
    block is wrapped in ``<|vision_start|> ... <|vision_end|>``.  Returns flattened-patch
    ``pixel_values`` + ``image_grid_thw`` (and ``pixel_values_videos`` + ``video_grid_thw``) and
    ``mm_token_type_ids`` (0 text, 1 image, 2 video), which transformers 5.x requires for M-RoPE
    whenever a grid is passed.
    """
    g = tiny.generator(seed)
    n_per_row = tiny.per_row(images_per_row, batch_size, 1, "images_per_row")
    v_per_row = tiny.per_row(videos_per_row, batch_size, 0, "videos_per_row")
    lengths = tiny.per_row(text_lengths, batch_size, lambda i: 8 + 5 * i, "text_lengths")
    sizes = tiny.per_image(image_sizes, sum(n_per_row), DEFAULT_IMAGE_SIZES)
    grids = [image_grid(config, h, w) for h, w in sizes]
    vgrid = tuple(int(x) for x in video_grid)
    start, end = config.vision_start_token_id, config.vision_end_token_id
    it = iter(grids)
    segments = []
    for n, nv in zip(n_per_row, v_per_row):
        row = [[start] + [config.image_token_id] * grid_tokens(config, next(it)) + [end] for _ in range(n)]
        row += [[start] + [config.video_token_id] * grid_tokens(config, vgrid) + [end] for _ in range(nv)]
        segments.append(row)
    input_ids, attention_mask = tiny.build_rows(
        segments, lengths, config.text_config.vocab_size, g, prefix=(tiny.tok("<|im_start|>"),),
        pad_id=config.text_config.pad_token_id, padding_side=padding_side)
    mm = torch.zeros_like(input_ids)
    mm[input_ids == config.image_token_id] = 1
    mm[input_ids == config.video_token_id] = 2
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm}
    if grids:
        out["pixel_values"] = _patches(g, config, grids)
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    if sum(v_per_row):
        vgrids = [vgrid] * sum(v_per_row)
        out["pixel_values_videos"] = _patches(g, config, vgrids)
        out["video_grid_thw"] = torch.tensor(vgrids, dtype=torch.long)
    return out


_COMMON = dict(
    layers_path="model.language_model.layers",
    text_config_attr="text_config",
    vision_token_attrs=("image_token_id", "video_token_id"),
    lora_target_regex=lora_regex("model.language_model.layers"),
    never_quantize=("visual", "lm_head", "pmod_router"),
    projector="visual.merger",
    dummy_inputs=dummy_inputs,
)

ADAPTER = register(
    ArchitectureAdapter(family="qwen2_vl", model_types=("qwen2_vl",), model_class="Qwen2VLForConditionalGeneration",
                        tiny_config=tiny_config_qwen2_vl, **_COMMON)
)
ADAPTER_2_5 = register(
    ArchitectureAdapter(family="qwen2_5_vl", model_types=("qwen2_5_vl",),
                        model_class="Qwen2_5_VLForConditionalGeneration", tiny_config=tiny_config_qwen2_5_vl, **_COMMON)
)
