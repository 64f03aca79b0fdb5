"""Idefics3 (``idefics3``; also SmolVLM v1 checkpoints) and SmolVLM2 (``smolvlm``): SigLIP-like tower,
pixel-shuffle connector, Llama decoder at ``model.text_model``."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import scaffold as tiny
from .base import ArchitectureAdapter, register, square_factors

# Assumed split of one typical image: a 2x2 grid of tiles plus the global view.
TYPICAL_GRID = (2, 2)

# (height, width) of the default dummy images, cycled: 1 tile (16 tokens), 2x2+1 tiles (80), 1x2+1 (48).
DEFAULT_IMAGE_SIZES = ((32, 32), (64, 64), (32, 64))


def _tiny_config(family: str, overrides: dict[str, Any]):
    import transformers as tf

    text, vision, top, attn = tiny.split_overrides(overrides)
    vcls, ccls = ((tf.Idefics3VisionConfig, tf.Idefics3Config) if family == "idefics3"
                  else (tf.SmolVLMVisionConfig, tf.SmolVLMConfig))
    vc = vcls(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=32, patch_size=4), **vision})
    tc = tf.LlamaConfig(**tiny.text_defaults(**text))
    kw = dict(image_token_id=tiny.tok("<image>"), scale_factor=2, tie_word_embeddings=tc.tie_word_embeddings,
              pad_token_id=tc.pad_token_id)
    kw.update(top)
    config = ccls(text_config=tc, vision_config=vc, **kw)
    for key in ("bos_token_id", "eos_token_id"):  # used by generate()
        setattr(config, key, getattr(tc, key))
    return tiny.finish_config(config, attn)


def tiny_config_idefics3(**overrides: Any):
    """Tiny Idefics3: vision 32px / patch 4, scale_factor 2 -> 16 tokens per tile; Llama hidden 64 x 4."""
    return _tiny_config("idefics3", overrides)


def tiny_config_smolvlm(**overrides: Any):
    """Tiny SmolVLM2: same shapes as tiny Idefics3."""
    return _tiny_config("smolvlm", overrides)


def tile_tokens(config) -> int:
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 // config.scale_factor**2


def tile_grid(config, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the split; (0, 0) means the image fits in one tile (no split, global tile only)."""
    s = config.vision_config.image_size
    if height <= s and width <= s:
        return 0, 0
    return math.ceil(height / s), math.ceil(width / s)


def image_tokens(config, height: int, width: int) -> int:
    r, c = tile_grid(config, height, width)
    return (r * c + 1) * tile_tokens(config)


def _image_segment(config, rows: int, cols: int) -> list[int]:
    """Token layout of one image as the Idefics3 processor writes it (without the newlines)."""
    fake, glob, img = tiny.tok("<fake_token_around_image>"), tiny.tok("<global-img>"), config.image_token_id
    n = tile_tokens(config)
    seg: list[int] = []
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            name = f"<row_{r}_col_{c}>"
            seg += [fake] + ([tiny.tok(name)] if name in tiny.SPECIAL_TOKENS else []) + [img] * n
    return seg + [fake, glob] + [img] * n + [fake]


def dummy_inputs(config, *, batch_size: int = 1, text_lengths=None, images_per_row=None,
                 padding_side: str = "left", seed: int = 0, image_sizes=None) -> dict[str, torch.Tensor]:
    """Inputs for Idefics3 / SmolVLM.

    ``image_sizes``: flat list of (height, width) per image (default cycles ``DEFAULT_IMAGE_SIZES``,
    so rows differ in token count).  An image larger than one tile (``vision_config.image_size``) is
    split into ``ceil(h/S) x ceil(w/S)`` tiles plus a global tile, as the processor does; every tile
    gives ``tile_tokens(config)`` tokens.  Rows may hold 0 or more images.  Returns ``pixel_values``
    ``(batch, max_tiles_per_row, 3, S, S)`` (all-zero padding tiles are dropped by the model) and a
    boolean ``pixel_attention_mask`` ``(batch, max_tiles_per_row, S, S)``.
    """
    g = tiny.generator(seed)
    n_per_row = tiny.per_row(images_per_row, batch_size, 1, "images_per_row")
    lengths = tiny.per_row(text_lengths, batch_size, lambda i: 8 + 5 * i, "text_lengths")
    sizes = tiny.per_image(image_sizes, sum(n_per_row), DEFAULT_IMAGE_SIZES)
    it = iter(sizes)
    segments, tiles_per_row = [], []
    for n in n_per_row:
        row, tiles = [], 0
        for _ in range(n):
            r, c = tile_grid(config, *next(it))
            row.append(_image_segment(config, r, c))
            tiles += r * c + 1
        segments.append(row)
        tiles_per_row.append(tiles)
    input_ids, attention_mask = tiny.build_rows(segments, lengths, config.text_config.vocab_size, g,
                                                pad_id=config.text_config.pad_token_id, padding_side=padding_side)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if sizes:
        s, m = config.vision_config.image_size, max(tiles_per_row)
        pv = torch.zeros(batch_size, m, 3, s, s)
        mask = torch.zeros(batch_size, m, s, s, dtype=torch.bool)
        for i, n in enumerate(tiles_per_row):
            pv[i, :n] = tiny.rand_pixels(g, n, 3, s, s)
            mask[i, :n] = True
        out["pixel_values"] = pv
        out["pixel_attention_mask"] = mask
    return out


