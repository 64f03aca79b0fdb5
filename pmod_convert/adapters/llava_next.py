"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution tiles + unpadding + newline tokens."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import scaffold as tiny
from .base import nearest_layout, register, size_table
from .llava import LLAMA_7B, SMALL_CLIP_336, TOWER_NOTE, LlavaAdapter, clip_tokens

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


def anyres_typical_image(family: str, config: Any, max_tiles: int | None = None) -> dict[str, Any]:
    """Any-res at the largest-area ``image_grid_pinpoints`` entry (within ``anyres_max_N`` when ``max_tiles``;
    larger grids are interpolated down to the same count), image of that aspect ratio (no unpadding): base +
    tiles + one newline token per feature row. LLaVA-NeXT default pinpoints (672x672, 2x2 tiles of CLIP 336/14):
    576 + 2304 + 48 = 2928 (the published ~2,880 = 5 x 576 leaves out the 48 newline tokens)."""
    g = clip_tokens(config)
    image, side, base = g["image"], g["side"], g["base"]
    pinpoints = [tuple(int(v) for v in p) for p in (g["top"].get("image_grid_pinpoints") or [])]
    if not pinpoints:
        pinpoints = [(2 * image, 2 * image)]
    candidates = pinpoints
    if max_tiles is not None:
        within = [p for p in pinpoints if (p[0] // image) * (p[1] // image) <= max_tiles]
        candidates = within or pinpoints
    ph, pw = max(candidates, key=lambda p: (p[0] * p[1], p[0]))
    rows, cols = ph // image, pw // image
    cur_h, cur_w = rows * side, cols * side  # image has the pinpoint's aspect ratio: no unpadding
    unpadded, newlines = cur_h * cur_w, cur_h
    if max_tiles is not None:
        scale = math.sqrt(cur_h * cur_w / (max_tiles * side * side))
        if scale > 1.1:  # HF's anyres_max interpolation
            unpadded = int(cur_h // scale) * int(cur_w // scale)
            newlines = int(cur_h // scale)
    return {
        "model_type": family, "vision_tokens": base + unpadded + newlines, "tiles": 1 + rows * cols,
        "patches_per_tile": g["per_tile"],
        "assumption": (f"one {ph}x{pw}px image (largest grid pinpoint"
                       + (f" within anyres_max_{max_tiles}" if max_tiles is not None else "")
                       + f"): base {base} + {rows}x{cols} tiles of {side}x{side} = {unpadded} + {newlines} "
                       "row-newline tokens"),
    }


def anyres_layout(config: Any, n: int, count) -> tuple:
    """Whole copies of the any-res image size whose token count (``count(h, w)``) is nearest ``n / k``."""
    patch = config.vision_config.patch_size
    top = max(max(p) for p in config.image_grid_pinpoints)
    table = size_table(patch * max(1, math.ceil(top / (patch * 80))), top, count)  # at most ~80 sizes per side
    options = []
    for k in range(1, max(1, math.ceil(n / min(table))) + 1):
        if k > 64:
            break
        per = min(table, key=lambda t: abs(t - n / k))
        options.append((k * per, (table[per],) * k))
    return nearest_layout(options, n)


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    model_class = "LlavaNextForConditionalGeneration"
    never_quantize = ("vision_tower", "multi_modal_projector", "image_newline", "lm_head", "pmod_router")
    tiny_rows = (dict(image_sizes=[(32, 32)], text_lengths=[12]), dict(image_sizes=[(64, 64)], text_lengths=[5]))
    tiny_varied = {}  # any-res: the default image sizes already differ per row
    shapes = {
        "llava-next-7b": ("LLaVA-NeXT-7B (vicuna): Vicuna-7B decoder, CLIP 336/14 any-res up to 672x672",
                          {**LLAMA_7B, **SMALL_CLIP_336,
                           "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]},
                          (TOWER_NOTE, "a 672x672 image gives 2,928 vision tokens; about 13.5 GB of weights in bf16/fp16")),
    }

    def typical_image(self, config):
        return anyres_typical_image(self.family, config)

    def image_tokens_of(self, config, height, width):
        return image_tokens(config, height, width)

    def vision_layout(self, config, n):
        """The nearest count over a grid of image sizes, one or more whole images."""
        return anyres_layout(config, n, lambda h, w: self.image_tokens_of(config, h, w))

    def tiny_config(self, **overrides):
        return tiny_config(**overrides)

    def dummy_inputs(self, config, **kwargs):
        return dummy_inputs(config, **kwargs)

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        vc = config.vision_config
        size = vc.image_size
        ip = tf.LlavaNextImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        )
        proc = tf.LlavaNextProcessor(
            image_processor=ip, tokenizer=tokenizer, patch_size=vc.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1, chat_template=template,
        )
        return ip, proc, None


ADAPTER = register(LlavaNextAdapter)
