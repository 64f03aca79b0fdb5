"""Aya Vision (``aya_vision``): SigLIP tower, pixel-shuffle projector (downsample 2), Cohere 2 decoder (parallel
attention + MLP blocks, sliding-window and global layers). Each tile gives ``(image_size/patch/2)^2`` tokens."""

from __future__ import annotations

from typing import Any

from . import scaffold as tiny
from .base import ArchitectureAdapter, register

TOKEN_NAMES = {30: "<|IMG_PATCH|>", 6: "<|START_OF_IMG|>", 7: "<|END_OF_IMG|>", 31: "<|IMG_LINE_BREAK|>",
               5: "TILE_GLOBAL", 10: "TILE"}
TYPICAL_TILES = 5  # assumed split of a typical image: 4 tiles + the global view (max_patches 12)


def tiny_config(**overrides: Any):
    """Tiny Aya Vision: SigLIP 48px / patch 4, downsample 2 -> 36 tokens per tile; Cohere 2 hidden 64 x 4 layers
    (sliding window 128 in layers 0-2, global in 3)."""
    import transformers as tf

    text, vision, top, attn = tiny.split_overrides(overrides)
    vc = tf.SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=48, patch_size=4,
                                         vision_use_head=False), **vision})
    t = tiny.text_defaults(sliding_window=128)
    t.update(text)
    n = t["num_hidden_layers"]
    t.setdefault("layer_types", ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n)])
    tc = tf.Cohere2Config(**t)
    kw = dict(image_token_index=30, downsample_factor=2, vision_feature_layer=-1,
              vision_feature_select_strategy="full", tie_word_embeddings=tc.tie_word_embeddings)
    kw.update(top)
    config = tf.AyaVisionConfig(text_config=tc, vision_config=vc, **kw)
    tiny.copy_token_ids(config, tc)
    return tiny.finish_config(config, attn)


def tile_tokens(config) -> int:
    vc = config.vision_config
    return (vc.image_size // vc.patch_size // config.downsample_factor) ** 2


class AyaVisionAdapter(ArchitectureAdapter):
    family = "aya_vision"
    model_types = ("aya_vision",)
    model_class = "AyaVisionForConditionalGeneration"
    tiny_token_names = TOKEN_NAMES
    tiny_named_tokens = {"image_token": "<image>"}
    tiny_chat_style = "chatml"
    tiny_rows = (dict(images_per_row=[1], text_lengths=[12]), dict(images_per_row=[2], text_lengths=[5]))
    tiny_varied = {"images_per_row": [1, 2]}  # fixed-size images: rows differ in their number of images

    def attention_rope(self, layer):
        """Cohere 2 applies rotary embeddings in its sliding-window layers only; the global layers have none."""
        return getattr(layer.self_attn, "sliding_window", None) is not None

    def typical_image(self, config):
        """``TYPICAL_TILES`` crops of ``image_size`` px, ``(image_size/patch/downsample)^2`` tokens each (169 for
        SigLIP 364/14, downsample 2)."""
        from ..efficiency import _get, _need, _vision_section

        vision = _vision_section(config)
        image, patch = _need(vision, "image_size", self.family), _need(vision, "patch_size", self.family)
        down = int(_get(config, "downsample_factor") or 2)
        per = (image // patch // down) ** 2
        return {"model_type": self.family, "vision_tokens": per * TYPICAL_TILES, "tiles": TYPICAL_TILES,
                "patches_per_tile": (image // patch) ** 2,
                "assumption": f"one image as {TYPICAL_TILES - 1} tiles + global view of {image}px x {per} tokens"}

    def template_image_token(self, config, tokenizer):
        """Aya's template writes ``<image>``; the processor expands it into ``<|START_OF_IMG|>`` ... patches."""
        return "<image>"

    def image_tokens_of(self, config, height, width):
        return tile_tokens(config)

    def tiny_config(self, **overrides):
        return tiny_config(**overrides)

    def dummy_inputs(self, config, **kwargs):
        """One tile per image: ``<|START_OF_IMG|> TILE_GLOBAL`` + placeholders + ``<|END_OF_IMG|>``."""
        s = config.vision_config.image_size
        segment = [6, 5] + [config.image_token_id] * tile_tokens(config) + [7]
        tc = config.text_config
        return tiny.fixed_image_inputs(config, image_segment=segment, pixel_shape=(3, s, s), vocab_size=tc.vocab_size,
                                       pad_id=tc.pad_token_id, **kwargs)

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        vc = config.vision_config
        s = vc.image_size
        ip = tf.GotOcr2ImageProcessorPil(size={"height": s, "width": s}, crop_to_patches=False)
        proc = tf.AyaVisionProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=vc.patch_size,
                                     img_size=s, downsample_factor=config.downsample_factor, chat_template=template,
                                     start_of_img_token="<|START_OF_IMG|>", end_of_img_token="<|END_OF_IMG|>",
                                     img_patch_token="<|IMG_PATCH|>", img_line_break_token="<|IMG_LINE_BREAK|>",
                                     tile_token="TILE", tile_global_token="TILE_GLOBAL")
        return ip, proc, None


ADAPTER = register(AyaVisionAdapter)