class Idefics3Adapter(ArchitectureAdapter):
    """Idefics3 (and SmolVLM v1 checkpoints): tiles + global view, pixel-shuffle connector, Llama decoder."""

    family = "idefics3"
    model_types = ("idefics3",)
    model_class = "Idefics3ForConditionalGeneration"
    layers_path = "model.text_model.layers"
    never_quantize = ("vision_model", "connector", "lm_head", "pmod_router")
    projector = "connector"
    nested_images = True
    tiny_named_tokens = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                         "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    tiny_chat_style = "chatml"
    tiny_rows = (dict(image_sizes=[(32, 32)], text_lengths=[12]), dict(image_sizes=[(64, 64)], text_lengths=[5]))

    def typical_image(self, config):
        """``image_seq_len`` (config value, else (image_size/patch)^2 / scale_factor^2, else 169) x 5 crops
        (2x2 split + global view); 845 for Idefics3-8B (364/14, x2)."""
        from ..efficiency import _get, _Section, _vision_section

        vision = _vision_section(config)
        top = _Section(config, [(self.family, None)])
        seq = _get(config, "image_seq_len")
        image, patch = vision.get("image_size"), vision.get("patch_size")
        scale = int(top.get("scale_factor", 2) or 2)
        if seq is None and image and patch:
            seq = (int(image) // int(patch)) ** 2 // (scale * scale)
        if not seq:
            seq = 169
        gr, gc = TYPICAL_GRID
        tiles = gr * gc + 1
        per_tile = (int(image) // int(patch)) ** 2 if image and patch else int(seq) * scale * scale
        return {"model_type": self.family, "vision_tokens": int(seq) * tiles, "tiles": tiles,
                "patches_per_tile": per_tile,
                "assumption": f"one image split {gr}x{gc} + global view = {tiles} crops x image_seq_len {seq} "
                f"(pixel shuffle {scale}x{scale}); row/column tags are text tokens"}

    def image_tokens_of(self, config, height, width):
        return image_tokens(config, height, width)

    def vision_layout(self, config, n):
        """Multiples of the per-tile count: one or two single-tile images, or one split image."""
        s = config.vision_config.image_size
        tiles = max(1, round(n / tile_tokens(config)))
        if tiles <= 2:  # one image of one tile, or two of them (a split image has at least 2 + 1 tiles)
            return ((s, s),) * tiles, tiles * image_tokens(config, s, s)
        r, c = square_factors(tiles - 1)  # a split image: rows * cols tiles + 1 global tile
        return ((r * s, c * s),), image_tokens(config, r * s, c * s)

    def tiny_config(self, **overrides):
        return _tiny_config(self.family, overrides)

    def dummy_inputs(self, config, **kwargs):
        return dummy_inputs(config, **kwargs)

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        vc = config.vision_config
        size = vc.image_size
        ip = tf.Idefics3ImageProcessorPil(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size})
        seq = (size // vc.patch_size) ** 2 // config.scale_factor**2
        return ip, tf.Idefics3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=seq), None


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM / SmolVLM2 under its own ``model_type`` (same shapes as Idefics3; its processor has video)."""

    family = "smolvlm"
    model_types = ("smolvlm",)
    model_class = "SmolVLMForConditionalGeneration"

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        size = config.vision_config.image_size
        ip = tf.SmolVLMImageProcessorPil(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size})
        return ip, None, "SmolVLMProcessor needs a video processor, which needs torchvision"

    def processor_without_video(self, checkpoint, tokenizer, image_processor):
        """Idefics3Processor over SmolVLM's tokenizer and image processor: it writes images the same way
        (``<fake_token_around_image>``, ``<row_r_col_c>``, ``<global-img>``, ``image_seq_len`` placeholders each)
        and has no video processor."""
        import transformers as tf

        config = tf.AutoConfig.from_pretrained(checkpoint, trust_remote_code=False)
        vc = config.vision_config
        seq = (vc.image_size // vc.patch_size) ** 2 // config.scale_factor**2
        return tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq,
                                    chat_template=tokenizer.chat_template)


ADAPTER = register(Idefics3Adapter)
ADAPTER_SMOLVLM = register(SmolVLMAdapter)
