"""GLM-4V / GLM-4.1V (``glm4v``): native-resolution ViT with 2x2 merge and M-RoPE like Qwen2-VL; GLM-4 decoder
layers with sandwich norms (``post_mlp_layernorm`` after the MLP), so STRing scales the normed MLP branch."""

from __future__ import annotations

from typing import Any

from . import scaffold as tiny
from .base import register, vit_flops
from .qwen2_vl import Qwen2VLAdapter, _mrope_section, dummy_inputs

TOKEN_NAMES = {8: "<|image|>", 9: "<|video|>", 6: "<|begin_of_image|>", 7: "<|end_of_image|>"}


def tiny_config(**overrides: Any):
    """Tiny GLM-4V: ViT patch 8, merge 2 (a HxW image gives (H/16)*(W/16) tokens), GLM-4 decoder hidden 64 x 4."""
    import transformers as tf

    text, vision, top, attn = tiny.split_overrides(overrides)
    t = tiny.text_defaults(pad_token_id=tiny.tok("<|endoftext|>"), bos_token_id=tiny.tok("<|endoftext|>"),
                           eos_token_id=tiny.tok("<|im_end|>"))
    t.update(text)
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    t.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
                                     "mrope_section": _mrope_section(head_dim // 2)})
    v = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, image_size=32,
             spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=t["hidden_size"])
    v.update(vision)
    tc, vc = tf.Glm4vTextConfig(**t), tf.Glm4vVisionConfig(**v)
    kw = dict(image_token_id=8, video_token_id=9, image_start_token_id=6, image_end_token_id=7,
              video_start_token_id=6, video_end_token_id=7, tie_word_embeddings=tc.tie_word_embeddings)
    kw.update(top)
    config = tf.Glm4vConfig(text_config=tc, vision_config=vc, **kw)
    tiny.copy_token_ids(config, tc)
    return tiny.finish_config(config, attn)


class Glm4vAdapter(Qwen2VLAdapter):
    family = "glm4v"
    model_types = ("glm4v",)
    model_class = "Glm4vForConditionalGeneration"
    mlp_branch = "post_mlp_layernorm"  # out = h + post_mlp_norm(mlp(norm(h)))
    lora_proj = r"(?:.*\.)?(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate_up|down)_proj)"  # fused gate_up_proj
    lora_per_layer = 6
    shapes = {}
    tiny_token_names = TOKEN_NAMES
    tiny_named_tokens = {"image_token": "<|image|>", "video_token": "<|video|>"}
    tiny_image_text = "<|begin_of_image|> <|image|> <|end_of_image|>"
    tiny_video_text = "<|begin_of_image|> <|video|> <|end_of_image|>"

    def tower_crop_flops(self, config, patches):
        """GLM-4V ViT: gated MLP, full attention over the image's patches."""
        from ..efficiency import _vision_section

        vision = _vision_section(config)
        return vit_flops(patches, int(vision.get("depth", 24)), int(vision.get("hidden_size", 1536)),
                         int(vision.get("intermediate_size", 13696)), gated=True)

    def tiny_config(self, **overrides):
        return tiny_config(**overrides)

    def dummy_inputs(self, config, **kwargs):
        """As Qwen2-VL's, images only: GLM-4V video prompts group frames differently (``videos_per_row`` is
        refused)."""
        if kwargs.get("videos_per_row"):
            raise ValueError(f"{self.family} tiny inputs build images only")
        return dummy_inputs(config, **kwargs)


ADAPTER = register(Glm4vAdapter)
