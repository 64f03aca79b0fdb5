"""PaliGemma / PaliGemma 2 (``paligemma``): SigLIP tower, linear projector, Gemma (1) or Gemma 2 decoder (2: sandwich
norms, sliding-window and global layers). Prefix-LM: image tokens come first, and the prefix (image + prompt,
``token_type_ids`` 0) attends bidirectionally; the answer (``token_type_ids`` 1) and generated tokens are causal.
MoD layers cut that mask by rows and columns like any other, so the prefix stays bidirectional among kept tokens."""

from __future__ import annotations

from typing import Any

import torch

from . import scaffold as tiny
from .base import ArchitectureAdapter, register


def tiny_config(**overrides: Any):
    """Tiny PaliGemma: SigLIP 32px / patch 8 (16 tokens per image), Gemma decoder hidden 64 x 4.

    ``text_model_type="gemma2"``: PaliGemma 2's Gemma 2 decoder (sandwich norms; sliding window 128 in layers 0
    and 2; eager attention only, as transformers' Gemma 2 has no sdpa path).
    """
    import transformers as tf

    text, vision, top, attn = tiny.split_overrides(overrides)
    kind = text.pop("model_type", "gemma")
    t = tiny.text_defaults()
    t.update(text)
    t.setdefault("head_dim", t["hidden_size"] // t["num_attention_heads"])
    if kind == "gemma2":
        t.setdefault("sliding_window", 128)
        t.setdefault("query_pre_attn_scalar", t["head_dim"])
        t.setdefault("layer_types", ["full_attention" if (i + 1) % 2 == 0 else "sliding_attention"
                                     for i in range(t["num_hidden_layers"])])
        tc = tf.Gemma2Config(**t)
    else:
        tc = tf.GemmaConfig(**t)
    vc = tf.SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8,
                                         projection_dim=tc.hidden_size), **vision})
    kw = dict(image_token_index=tiny.tok("<image>"), projection_dim=tc.hidden_size, hidden_size=tc.hidden_size,
              vocab_size=tc.vocab_size, tie_word_embeddings=tc.tie_word_embeddings)
    kw.update(top)
    config = tf.PaliGemmaConfig(text_config=tc, vision_config=vc, **kw)
    tiny.copy_token_ids(config, tc)
    return tiny.finish_config(config, attn)


def image_tokens(config) -> int:
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


class PaliGemmaAdapter(ArchitectureAdapter):
    family = "paligemma"
    model_types = ("paligemma",)
    model_class = "PaliGemmaForConditionalGeneration"

    def string_branch(self, config):
        """PaliGemma 2 (Gemma 2 decoder): the normed branch after ``post_feedforward_layernorm``; PaliGemma 1: ``mlp``."""
        text = self.text_config(config)
        return "post_feedforward_layernorm" if hasattr(text, "layer_types") and text.model_type != "gemma" else "mlp"
    tiny_generated_types = {"token_type_ids": 1}  # a generated token is suffix: causal
    tiny_rows = (dict(images_per_row=[1], text_lengths=[12]), dict(images_per_row=[2], text_lengths=[5]))
    tiny_varied = {"images_per_row": [1, 2]}

    def typical_image(self, config):
        """One ``image_size`` px image: (224/14)^2 = 256 tokens (448 px: 1024, 896 px: 4096)."""
        from ..efficiency import _need, _vision_section

        vision = _vision_section(config)
        image, patch = _need(vision, "image_size", self.family), _need(vision, "patch_size", self.family)
        n = (image // patch) ** 2
        return {"model_type": self.family, "vision_tokens": n, "tiles": 1, "patches_per_tile": n,
                "assumption": f"one {image}px image: ({image}/{patch})^2 = {n} patches"}

    def image_tokens_of(self, config, height, width):
        return image_tokens(config)

    def tiny_config(self, **overrides):
        return tiny_config(**overrides)

    def dummy_inputs(self, config, *, batch_size=1, text_lengths=None, images_per_row=None, padding_side="left",
                     seed=0, image_sizes=None):
        """As PaliGemma's processor: the images' placeholders first, then BOS and the prompt; ``token_type_ids``
        all 0 (the whole prompt is the bidirectional prefix)."""
        g = tiny.generator(seed)
        n_per_row = tiny.per_row(images_per_row, batch_size, 1, "images_per_row")
        lengths = tiny.per_row(text_lengths, batch_size, lambda i: 8 + 5 * i, "text_lengths")
        tc = config.text_config
        rows = [[config.image_token_id] * image_tokens(config) * n + [tc.bos_token_id]
                + torch.randint(tiny.RESERVED, tc.vocab_size, (int(t),), generator=g).tolist()
                for n, t in zip(n_per_row, lengths)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((batch_size, width), tc.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, row in enumerate(rows):
            sl = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[i, sl] = torch.tensor(row)
            attention_mask[i, sl] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "token_type_ids": torch.zeros_like(input_ids)}
        if sum(n_per_row):
            s = config.vision_config.image_size
            out["pixel_values"] = tiny.rand_pixels(g, sum(n_per_row), 3, s, s)
        return out

    def tiny_processor(self, config, tokenizer, template):
        import transformers as tf

        s = config.vision_config.image_size
        ip = tf.SiglipImageProcessorPil(size={"height": s, "width": s})
        ip.image_seq_length = image_tokens(config)
        proc = tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=template)
        return ip, proc, None


ADAPTER = register(PaliGemmaAdapter)
