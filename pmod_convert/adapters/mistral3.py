"""Mistral 3 / Mistral Small 3.1 (``mistral3``): Pixtral tower at native resolution, 2x2 patch merger, Mistral
decoder. An image of H x W px gives (H/28) x (W/28) ``[IMG]`` tokens, each row closed by ``[IMG_BREAK]`` and the
last by ``[IMG_END]`` (text tokens)."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import scaffold as tiny
from .base import ArchitectureAdapter, register, square_factors

TOKEN_NAMES = {4: "[IMG]", 6: "[IMG_BREAK]", 7: "[IMG_END]"}
DEFAULT_IMAGE_SIZES = ((32, 32), (48, 48), (32, 48))  # 16, 36, 24 tokens with patch 4, merge 2
TYPICAL_IMAGE_PX = 1024  # a typical photo at Pixtral's native resolution (longest edge up to 1540)


def tiny_config(**overrides: Any):
    """Tiny Mistral 3: Pixtral patch 4 (max 64 px), merge 2 (8 px per token), Mistral decoder hidden 64 x 4."""
    import transformers as tf

    text, vision, top, attn = tiny.split_overrides(overrides)
    vc = tf.PixtralVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, head_dim=16, image_size=64, patch_size=4), **vision})
    tc = tf.MistralConfig(**tiny.text_defaults(sliding_window=None, **text))
    kw = dict(image_token_index=4, spatial_merge_size=2, vision_feature_layer=-1,
              tie_word_embeddings=tc.tie_word_embeddings)
    kw.update(top)
    config = tf.Mistral3Config(text_config=tc, vision_config=vc, **kw)
    tiny.copy_token_ids(config, tc)
    return tiny.finish_config(config, attn)


def _grid(config, height: int, width: int) -> tuple[int, int]:
    unit = config.vision_config.patch_size * config.spatial_merge_size
    return max(1, height // unit), max(1, width // unit)


class Mistral3Adapter(ArchitectureAdapter):
    family = "mistral3"
    model_types = ("mistral3",)
    model_class = "Mistral3ForConditionalGeneration"
    tiny_token_names = TOKEN_NAMES
    tiny_named_tokens = {"image_token": "[IMG]"}
    tiny_image_text = "[IMG]"
    tiny_chat_style = "chatml"
    placeholder_fallback = True  # PixtralProcessor requires torchvision: the data loader expands [IMG] itself
    tiny_rows = (dict(image_sizes=[(32, 32)], text_lengths=[12]), dict(image_sizes=[(48, 48)], text_lengths=[5]))

    def typical_image(self, config):
        """A ``TYPICAL_IMAGE_PX`` square image: (1024/14)^2 patches merged 2x2 -> 36 x 36 = 1296 tokens."""
        from ..efficiency import _get, _vision_section

        vision = _vision_section(config)
        patch = int(vision.get("patch_size", 14))
        merge = int(_get(config, "spatial_merge_size") or 2)
        side = TYPICAL_IMAGE_PX // (patch * merge)
        return {"model_type": self.family, "vision_tokens": side * side, "tiles": 1,
                "patches_per_tile": (TYPICAL_IMAGE_PX // patch) ** 2,
                "assumption": f"one {TYPICAL_IMAGE_PX}px image at native resolution: ({TYPICAL_IMAGE_PX}/{patch})^2 "
                f"patches merged {merge}x{merge} -> {side * side} (+{side} row-break text tokens)"}

    def tower_flops_for_tokens(self, config, counts):
        """Native resolution: an image of ``n`` tokens was ``n * merge^2`` patches."""
        from ..efficiency import _get

        merge = int(_get(config, "spatial_merge_size") or 2)
        return sum(self.tower_crop_flops(config, n * merge * merge) for n in counts if n > 0)

    def image_tokens_of(self, config, height, width):
        rows, cols = _grid(config, height, width)
        return rows * cols

    def vision_layout(self, config, n):
        """Exact up to the tower's ``image_size``: one image of a x b merged patches; several when larger."""
        unit = config.vision_config.patch_size * config.spatial_merge_size
        most = (config.vision_config.image_size // unit) ** 2
        k = max(1, math.ceil(n / most))
        a, b = square_factors(max(1, round(n / k)))
        if b * unit > config.vision_config.image_size:  # a prime-ish count: squarest size that fits
            a = b = max(1, round(math.sqrt(n / k)))
        size = (a * unit, b * unit)
        return (size,) * k, k * a * b

    def tiny_config(self, **overrides):
        return tiny_config(**overrides)

    def dummy_inputs(self, config, *, batch_size=1, text_lengths=None, images_per_row=None, padding_side="left",
                     seed=0, image_sizes=None):
        """``image_sizes``: (height, width) px per image, multiples of 8 (default cycles ``DEFAULT_IMAGE_SIZES``);
        ``pixel_values`` ``(num_images, 3, max_h, max_w)`` zero-padded, ``image_sizes`` ``(num_images, 2)``."""
        g = tiny.generator(seed)
        n_per_row = tiny.per_row(images_per_row, batch_size, 1, "images_per_row")
        lengths = tiny.per_row(text_lengths, batch_size, lambda i: 8 + 5 * i, "text_lengths")
        sizes = tiny.per_image(image_sizes, sum(n_per_row), DEFAULT_IMAGE_SIZES)
        it = iter(sizes)
        segments = []
        for n in n_per_row:
            row = []
            for _ in range(n):
                r, c = _grid(config, *next(it))
                seg: list[int] = []
                for i in range(r):
                    seg += [config.image_token_id] * c + [6 if i < r - 1 else 7]
                row.append(seg)
            segments.append(row)
        tc = config.text_config
        input_ids, attention_mask = tiny.build_rows(segments, lengths, tc.vocab_size, g, pad_id=tc.pad_token_id,
                                                    padding_side=padding_side)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if sizes:
            h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
            pv = torch.zeros(len(sizes), 3, h, w)
            for i, (ih, iw) in enumerate(sizes):
                pv[i, :, :ih, :iw] = tiny.rand_pixels(g, 3, ih, iw)
            out["pixel_values"] = pv
            out["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        return out

    def fallback_image_text(self, config, pixels, image_processor, placeholder):
        """As PixtralProcessor: per row of merged patches, ``[IMG]`` x cols then ``[IMG_BREAK]``; the last row
        ends with ``[IMG_END]``. Rows/cols: the resized image size (``image_sizes``) / (patch * merge), as the
        model splits its features."""
        texts = []
        for h, w in pixels["image_sizes"].tolist():
            rows, cols = _grid(config, h, w)
            texts.append("".join(placeholder * cols + ("[IMG_BREAK]" if r < rows - 1 else "[IMG_END]")
                                 for r in range(rows)))
        return texts

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        p = config.vision_config.patch_size
        ip = tf.PixtralImageProcessorPil(size={"longest_edge": config.vision_config.image_size},
                                         patch_size={"height": p * config.spatial_merge_size,
                                                     "width": p * config.spatial_merge_size})
        return ip, None, "PixtralProcessor needs torchvision"


ADAPTER = register(Mistral3Adapter)
