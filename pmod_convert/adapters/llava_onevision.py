"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP + any-res images + pooled video, Qwen2 LM."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import scaffold as tiny
from .base import register
from .llava import TOWER_NOTE
from .llava_next import LlavaNextAdapter, anyres_image_tokens, anyres_pixels, anyres_typical_image, num_tiles, size_table
from .qwen2_vl import QWEN2_05B, VOCAB_NOTE

# (height, width) of the default dummy images, cycled: 36, 88, 52 tokens (single-image rows).
DEFAULT_IMAGE_SIZES = ((32, 32), (64, 64), (32, 64))


def tiny_config(**overrides: Any):
    """Tiny OneVision: SigLIP 32px / patch 8 (16 tokens per tile), pinpoints up to 64x64, Qwen2 LM.

    Single-image row: 32x32 -> 36 tokens, 32x64 -> 52, 64x64 -> 88.  Image in a multi-image row:
    17 tokens.  Video: 4 tokens per frame + 1.
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text, vision, top, attn = tiny.split_overrides(overrides)
    vc = SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False),
                               **vision})
    tc = Qwen2Config(**tiny.text_defaults(**text))
    s = vc.image_size
    kw = dict(image_token_index=tiny.tok("<image>"), video_token_index=tiny.tok("<video>"),
              image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
              vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
              tie_word_embeddings=tc.tie_word_embeddings, pad_token_id=tc.pad_token_id)
    kw.update(top)
    return tiny.finish_config(LlavaOnevisionConfig(vision_config=vc, text_config=tc, **kw), attn)


def image_tokens(config, height: int, width: int, *, single_image_row: bool = True) -> int:
    max_patches = int(config.vision_aspect_ratio.strip("anyres_max_"))
    return anyres_image_tokens(config, height, width, patched=single_image_row, max_num_patches=max_patches)


def video_tokens(config, num_frames: int) -> int:
    side = config.vision_config.image_size // config.vision_config.patch_size
    return num_frames * math.ceil(side / 2) ** 2 + 1


def dummy_inputs(config, *, batch_size: int = 1, text_lengths=None, images_per_row=None,
                 padding_side: str = "left", seed: int = 0, image_sizes=None,
                 videos_per_row=None, num_frames: int = 4) -> dict[str, torch.Tensor]:
    """Inputs for LLaVA-OneVision.

    ``image_sizes``: flat list of (height, width) per image (default cycles ``DEFAULT_IMAGE_SIZES``,
    so rows differ in token count).  Rows may hold 0, 1 or several images: as in the processor, an
    image alone in its row is tiled any-res, images of multi-image rows use only the base tile
    (``batch_num_images`` is passed).  ``videos_per_row`` (default 0) adds ``<video>`` blocks of
    ``num_frames`` frames each (``pixel_values_videos`` ``(num_videos, frames, 3, S, S)``), placed
    after the images of the row.
    """
    g = tiny.generator(seed)
    n_per_row = tiny.per_row(images_per_row, batch_size, 1, "images_per_row")
    v_per_row = tiny.per_row(videos_per_row, batch_size, 0, "videos_per_row")
    lengths = tiny.per_row(text_lengths, batch_size, lambda i: 8 + 5 * i, "text_lengths")
    sizes = tiny.per_image(image_sizes, sum(n_per_row), DEFAULT_IMAGE_SIZES)
    it = iter(sizes)
    segments, tiles = [], []
    n_vid = video_tokens(config, num_frames)
    for n, nv in zip(n_per_row, v_per_row):
        row = []
        for _ in range(n):
            h, w = next(it)
            row.append([config.image_token_id] * image_tokens(config, h, w, single_image_row=(n == 1)))
            tiles.append(num_tiles(config, h, w) if n == 1 else 1)
        row += [[config.video_token_id] * n_vid for _ in range(nv)]
        segments.append(row)
    input_ids, attention_mask = tiny.build_rows(segments, lengths, config.text_config.vocab_size, g,
                                                padding_side=padding_side)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if sizes:
        out["pixel_values"] = anyres_pixels(g, config, tiles)
        out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        out["batch_num_images"] = torch.tensor(n_per_row, dtype=torch.long)
    if sum(v_per_row):
        s = config.vision_config.image_size
        out["pixel_values_videos"] = tiny.rand_pixels(g, sum(v_per_row), num_frames, 3, s, s)
    return out


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    vision_token_attrs = ("image_token_id", "video_token_id")
    tiny_named_tokens = {"image_token": "<image>", "video_token": "<video>"}
    tiny_chat_style = "chatml"
    nested_images = True  # one list of images per sample (single images are tiled any-res, several are not)
    placeholder_fallback = True  # its processor needs a video processor (torchvision)
    shapes = {
        "llava-onevision-0.5b": (
            "LLaVA-OneVision-0.5B: the Qwen2-0.5B decoder behind SigLIP 384/14 any-res (anyres_max_9)",
            {**QWEN2_05B, "vision_image_size": 384, "vision_patch_size": 14, "vision_hidden_size": 32,
             "vision_intermediate_size": 64, "vision_num_hidden_layers": 2, "vision_num_attention_heads": 2,
             "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]},
            (VOCAB_NOTE, TOWER_NOTE, ("an image alone in its row is tiled any-res (at least 729 base + grid "
                                      "tokens); images of multi-image rows give 730 tokens each"))),
    }

    def typical_image(self, config):
        """SigLIP 384/14 (729 per tile, no CLS) at the largest pinpoint within ``anyres_max_N``: 729 + 81x81 + 81."""
        from ..efficiency import _Section

        aspect = str(_Section(config, [(self.family, None)]).get("vision_aspect_ratio", "") or "")
        max_tiles = None
        if aspect.startswith("anyres_max_"):
            try:
                max_tiles = int(aspect[len("anyres_max_"):])
            except ValueError:
                max_tiles = None
        return anyres_typical_image(self.family, config, max_tiles)

    def image_tokens_of(self, config, height, width):
        return image_tokens(config, height, width, single_image_row=True)

    def vision_layout(self, config, n):
        """An image alone in its row is tiled any-res; images of multi-image rows use the base tile only."""
        from .base import nearest_layout

        patch = config.vision_config.patch_size
        top = max(max(p) for p in config.image_grid_pinpoints)
        table = size_table(patch * max(1, math.ceil(top / (patch * 80))), top,
                           lambda h, w: self.image_tokens_of(config, h, w))
        options = [(t, (size,)) for t, size in table.items()]
        s = config.vision_config.image_size
        base = image_tokens(config, s, s, single_image_row=False)
        k = max(2, round(n / base))
        options.append((k * base, ((s, s),) * k))
        return nearest_layout(options, n)

    def tiny_config(self, **overrides):
        return tiny_config(**overrides)

    def dummy_inputs(self, config, **kwargs):
        return dummy_inputs(config, **kwargs)

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        size = config.vision_config.image_size
        ip = tf.LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size},
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        )
        return ip, None, "LlavaOnevisionProcessor needs a video processor, which needs torchvision"

    def fallback_image_text(self, config, pixels, image_processor, placeholder):
        """The placeholder repeated as many times as the model packs features: an image alone in its sample is
        tiled any-res, images of a multi-image sample use the base tile (``batch_num_images``)."""
        alone = int(pixels["batch_num_images"][0]) == 1
        return [placeholder * image_tokens(config, h, w, single_image_row=alone) for h, w in pixels["image_sizes"].tolist()]


ADAPTER = register(LlavaOnevisionAdapter)
