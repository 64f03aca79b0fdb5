"""LLaVA-1.5 (``LlavaForConditionalGeneration``, model_type ``llava``): CLIP tower + MLP projector + Llama."""

from __future__ import annotations

from typing import Any

import torch

from . import scaffold as tiny
from .base import ArchitectureAdapter, register

# Vicuna-7B / Llama-2-7B, the decoder of LLaVA-1.5-7B and LLaVA-NeXT-7B (vicuna); vocab as published.
LLAMA_7B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# A small CLIP/SigLIP tower with the real input geometry (336 px / patch 14 -> 24x24 = 576 tokens per tile).
SMALL_CLIP_336 = {"vision_image_size": 336, "vision_patch_size": 14, "vision_hidden_size": 32,
                  "vision_intermediate_size": 64, "vision_num_hidden_layers": 2, "vision_num_attention_heads": 2}
TOWER_NOTE = "small random vision tower (2 layers, hidden 32) with the real patch geometry; it is not what is benchmarked"


def tiny_config(**overrides: Any):
    """Tiny LLaVA-1.5: CLIP 48px / patch 8 (36 image tokens), Llama hidden 64 x 4 layers, vocab 320.

    See ``pmod_convert.tiny`` for the override rules (text keys, ``text_*``, ``vision_*``,
    ``attn_implementation``, top-level keys).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text, vision, top, attn = tiny.split_overrides(overrides)
    vc = CLIPVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=48, patch_size=8, projection_dim=32),
                             **vision})
    tc = LlamaConfig(**tiny.text_defaults(**text))
    n_img = (vc.image_size // vc.patch_size) ** 2
    kw = dict(image_token_index=tiny.tok("<image>"), image_seq_length=n_img, vision_feature_layer=-2,
              vision_feature_select_strategy="default", tie_word_embeddings=tc.tie_word_embeddings,
              pad_token_id=tc.pad_token_id)
    kw.update(top)
    return tiny.finish_config(LlavaConfig(vision_config=vc, text_config=tc, **kw), attn)


def image_tokens(config) -> int:
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def dummy_inputs(config, *, batch_size: int = 1, text_lengths=None, images_per_row=None,
                 padding_side: str = "left", seed: int = 0, image_sizes=None) -> dict[str, torch.Tensor]:
    """Inputs for LLaVA-1.5.

    Every image is ``image_size`` square, so it always gives ``image_tokens(config)`` tokens;
    ``image_sizes`` is ignored.  Rows may hold different numbers of images, including 0 (the model
    checks the image-token total of the whole batch only).  ``pixel_values`` is
    ``(total_images, 3, S, S)``, omitted when there are no images.
    """
    g = tiny.generator(seed)
    n_per_row = tiny.per_row(images_per_row, batch_size, 1, "images_per_row")
    lengths = tiny.per_row(text_lengths, batch_size, lambda i: 8 + 5 * i, "text_lengths")
    seg = [config.image_token_id] * image_tokens(config)
    segments = [[seg] * n for n in n_per_row]
    vocab = config.text_config.vocab_size
    input_ids, attention_mask = tiny.build_rows(segments, lengths, vocab, g, padding_side=padding_side)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    total = sum(n_per_row)
    if total:
        s = config.vision_config.image_size
        out["pixel_values"] = tiny.rand_pixels(g, total, 3, s, s)
    return out


def clip_tokens(config: Any) -> dict[str, Any]:
    """Per-tile geometry of a CLIP/SigLIP-tower LLaVA config (object or config.json dict): ``image``, ``patch``,
    ``side``, ``per_tile`` (tower outputs per crop, CLS included) and ``base`` (tokens the LLM gets per tile)."""
    from ..efficiency import _need, _Section, _vision_section

    family = str(config.get("model_type") if isinstance(config, dict) else config.model_type)
    vision = _vision_section(config)
    top = _Section(config, [(family, None)])
    strategy = str(top.get("vision_feature_select_strategy", "default"))
    image, patch = _need(vision, "image_size", family), _need(vision, "patch_size", family)
    side = image // patch
    cls_tok = 1 if str(vision.get("model_type", "clip_vision_model")).startswith("clip") else 0  # CLIP has a CLS
    per_tile = side * side + cls_tok
    base = per_tile - (1 if strategy == "default" else 0)  # "default" drops the first (CLS) feature
    return dict(image=image, patch=patch, side=side, per_tile=per_tile, base=base, cls=cls_tok, strategy=strategy,
                top=top)


class LlavaAdapter(ArchitectureAdapter):
    family = "llava"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    tiny_rows = (dict(images_per_row=[1], text_lengths=[12]), dict(images_per_row=[2], text_lengths=[5]))
    tiny_varied = {"images_per_row": [1, 2]}  # fixed-size images: rows differ in their number of images
    shapes = {
        "llava-1.5-7b": ("LLaVA-1.5-7B: Vicuna-7B decoder (hidden 4096, 32 layers, 32 heads, MLP 11008), CLIP 336/14",
                         {**LLAMA_7B, **SMALL_CLIP_336},
                         (TOWER_NOTE, "576 vision tokens per image; about 13.5 GB of weights in bf16/fp16, 27 GB in fp32")),
    }

    def typical_image(self, config):
        """One ``image_size`` px image: ``(image/patch)^2`` patches, plus the CLS only under ``full``
        (576 for CLIP 336/14 with ``default``)."""
        g = clip_tokens(config)
        return {
            "model_type": self.family, "vision_tokens": g["base"], "tiles": 1, "patches_per_tile": g["per_tile"],
            "assumption": f"one {g['image']}px image: ({g['image']}/{g['patch']})^2 = {g['side'] ** 2} patches"
            + (f" (+CLS {'dropped' if g['strategy'] == 'default' else 'kept'} by '{g['strategy']}')" if g["cls"] else ""),
        }

    def image_tokens_of(self, config, height, width):
        return image_tokens(config)

    def tiny_config(self, **overrides):
        return tiny_config(**overrides)

    def dummy_inputs(self, config, **kwargs):
        return dummy_inputs(config, **kwargs)

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        vc = config.vision_config
        size = vc.image_size
        ip = tf.LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        proc = tf.LlavaProcessor(
            image_processor=ip, tokenizer=tokenizer, patch_size=vc.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1, chat_template=template,
        )
        return ip, proc, None


ADAPTER = register(LlavaAdapter)
