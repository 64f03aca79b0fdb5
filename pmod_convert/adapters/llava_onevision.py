"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP + any-res images + pooled video, Qwen2 LM."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import tiny
from .base import ArchitectureAdapter, register
from .llava import lora_regex
from .llava_next import anyres_image_tokens, anyres_pixels, num_tiles

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


ADAPTER = register(
    ArchitectureAdapter(
        family="llava_onevision",
        projector="multi_modal_projector",
        model_types=("llava_onevision",),
        model_class="LlavaOnevisionForConditionalGeneration",
        layers_path="model.language_model.layers",
        text_config_attr="text_config",
        vision_token_attrs=("image_token_id", "video_token_id"),
        lora_target_regex=lora_regex("model.language_model.layers"),
        never_quantize=("vision_tower", "multi_modal_projector", "image_newline", "lm_head", "pmod_router"),
        tiny_config=tiny_config,
        dummy_inputs=dummy_inputs,
    )
)
