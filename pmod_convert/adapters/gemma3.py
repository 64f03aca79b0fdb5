"""Gemma 3 (``gemma3``): SigLIP tower pooled to ``mm_tokens_per_image`` tokens, Gemma 3 decoder with sliding-window
and global layers, bidirectional attention inside each image (``token_type_ids``), sandwich norms."""

from __future__ import annotations

from typing import Any

from . import scaffold as tiny
from .base import ArchitectureAdapter, register

# Gemma 3 token strings for the tiny vocabulary's vision ids (its processor looks them up by string).
TOKEN_NAMES = {4: "<image_soft_token>", 6: "<start_of_image>", 7: "<end_of_image>"}


def layer_types(n: int, every: int = 2) -> list[str]:
    """Sliding-window layers with a global layer every ``every`` layers (Gemma 3 uses 6; tiny models use 2 so that
    4 layers hold both kinds)."""
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]


def tiny_config(**overrides: Any):
    """Tiny Gemma 3: SigLIP 32px / patch 4 (64 patches) pooled to 16 tokens per image; Gemma 3 decoder hidden 64 x 4
    layers (sliding window 128 in layers 0 and 2, global in 1 and 3; the contract tests' rows fit in it, a
    family test shrinks it with ``text_sliding_window``)."""
    import transformers as tf

    text, vision, top, attn = tiny.split_overrides(overrides)
    vc = tf.SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=4), **vision})
    t = tiny.text_defaults(sliding_window=128)
    t.update(text)
    t.setdefault("head_dim", t["hidden_size"] // t["num_attention_heads"])
    t.setdefault("query_pre_attn_scalar", t["head_dim"])
    t.setdefault("layer_types", layer_types(t["num_hidden_layers"]))
    tc = tf.Gemma3TextConfig(**t)
    kw = dict(mm_tokens_per_image=16, boi_token_index=6, eoi_token_index=7, image_token_index=4,
              tie_word_embeddings=tc.tie_word_embeddings)
    kw.update(top)
    config = tf.Gemma3Config(text_config=tc, vision_config=vc, **kw)
    tiny.copy_token_ids(config, tc)
    return tiny.finish_config(config, attn)


class Gemma3Adapter(ArchitectureAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    model_class = "Gemma3ForConditionalGeneration"
    mlp_branch = "post_feedforward_layernorm"  # out = h + post_norm(mlp(pre_norm(h))): STRing scales the normed branch
    tiny_token_names = TOKEN_NAMES
    tiny_named_tokens = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                         "eoi_token": "<end_of_image>"}
    tiny_image_text = "<start_of_image>"
    tiny_chat_style = "chatml"
    tiny_generated_types = {"token_type_ids": 0}  # a generated token is text, not image
    tiny_rows = (dict(images_per_row=[1], text_lengths=[12]), dict(images_per_row=[2], text_lengths=[5]))
    tiny_varied = {"images_per_row": [1, 2]}  # fixed-size images: rows differ in their number of images

    def typical_image(self, config):
        """Every image is resized to the tower's ``image_size`` and pooled to ``mm_tokens_per_image`` (256)."""
        from ..efficiency import _get, _need, _vision_section

        vision = _vision_section(config)
        image, patch = _need(vision, "image_size", self.family), _need(vision, "patch_size", self.family)
        tokens = int(_get(config, "mm_tokens_per_image") or 256)
        return {"model_type": self.family, "vision_tokens": tokens, "tiles": 1, "patches_per_tile": (image // patch) ** 2,
                "assumption": f"one {image}px image: ({image}/{patch})^2 patches pooled to mm_tokens_per_image {tokens}"}

    def template_image_token(self, config, tokenizer):
        """Gemma 3's template writes ``<start_of_image>`` per image; the processor expands it."""
        return tokenizer.convert_ids_to_tokens(int(config.boi_token_index))

    def image_tokens_of(self, config, height, width):
        return int(config.mm_tokens_per_image)

    def tiny_config(self, **overrides):
        return tiny_config(**overrides)

    def dummy_inputs(self, config, **kwargs):
        """Every image is ``<start_of_image>`` + ``mm_tokens_per_image`` placeholders + ``<end_of_image>``;
        ``token_type_ids`` marks the placeholders (1), which attend to each other bidirectionally."""
        s = config.vision_config.image_size
        segment = [config.boi_token_index] + [config.image_token_id] * config.mm_tokens_per_image + [config.eoi_token_index]
        tc = config.text_config
        return tiny.fixed_image_inputs(config, image_segment=segment, pixel_shape=(3, s, s), vocab_size=tc.vocab_size,
                                       pad_id=tc.pad_token_id, image_token_id=config.image_token_id,
                                       token_types="token_type_ids", **kwargs)

    def tiny_init(self, model):
        """The projector's input projection starts at zero (every image would embed identically): draw it."""
        import torch

        weight = self.base_model(model).multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            weight.normal_(0.0, 0.2)

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        s = config.vision_config.image_size
        ip = tf.Gemma3ImageProcessorPil(size={"height": s, "width": s})
        proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tokenizer, chat_template=template,
                                  image_seq_length=config.mm_tokens_per_image)
        return ip, proc, None


ADAPTER = register(Gemma3Adapter)
