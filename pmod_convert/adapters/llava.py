"""LLaVA-1.5 (``LlavaForConditionalGeneration``, model_type ``llava``): CLIP tower + MLP projector + Llama."""

from __future__ import annotations

from typing import Any

import torch

from .. import tiny
from .base import ArchitectureAdapter, register

# peft target_modules regex: decoder-layer q/k/v/o + gate/up/down of the language model only.
# ``(?:.*\.)?`` after the layer index tolerates a wrapper module around the decoder layer.
LANG_PROJ = r"(?:.*\.)?(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"


def lora_regex(layers_path: str) -> str:
    return r"(?:.*\.)?" + layers_path.replace(".", r"\.") + r"\.\d+\." + LANG_PROJ


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


ADAPTER = register(
    ArchitectureAdapter(
        family="llava",
        projector="multi_modal_projector",
        model_types=("llava",),
        model_class="LlavaForConditionalGeneration",
        layers_path="model.language_model.layers",
        text_config_attr="text_config",
        vision_token_attrs=("image_token_id",),
        lora_target_regex=lora_regex("model.language_model.layers"),
        never_quantize=("vision_tower", "multi_modal_projector", "lm_head", "pmod_router"),
        tiny_config=tiny_config,
        dummy_inputs=dummy_inputs,
    )
)
