"""bitsandbytes quantization through transformers' own loader, so the output loads with plain ``from_pretrained``.

The merged model is saved unquantized to a staging folder and loaded back with a ``BitsAndBytesConfig``:
transformers swaps the language model's ``nn.Linear`` layers for ``bnb.nn.Linear8bitLt`` / ``Linear4bit``
and quantizes each weight as it loads. Saving that model writes the packed tensors plus the
``quantization_config`` that tells ``from_pretrained`` how to rebuild them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..quantization import resolve_skip_modules, skeleton
from .settings import ExportSettings

__all__ = ["bnb_config", "count_linears", "quantize_folder", "quiet_int8_casts", "resolve_skip_modules", "skeleton"]


def bnb_config(settings: ExportSettings, skip_modules: list[str]):
    """The transformers ``BitsAndBytesConfig`` of an export (None for ``quantize="none"``)."""
    from transformers import BitsAndBytesConfig

    if not settings.quantized:
        return None
    if settings.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quantize,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, settings.effective_compute_dtype()),
        llm_int8_skip_modules=list(skip_modules),
    )


def quantize_folder(stage: Path, settings: ExportSettings, skip_modules: list[str]) -> nn.Module:
    """Load the unquantized MoD checkpoint in ``stage`` as a bitsandbytes-quantized MoD model."""
    from ..api import load_pretrained

    return load_pretrained(stage, quantization_config=bnb_config(settings, skip_modules), adapter=False)


def count_linears(model: nn.Module) -> dict[str, int]:
    """How many linear layers are bnb-quantized and how many stayed ``nn.Linear`` (routers apart)."""
    import bitsandbytes as bnb

    counts = {"quantized": 0, "unquantized": 0}
    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            counts["quantized"] += 1
        elif type(module) is nn.Linear:
            counts["unquantized"] += 1
    return counts


# bitsandbytes' 4-bit CPU matmul reshapes each weight's absmax to [out, in // blocksize]: it needs in % 64 == 0
BNB_4BIT_BLOCKSIZE = 64


def cpu_4bit_misfits(model: nn.Module) -> list[tuple[str, int]]:
    """``(name, input width)`` of the ``Linear4bit`` layers on the CPU that bitsandbytes' 4-bit CPU kernels cannot
    run: input width not a multiple of ``BNB_4BIT_BLOCKSIZE`` (CUDA kernels have no such limit)."""
    import bitsandbytes as bnb

    return [(name, module.in_features) for name, module in model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu"
            and module.in_features % BNB_4BIT_BLOCKSIZE]


@contextlib.contextmanager
def quiet_int8_casts() -> Iterator[None]:
    """Mute bitsandbytes' per-call notice that LLM.int8 casts float32 inputs to float16 (one line per matmul)."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    previous = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        bnb_logger.setLevel(previous)
