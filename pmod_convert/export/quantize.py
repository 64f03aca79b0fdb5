"""bitsandbytes quantization through transformers' own loader, so the output loads with plain ``from_pretrained``.

The merged model is saved unquantized to a staging folder and loaded back with a ``BitsAndBytesConfig``:
transformers swaps the language model's ``nn.Linear`` layers for ``bnb.nn.Linear8bitLt`` / ``Linear4bit``
and quantizes each weight as it loads. Saving that model writes the packed tensors plus the
``quantization_config`` that tells ``from_pretrained`` how to rebuild them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import RecipeError
from ..mod.router import ROUTER_NAME
from .settings import ExportSettings


def _matches(name: str, entry: str) -> bool:
    """``entry`` occurs in the dotted ``name`` as whole components."""
    return f".{entry}." in f".{name}."


def resolve_skip_modules(model: nn.Module, entries: Iterable[str], *, strict: bool) -> list[str]:
    """Full names of the top-most modules matching ``entries`` that hold a plain ``nn.Linear``.

    These are the names transformers' ``llm_int8_skip_modules`` needs (it matches from the start of a
    module path). Routers are left out: they are added after quantization and are never bnb layers.
    ``strict``: an entry matching no module or parameter is an error (user input), else ignored
    (family defaults such as ``image_newline`` name parameters of some models only).
    """
    entries = list(entries)
    modules = dict(model.named_modules())
    params = [name for name, _ in model.named_parameters()]
    for entry in entries:
        if entry == ROUTER_NAME:
            continue
        if strict and not any(_matches(n, entry) for n in modules) and not any(_matches(p, entry) for p in params):
            examples = ", ".join(sorted({n.split(".")[-1] for n, m in modules.items() if type(m) is nn.Linear})[:6])
            raise RecipeError(f"skip module {entry!r} matches no module of this model; use dotted module names "
                              f"such as vision_tower, lm_head or one of {examples}")
    chosen: list[str] = []
    for name, module in modules.items():
        if not name or ROUTER_NAME in name.split("."):
            continue
        if any(name.startswith(c + ".") for c in chosen):
            continue
        if any(_matches(name, e) for e in entries) and _holds_linear(module):
            chosen.append(name)
    return chosen


def skeleton(checkpoint: Path) -> nn.Module:
    """The checkpoint's model built on the meta device (no weights): for checking module names early."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from ..adapters import get_adapter
    from ..checkpoint import read_config

    cls = get_adapter(read_config(checkpoint)).model_cls()
    with init_empty_weights():
        return cls._from_config(AutoConfig.from_pretrained(str(checkpoint)))


def _holds_linear(module: nn.Module) -> bool:
    return any(type(m) is nn.Linear for m in module.modules())


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
