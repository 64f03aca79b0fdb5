"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution tiles + unpadding + newline tokens."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import tiny
from .base import ArchitectureAdapter, register
from .llava import lora_regex

# (height, width) of the default dummy images, cycled over the images of a batch: 36, 88, 52 tokens.
DEFAULT_IMAGE_SIZES = ((32, 32), (64, 64), (32, 64))


def tiny_config(**overrides: Any):
    """Tiny LLaVA-NeXT: CLIP 32px / patch 8 tiles (16 tokens per tile), pinpoints 32x64, 64x32, 64x64.

    Tokens per image depend on its size: 32x32 -> 36, 32x64 -> 52, 64x64 -> 88 (``image_tokens``).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    text, vision, top, attn = tiny.split_overrides(overrides)
    vc = CLIPVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
                             **vision})
    tc = LlamaConfig(**tiny.text_defaults(**text))
    s = vc.image_size
    kw = dict(image_token_index=tiny.tok("<image>"), image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
              image_seq_length=(s // vc.patch_size) ** 2, vision_feature_layer=-2,
              vision_feature_select_strategy="default", tie_word_embeddings=tc.tie_word_embeddings,
              pad_token_id=tc.pad_token_id)
    kw.update(top)
    return tiny.finish_config(LlavaNextConfig(vision_config=vc, text_config=tc, **kw), attn)


def num_tiles(config, height: int, width: int) -> int:
    """Tiles the vision tower sees for one image: best-fit grid + 1 base tile."""
    from transformers.image_processing_utils import select_best_resolution

    s = config.vision_config.image_size
    bh, bw = select_best_resolution((height, width), config.image_grid_pinpoints)
    return (bh // s) * (bw // s) + 1


def anyres_image_tokens(config, height: int, width: int, *, patched: bool = True, max_num_patches: int | None = None) -> int:
    """Image tokens for one (height, width) image, mirroring ``pack_image_features`` of NeXT/OneVision."""
    from transformers.image_processing_utils import select_best_resolution

    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    base = side * side
    if not patched:
        return base + 1  # base tile + one newline (OneVision multi-image rows)
    bh, bw = select_best_resolution((height, width), config.image_grid_pinpoints)
    cur_h, cur_w = (bh // vc.image_size) * side, (bw // vc.image_size) * side
    # unpad_image
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    if max_num_patches is not None:  # OneVision "anyres_max_N" downscaling
        ratio = math.sqrt(cur_h * cur_w / (max_num_patches * side**2))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return base + cur_h * (cur_w + 1)


def image_tokens(config, height: int, width: int) -> int:
    return anyres_image_tokens(config, height, width)


def anyres_pixels(g, config, tiles: list[int]) -> torch.Tensor:
    """``(num_images, max_tiles, 3, S, S)`` random tiles, zero-padded beyond each image's tile count."""
    s = config.vision_config.image_size
    pv = torch.zeros(len(tiles), max(tiles), 3, s, s)
    for i, n in enumerate(tiles):
        pv[i, :n] = tiny.rand_pixels(g, n, 3, s, s)
    return pv


def dummy_inputs(config, *, batch_size: int = 1, text_lengths=None, images_per_row=None,
                 padding_side: str = "left", seed: int = 0, image_sizes=None) -> dict[str, torch.Tensor]:
    """Inputs for LLaVA-NeXT.

    ``image_sizes``: flat list of original (height, width), one per image in row order (default:
    cycles ``DEFAULT_IMAGE_SIZES``, so rows of a batch differ in vision-token count).  Rows may
    hold different numbers of images, including 0.  Returns ``pixel_values``
    ``(num_images, max_tiles, 3, S, S)`` and ``image_sizes`` ``(num_images, 2)`` when there are images.
    """
    g = tiny.generator(seed)
    n_per_row = tiny.per_row(images_per_row, batch_size, 1, "images_per_row")
    lengths = tiny.per_row(text_lengths, batch_size, lambda i: 8 + 5 * i, "text_lengths")
    sizes = tiny.per_image(image_sizes, sum(n_per_row), DEFAULT_IMAGE_SIZES)
    it = iter(sizes)
    segments = [[[config.image_token_id] * image_tokens(config, *next(it)) for _ in range(n)] for n in n_per_row]
    input_ids, attention_mask = tiny.build_rows(segments, lengths, config.text_config.vocab_size, g,
                                                padding_side=padding_side)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if sizes:
        out["pixel_values"] = anyres_pixels(g, config, [num_tiles(config, h, w) for h, w in sizes])
        out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
    return out


ADAPTER = register(
    ArchitectureAdapter(
        family="llava_next",
        projector="multi_modal_projector",
        model_types=("llava_next",),
        model_class="LlavaNextForConditionalGeneration",
        layers_path="model.language_model.layers",
        text_config_attr="text_config",
        vision_token_attrs=("image_token_id",),
        lora_target_regex=lora_regex("model.language_model.layers"),
        never_quantize=("vision_tower", "multi_modal_projector", "image_newline", "lm_head", "pmod_router"),
        tiny_config=tiny_config,
        dummy_inputs=dummy_inputs,
    )
)
