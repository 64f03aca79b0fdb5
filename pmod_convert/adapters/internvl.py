"""InternVL 3 / 3.5 (``internvl``): InternViT tower, pixel-shuffle projector (0.5 downsample), Qwen2 or Llama decoder.
Each 448 px tile gives ``image_seq_length`` (256) tokens between ``<img>`` and ``</img>``."""

from __future__ import annotations

from typing import Any

from . import scaffold as tiny
from .base import ArchitectureAdapter, register

TOKEN_NAMES = {4: "<IMG_CONTEXT>", 6: "<img>", 7: "</img>"}
TYPICAL_TILES = 7  # assumed split of a typical image: 6 tiles + thumbnail (InternVL's dynamic tiling, max 12)


def tiny_config(**overrides: Any):
    """Tiny InternVL: InternViT 32px / patch 4 (64 patches + CLS), downsample 0.5 -> 16 tokens per tile; Qwen2 LM."""
    import transformers as tf

    text, vision, top, attn = tiny.split_overrides(overrides)
    vc = tf.InternVLVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=4), **vision})
    tc = tf.Qwen2Config(**tiny.text_defaults(**text))
    side = vc.image_size[0] // vc.patch_size[0]
    kw = dict(image_token_id=4, image_seq_length=int(side * side * 0.25), downsample_ratio=0.5,
              vision_feature_layer=-1, vision_feature_select_strategy="default",
              tie_word_embeddings=tc.tie_word_embeddings)
    kw.update(top)
    config = tf.InternVLConfig(text_config=tc, vision_config=vc, **kw)
    tiny.copy_token_ids(config, tc)
    return tiny.finish_config(config, attn)


class InternVLAdapter(ArchitectureAdapter):
    family = "internvl"
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"
    tiny_token_names = TOKEN_NAMES
    tiny_named_tokens = {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                         "end_image_token": "</img>", "video_token": "<video>"}
    tiny_chat_style = "chatml"
    tiny_image_text = "<IMG_CONTEXT>"
    placeholder_fallback = True  # InternVLProcessor needs a video processor (torchvision): expand <IMG_CONTEXT> here
    tiny_rows = (dict(images_per_row=[1], text_lengths=[12]), dict(images_per_row=[2], text_lengths=[5]))
    tiny_varied = {"images_per_row": [1, 2]}  # fixed-size images: rows differ in their number of images

    def typical_image(self, config):
        """``TYPICAL_TILES`` tiles (dynamic tiling + thumbnail) x ``image_seq_length`` (256 for 448/14 x 0.5^2)."""
        from ..efficiency import _get, _vision_section

        vision = _vision_section(config)
        size, patch = vision.get("image_size", [448, 448]), vision.get("patch_size", [14, 14])
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        seq = int(_get(config, "image_seq_length") or (size // patch) ** 2 // 4)
        return {"model_type": self.family, "vision_tokens": seq * TYPICAL_TILES, "tiles": TYPICAL_TILES,
                "patches_per_tile": (size // patch) ** 2 + 1,
                "assumption": f"one image as {TYPICAL_TILES - 1} tiles + thumbnail of {size}px x image_seq_length {seq}"}

    def image_tokens_of(self, config, height, width):
        return int(config.image_seq_length)

    def vision_layout(self, config, n):
        s = config.vision_config.image_size[0]
        per = self.image_tokens_of(config, s, s)
        k = max(1, round(n / per))
        return ((s, s),) * k, k * per

    def tiny_config(self, **overrides):
        return tiny_config(**overrides)

    def dummy_inputs(self, config, **kwargs):
        """One tile per image: ``<img>`` + ``image_seq_length`` placeholders + ``</img>``."""
        s = config.vision_config.image_size[0]
        segment = [6] + [config.image_token_id] * config.image_seq_length + [7]
        tc = config.text_config
        return tiny.fixed_image_inputs(config, image_segment=segment, pixel_shape=(3, s, s), vocab_size=tc.vocab_size,
                                       pad_id=tc.pad_token_id, **kwargs)

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        s = config.vision_config.image_size[0]
        ip = tf.GotOcr2ImageProcessorPil(size={"height": s, "width": s}, crop_to_patches=False)
        return ip, None, "InternVLProcessor needs a video processor, which needs torchvision"

    def fallback_image_text(self, config, pixels, image_processor, placeholder):
        """As InternVLProcessor: ``<img>`` + ``<IMG_CONTEXT>`` x image_seq_length x tiles + ``</img>`` per image."""
        tiles = pixels.pop("num_patches").tolist()
        return ["<img>" + placeholder * (int(config.image_seq_length) * int(n)) + "</img>" for n in tiles]


ADAPTER = register(InternVLAdapter)
