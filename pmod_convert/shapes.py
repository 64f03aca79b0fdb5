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


def _shapes() -> dict[str, ModelShape]:
    """Every family adapter's named real-size shapes (``ArchitectureAdapter.shapes``), then ``tiny-<family>``."""
    from .adapters import all_adapters

    shapes: dict[str, ModelShape] = {}
    for adapter in all_adapters():
        for name, (summary, overrides, notes) in adapter.shapes.items():
            shapes[name] = ModelShape(name, adapter.family, summary, MappingProxyType(dict(overrides)), tuple(notes))
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
