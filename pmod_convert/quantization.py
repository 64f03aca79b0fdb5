"""Which modules stay unquantized: one rule for ``export --quantize`` and ``finetune --qlora``.

Adapters list module-name parts (``never_quantize``: vision tower, projector, lm_head, routers); this module
turns them into the full module names that transformers' ``llm_int8_skip_modules`` matches.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from .errors import RecipeError
from .mod.router import ROUTER_NAME


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

    from .adapters import get_adapter
    from .checkpoint import read_config

    cls = get_adapter(read_config(checkpoint)).model_cls()
    with init_empty_weights():
        return cls._from_config(AutoConfig.from_pretrained(str(checkpoint), trust_remote_code=False))


def _holds_linear(module: nn.Module) -> bool:
    return any(type(m) is nn.Linear for m in module.modules())
