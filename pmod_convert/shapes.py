"""Named model shapes: random-weight models of a real model's decoder size, without weights on disk.

A shape is a family plus ``tiny_config`` overrides (rules: ``pmod_convert.tiny``). The decoder (the
part MoD changes) has the real model's dimensions; the vision tower is a small random one (2 layers,
hidden 32) that still emits the real number of vision tokens per image, because the benchmarks time
the language model, not the tower. The vocabulary is cut to 32,000 tokens where the real one is
larger (embedding and ``lm_head`` memory only; a prefill computes logits for the last position).

Weights are random (transformers' own init), so the text the models write is meaningless: the shapes
are for measuring time and memory, not quality.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .errors import PmodError


class ShapeError(PmodError):
    """An unknown shape name, or a shape that does not fit on the chosen device."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str
    summary: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def config(self, attn_implementation: str = "sdpa") -> Any:
        """The transformers config of this shape (a fresh object every call)."""
        from .adapters import adapter_by_family

        return adapter_by_family(self.family).tiny_config(**dict(self.overrides), attn_implementation=attn_implementation)


# Qwen2-0.5B's decoder (the language model of LLaVA-OneVision-0.5B); vocab 151,936 cut to 32,000.
QWEN2_05B = MappingProxyType({
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
})
# Vicuna-7B / Llama-2-7B, the decoder of LLaVA-1.5-7B and LLaVA-NeXT-7B (vicuna); vocab as published.
LLAMA_7B = MappingProxyType({
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
})
# A small CLIP/SigLIP tower with the real input geometry (336 px / patch 14 -> 24x24 = 576 tokens per tile).
SMALL_CLIP_336 = MappingProxyType({"vision_image_size": 336, "vision_patch_size": 14, "vision_hidden_size": 32,
                                   "vision_intermediate_size": 64, "vision_num_hidden_layers": 2,
                                   "vision_num_attention_heads": 2})
SMALL_SIGLIP_384 = MappingProxyType({**SMALL_CLIP_336, "vision_image_size": 384})  # 27x27 = 729 per tile

_VOCAB_NOTE = "vocabulary cut to 32,000 tokens (real: 151,936); only embedding/lm_head memory changes"
_TOWER_NOTE = "small random vision tower (2 layers, hidden 32) with the real patch geometry; it is not what is benchmarked"


def _shapes() -> dict[str, ModelShape]:
    from .adapters import all_adapters

    shapes = {
        "qwen2-0.5b": ModelShape(
            "qwen2-0.5b", "qwen2_vl",
            "Qwen2-0.5B decoder (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864) in a Qwen2-VL config",
            {**QWEN2_05B, "vision_patch_size": 14},
            (_VOCAB_NOTE, _TOWER_NOTE, ("Qwen2-VL packaging (M-RoPE): any vision-token count a*b is exact "
                                        "(an image of a x b merged 28 px patches)")),
        ),
        "llava-onevision-0.5b": ModelShape(
            "llava-onevision-0.5b", "llava_onevision",
            "LLaVA-OneVision-0.5B: the Qwen2-0.5B decoder behind SigLIP 384/14 any-res (anyres_max_9)",
            {**QWEN2_05B, **SMALL_SIGLIP_384,
             "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]},
            (_VOCAB_NOTE, _TOWER_NOTE, ("an image alone in its row is tiled any-res (at least 729 base + grid "
                                        "tokens); images of multi-image rows give 730 tokens each")),
        ),
        "llava-1.5-7b": ModelShape(
            "llava-1.5-7b", "llava",
            "LLaVA-1.5-7B: Vicuna-7B decoder (hidden 4096, 32 layers, 32 heads, MLP 11008), CLIP 336/14",
            {**LLAMA_7B, **SMALL_CLIP_336},
            (_TOWER_NOTE, "576 vision tokens per image; about 13.5 GB of weights in bf16/fp16, 27 GB in fp32"),
        ),
        "llava-next-7b": ModelShape(
            "llava-next-7b", "llava_next",
            "LLaVA-NeXT-7B (vicuna): Vicuna-7B decoder, CLIP 336/14 any-res up to 672x672",
            {**LLAMA_7B, **SMALL_CLIP_336,
             "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]},
            (_TOWER_NOTE, "a 672x672 image gives 2,928 vision tokens; about 13.5 GB of weights in bf16/fp16"),
        ),
        "tiny": ModelShape("tiny", "qwen2_vl", "tiny Qwen2-VL (hidden 64, 4 layers) for tests and demos",
                           {}, ("the default tiny config of the qwen2_vl adapter",)),
    }
    for adapter in all_adapters():
        name = f"tiny-{adapter.family}"
        shapes[name] = ModelShape(name, adapter.family, f"tiny {adapter.family} (hidden 64, 4 layers) for tests",
                                  {}, (f"the default tiny config of the {adapter.family} adapter",))
    return shapes


SHAPES: Mapping[str, ModelShape] = MappingProxyType(_shapes())


def shape_names() -> list[str]:
    return list(SHAPES)


def get_shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ShapeError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def parameter_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes the weights of ``config`` take in ``dtype`` (counted on the meta device: nothing allocated)."""
    from .adapters import get_adapter

    with torch.device("meta"):
        model = get_adapter(config).model_cls()._from_config(config, dtype=dtype)
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:  # tied embeddings count once
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable), or None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def build_shape(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """A random-weight dense model of shape ``name``, in eval mode, built directly in ``dtype`` on ``device``.

    Refuses (``ShapeError``) when the weights would not fit in the free memory of the device.
    """
    shape = get_shape(name)
    device = torch.device(device)
    config = shape.config(attn_implementation)
    need = parameter_bytes(config, dtype)
    free = available_bytes(device)
    if free is not None and need > 0.9 * free:
        raise ShapeError(f"shape {name!r} needs {need / 2**30:.1f} GiB of weights in {str(dtype).replace('torch.', '')} "
                         f"but {device.type} has {free / 2**30:.1f} GiB free; use --dtype bfloat16, "
                         f"--device cuda or a smaller shape")
    from .adapters import adapter_by_family

    torch.manual_seed(seed)
    with torch.device(device):
        model = adapter_by_family(shape.family).model_cls()._from_config(config, dtype=dtype)
    return model.eval()
