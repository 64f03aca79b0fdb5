"""Per-family adapters.  Importing this package registers every supported family.

A family is one module here holding one ``ArchitectureAdapter`` subclass (``base.py``): everything the package
needs to know about it (decoder layers, vision ids, LoRA targets, unquantized modules, the typical image and its
vision-tower FLOPs, bench image layouts, processor quirks, named shapes, and the tiny test config and inputs).

Each adapter's ``tiny_config(**overrides)`` builds a small random-weight config (override rules:
``adapters.scaffold.split_overrides``) and ``dummy_inputs(config, *, batch_size=1, text_lengths=None,
images_per_row=None, padding_side="left", seed=0, image_sizes=None)`` builds a dict for
``model(**inputs)`` / ``model.generate(**inputs)``:

* ``images_per_row``: int or per-row list (default 1 each; 0 allowed in every family);
* ``image_sizes``: flat list of (height, width), one per image in row order (any-res and native-resolution
  families; ignored by fixed-size ones: LLaVA-1.5, Gemma 3, PaliGemma, InternVL, Aya Vision); by default cycles
  family sizes so rows differ in token count (fixed-size families differ by ``images_per_row``: ``tiny_varied``);
* ``text_lengths``: random text tokens per row (default ``8 + 5*i``), split around the images (PaliGemma: after
  them, as its processor writes the prefix);
* rows are padded on ``padding_side`` with ``attention_mask`` zeros.

Video families (llava_onevision, llava_next_video, qwen2_vl, qwen2_5_vl) also take ``videos_per_row``. The tiny
inputs of qwen3_vl and glm4v build images only (their video prompts carry per-frame timestamps / grouping that
the tiny inputs do not write; video rows are refused by the data loader anyway).
"""

from . import (  # noqa: F401  (registration: one module per family)
    aya_vision,
    gemma3,
    glm4v,
    idefics3,
    internvl,
    lfm2_vl,
    llava,
    llava_next,
    llava_next_video,
    llava_onevision,
    mistral3,
    paligemma,
    qwen2_vl,
    qwen3_vl,
)
from .base import (
    ArchitectureAdapter,
    adapter_by_family,
    all_adapters,
    get_adapter,
    refused_families,
    register,
    supported_families,
)

__all__ = [
    "ArchitectureAdapter",
    "adapter_by_family",
    "all_adapters",
    "get_adapter",
    "refused_families",
    "register",
    "supported_families",
]
