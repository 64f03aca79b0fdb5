"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``): native-resolution ViT + M-RoPE decoder."""

from __future__ import annotations

from typing import Any

import torch

from . import scaffold as tiny
from .base import ArchitectureAdapter, register, square_factors, vit_flops

# Qwen2-0.5B's decoder (the language model of LLaVA-OneVision-0.5B); vocab 151,936 cut to 32,000.
QWEN2_05B = {
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
VOCAB_NOTE = "vocabulary cut to 32,000 tokens (real: 151,936); only embedding/lm_head memory changes"

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
    tiny.copy_token_ids(config, tc)
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
    start = getattr(config, "vision_start_token_id", None) or config.image_start_token_id  # GLM-4V names
    end = getattr(config, "vision_end_token_id", None) or config.image_end_token_id
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


class Qwen2VLAdapter(ArchitectureAdapter):
    """Qwen2-VL: dynamic resolution (patch 14, 2x2 merge), M-RoPE (``mm_token_type_ids``)."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    vision_token_attrs = ("image_token_id", "video_token_id")
    never_quantize = ("visual", "lm_head", "pmod_router")
    projector = "visual.merger"
    mm_token_types = True
    placeholder_fallback = True
    typical_image_px = 448  # dynamic resolution: one fixed size stands for "a typical image"
    default_patch = 14  # the vision config's patch_size when a config.json omits it
    tiny_named_tokens = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                         "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tiny_special_tokens = {"pad_token": "<|endoftext|>", "bos_token": None, "eos_token": "<|im_end|>"}
    tiny_chat_style = "chatml"
    tiny_image_text = "<|vision_start|> <|image_pad|> <|vision_end|>"
    tiny_video_text = "<|vision_start|> <|video_pad|> <|vision_end|>"
    tiny_generated_types = {"mm_token_type_ids": 0}  # a generated token is text
    tiny_rows = (dict(image_sizes=[(64, 64)], text_lengths=[12]), dict(image_sizes=[(96, 96)], text_lengths=[5]))
    shapes = {
        "qwen2-0.5b": ("Qwen2-0.5B decoder (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864) in a Qwen2-VL config",
                       {**QWEN2_05B, "vision_patch_size": 14},
                       (VOCAB_NOTE, "small random vision tower (2 layers, hidden 32) with the real patch geometry; it "
                        "is not what is benchmarked", "Qwen2-VL packaging (M-RoPE): any vision-token count a*b is "
                        "exact (an image of a x b merged 28 px patches)")),
        "tiny": ("tiny Qwen2-VL (hidden 64, 4 layers) for tests and demos", {},
                 ("the default tiny config of the qwen2_vl adapter",)),
    }

    def typical_image(self, config):
        """A ``typical_image_px`` square image: (448/14)^2 = 1024 patches / merge 2x2 = 256 tokens."""
        from ..efficiency import _vision_section

        vision = _vision_section(config)
        patch, merge = int(vision.get("patch_size", self.default_patch)), int(vision.get("spatial_merge_size", 2))
        px = self.typical_image_px
        side = px // patch
        patches = side * side
        tokens = patches // (merge * merge)
        return {"model_type": self.family, "vision_tokens": tokens, "tiles": 1, "patches_per_tile": patches,
                "assumption": f"one {px}x{px}px image: ({px}/{patch})^2 = {patches} patches merged {merge}x{merge} "
                f"-> {tokens}"}

    def tower_crop_flops(self, config, patches):
        """Qwen2-VL ViT: ``embed_dim``, ``depth``, ``mlp_ratio``; full attention over the image's patches."""
        from ..efficiency import _vision_section

        vision = _vision_section(config)
        hidden = int(vision.get("embed_dim", 1280))
        return vit_flops(patches, int(vision.get("depth", 32)), hidden, int(hidden * float(vision.get("mlp_ratio", 4))))

    def tower_flops_for_tokens(self, config, counts):
        """Dynamic resolution: an image of ``n`` tokens was ``n * merge^2`` patches; the tower is counted for
        exactly that many (attention over the image's own patches)."""
        from ..efficiency import _vision_section

        merge = int(_vision_section(config).get("spatial_merge_size", 2))
        return sum(self.tower_crop_flops(config, n * merge * merge) for n in counts if n > 0)

    def image_tokens_of(self, config, height, width):
        return grid_tokens(config, image_grid(config, height, width))

    def vision_layout(self, config, n):
        """Exact: one image of a x b merged patches (a * b = n)."""
        unit = config.vision_config.patch_size * config.vision_config.spatial_merge_size
        a, b = square_factors(n)
        size = (a * unit, b * unit)
        return (size,), self.image_tokens_of(config, *size)

    def fallback_image_text(self, config, pixels, image_processor, placeholder):
        """As Qwen2-VL's processor: the placeholder repeated ``grid_t * grid_h * grid_w / merge^2`` times, nothing
        between (a space would be a token)."""
        merge = int(getattr(image_processor, "merge_size", 1)) ** 2
        return [placeholder * (int(g.prod()) // merge) for g in pixels["image_grid_thw"]]

    def tiny_config(self, **overrides):
        return _tiny_config(self.family, overrides)

    def dummy_inputs(self, config, **kwargs):
        return dummy_inputs(config, **kwargs)

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        vc = config.vision_config
        p, m = vc.patch_size, vc.spatial_merge_size
        ip = tf.Qwen2VLImageProcessorPil(
            patch_size=p, temporal_patch_size=vc.temporal_patch_size, merge_size=m,
            size={"shortest_edge": (p * m) ** 2 * 4, "longest_edge": (p * m) ** 2 * 64},
        )
        return ip, None, f"{self.model_class.replace('ForConditionalGeneration', 'Processor')} needs a video " \
                         "processor, which needs torchvision"


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, with a gated-MLP, window-attention vision tower."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    shapes = {}

    def tower_crop_flops(self, config, patches):
        """Gated MLP; windowed attention, (window_size/patch)^2 patches per window except in
        ``fullatt_block_indexes``."""
        from ..efficiency import _vision_section

        vision = _vision_section(config)
        layers = int(vision.get("depth", 32))
        window = int(vision.get("window_size", 112)) // int(vision.get("patch_size", 14))
        full = set(vision.get("fullatt_block_indexes", [7, 15, 23, 31]) or [])
        ctx = [patches if i in full else min(patches, window * window) for i in range(layers)]
        return vit_flops(patches, layers, int(vision.get("hidden_size", 1280)),
                         int(vision.get("intermediate_size", 3420)), gated=True, attn_ctx=ctx)


ADAPTER = register(Qwen2VLAdapter)
ADAPTER_2_5 = register(Qwen2_5_VLAdapter)
