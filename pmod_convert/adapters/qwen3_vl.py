"""Qwen3-VL (``qwen3_vl``) and Qwen3-VL-MoE (``qwen3_vl_moe``): native-resolution ViT (patch 16, 2x2 merge),
interleaved M-RoPE, and DeepStack: features of early vision layers are added to the vision positions of the
hidden states after the first decoder layers. That addition happens between layers, on every vision token
(kept or skipped), exactly as in the dense model, so routing inside the layers is unchanged. In the MoE variant the
MLP is a sparse-MoE block: STRing's hook reads its output like a dense MLP's; its experts are fused parameters,
so LoRA targets the attention projections only."""

from __future__ import annotations

from typing import Any

from . import scaffold as tiny
from .base import register
from .qwen2_vl import Qwen2VLAdapter, _mrope_section, dummy_inputs

MOE_PROJ = r"(?:.*\.)?self_attn\.(?:q|k|v|o)_proj"


def _tiny_config(family: str, overrides: dict[str, Any]):
    import transformers as tf

    text, vision, top, attn = tiny.split_overrides(overrides)
    t = tiny.text_defaults(pad_token_id=tiny.tok("<|endoftext|>"), bos_token_id=tiny.tok("<|endoftext|>"),
                           eos_token_id=tiny.tok("<|im_end|>"))
    t.update(text)
    t.setdefault("head_dim", t["hidden_size"] // t["num_attention_heads"])
    t.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_interleaved": True,
                                     "mrope_section": _mrope_section(t["head_dim"])})
    v = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
             temporal_patch_size=2, out_hidden_size=t["hidden_size"], num_position_embeddings=64,
             deepstack_visual_indexes=[0, 1])
    v.update(vision)
    if family == "qwen3_vl":
        tc, vc, cfg_cls = tf.Qwen3VLTextConfig(**t), tf.Qwen3VLVisionConfig(**v), tf.Qwen3VLConfig
    else:
        t.setdefault("num_experts", 4)
        t.setdefault("num_experts_per_tok", 2)
        t.setdefault("moe_intermediate_size", 32)
        t.setdefault("decoder_sparse_step", 1)
        tc, vc, cfg_cls = tf.Qwen3VLMoeTextConfig(**t), tf.Qwen3VLMoeVisionConfig(**v), tf.Qwen3VLMoeConfig
    kw = dict(image_token_id=tiny.tok("<|image_pad|>"), video_token_id=tiny.tok("<|video_pad|>"),
              vision_start_token_id=tiny.tok("<|vision_start|>"), vision_end_token_id=tiny.tok("<|vision_end|>"),
              tie_word_embeddings=tc.tie_word_embeddings)
    kw.update(top)
    config = cfg_cls(text_config=tc, vision_config=vc, **kw)
    tiny.copy_token_ids(config, tc)
    return tiny.finish_config(config, attn)


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: as Qwen2-VL for routing and data (M-RoPE token types, placeholder expansion); DeepStack layers
    need nothing more (see the module docstring). Vision tower: a ViT with a plain MLP, ``hidden_size``, ``depth``,
    ``intermediate_size``; a typical 512 px image at patch 16 gives 256 tokens."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"
    typical_image_px = 512
    default_patch = 16
    shapes = {}

    def tower_crop_flops(self, config, patches):
        from ..efficiency import _vision_section
        from .base import vit_flops

        vision = _vision_section(config)
        return vit_flops(patches, int(vision.get("depth", 27)), int(vision.get("hidden_size", 1152)),
                         int(vision.get("intermediate_size", 4304)))

    def tiny_config(self, **overrides):
        return _tiny_config(self.family, overrides)

    def dummy_inputs(self, config, **kwargs):
        """As Qwen2-VL's, images only: Qwen3-VL video prompts carry per-frame timestamps the tiny inputs do not
        write (``videos_per_row`` is refused)."""
        if kwargs.get("videos_per_row"):
            raise ValueError(f"{self.family} tiny inputs build images only")
        return dummy_inputs(config, **kwargs)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    model_class = "Qwen3VLMoeForConditionalGeneration"
    lora_proj = MOE_PROJ
    lora_per_layer = 4


ADAPTER = register(Qwen3VLAdapter)
ADAPTER_MOE = register(Qwen3VLMoeAdapter)
