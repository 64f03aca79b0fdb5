"""LLaVA-NeXT-Video (``llava_next_video``): LLaVA-NeXT any-res images plus videos (CLIP features pooled 2x2 per
frame); both image and video placeholders are routing targets."""

from __future__ import annotations

from typing import Any

import torch

from . import scaffold as tiny
from .base import register
from .llava_next import LlavaNextAdapter, anyres_pixels, image_tokens, num_tiles
from .llava_next import tiny_config as next_tiny_config

DEFAULT_IMAGE_SIZES = ((32, 32), (64, 64), (32, 64))
TYPICAL_FRAMES = 32  # frames of a typical video (LLaVA-NeXT-Video samples 32)


def tiny_config(**overrides: Any):
    """Tiny LLaVA-NeXT-Video: the tiny LLaVA-NeXT geometry (16 tokens per tile) plus 4 tokens per video frame."""
    import transformers as tf

    base = next_tiny_config(**overrides)
    kw = {k: getattr(base, k) for k in ("image_grid_pinpoints", "vision_feature_layer",
                                          "vision_feature_select_strategy", "tie_word_embeddings")}
    config = tf.LlavaNextVideoConfig(vision_config=base.vision_config, text_config=base.text_config,
                                     image_token_index=base.image_token_id, video_token_index=tiny.tok("<video>"),
                                     image_seq_length=base.image_seq_length, spatial_pool_stride=2,
                                     pad_token_id=base.text_config.pad_token_id, **kw)
    return tiny.finish_config(config, base._attn_implementation)


def video_tokens(config, num_frames: int) -> int:
    side = config.vision_config.image_size // config.vision_config.patch_size
    return num_frames * (side // config.spatial_pool_stride) ** 2


class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_types = ("llava_next_video",)
    model_class = "LlavaNextVideoForConditionalGeneration"
    vision_token_attrs = ("image_token_id", "video_token_id")
    never_quantize = ("vision_tower", "vision_resampler", "multi_modal_projector", "image_newline", "lm_head",
                      "pmod_router")
    tiny_named_tokens = {"image_token": "<image>", "video_token": "<video>"}
    placeholder_fallback = True  # its processor needs a video processor (torchvision)
    shapes = {}

    def tiny_config(self, **overrides):
        return tiny_config(**overrides)

    def dummy_inputs(self, config, *, batch_size=1, text_lengths=None, images_per_row=None, padding_side="left",
                     seed=0, image_sizes=None, videos_per_row=None, num_frames: int = 4):
        """As LLaVA-NeXT, plus ``videos_per_row`` (default 0) ``<video>`` blocks of ``num_frames`` frames each
        (``pixel_values_videos`` ``(num_videos, frames, 3, S, S)``), after the images of the row."""
        g = tiny.generator(seed)
        n_per_row = tiny.per_row(images_per_row, batch_size, 1, "images_per_row")
        v_per_row = tiny.per_row(videos_per_row, batch_size, 0, "videos_per_row")
        lengths = tiny.per_row(text_lengths, batch_size, lambda i: 8 + 5 * i, "text_lengths")
        sizes = tiny.per_image(image_sizes, sum(n_per_row), DEFAULT_IMAGE_SIZES)
        it = iter(sizes)
        segments = []
        for n, nv in zip(n_per_row, v_per_row):
            row = [[config.image_token_id] * image_tokens(config, *next(it)) for _ in range(n)]
            row += [[config.video_token_id] * video_tokens(config, num_frames) for _ in range(nv)]
            segments.append(row)
        input_ids, attention_mask = tiny.build_rows(segments, lengths, config.text_config.vocab_size, g,
                                                    padding_side=padding_side)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if sizes:
            out["pixel_values"] = anyres_pixels(g, config, [num_tiles(config, h, w) for h, w in sizes])
            out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        if sum(v_per_row):
            s = config.vision_config.image_size
            out["pixel_values_videos"] = tiny.rand_pixels(g, sum(v_per_row), num_frames, 3, s, s)
        return out

    def tiny_processor(self, config, tokenizer, template):
        ip, _, _ = super().tiny_processor(config, tokenizer, template)
        return ip, None, "LlavaNextVideoProcessor needs a video processor, which needs torchvision"

    def fallback_image_text(self, config, pixels, image_processor, placeholder):
        """The placeholder repeated as many times as the model packs features for each image's original size."""
        return [placeholder * image_tokens(config, h, w) for h, w in pixels["image_sizes"].tolist()]


ADAPTER = register(LlavaNextVideoAdapter)
