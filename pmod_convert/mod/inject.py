"""Turning chosen decoder layers of a loaded model into MoD layers, in place."""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ..errors import PmodError
from .context import RoutingContext
from .layer import MoDLayerMixin
from .router import ROUTER_NAME, TanhNormRouter

SUPPORTED_ATTENTION = ("sdpa", "eager")
_MOD_CLASSES: dict[type, type] = {}


def mod_class_for(layer_cls: type) -> type:
    """The MoD subclass of a decoder layer class (created once per class).

    It keeps the original ``__name__`` so ``_no_split_modules`` and device maps still match it.
    """
    if issubclass(layer_cls, MoDLayerMixin):
        return layer_cls
    if layer_cls not in _MOD_CLASSES:
        cls = type(layer_cls.__name__, (MoDLayerMixin, layer_cls), {"__module__": __name__})
        cls.__qualname__ = f"PMoD_{layer_cls.__module__.replace('.', '_')}_{layer_cls.__name__}"
        setattr(sys.modules[__name__], cls.__qualname__, cls)  # reachable by pickle
        _MOD_CLASSES[layer_cls] = cls
    return _MOD_CLASSES[layer_cls]


def convert_layer(layer: nn.Module, ratio: float, context: RoutingContext, *, hidden_size: int,
                  alpha: float, beta: float, bias: bool) -> nn.Module:
    """Make ``layer`` an MoD layer keeping ``ratio`` of the target tokens (idempotent: updates settings)."""
    if not hasattr(layer, "mlp") or not hasattr(layer, "self_attn"):
        raise PmodError(f"{type(layer).__name__} has no mlp/self_attn; this decoder layer cannot be routed")
    if not isinstance(layer, MoDLayerMixin):
        # A quantized layer's first parameter may be a packed integer weight: take a floating one (a norm).
        param = next((p for p in layer.parameters() if p.is_floating_point()), next(layer.parameters()))
        layer.__class__ = mod_class_for(type(layer))
        layer.add_module(ROUTER_NAME, TanhNormRouter(hidden_size, alpha=alpha, beta=beta, bias=bias,
                                                     dtype=param.dtype, device=param.device))
        layer.mlp.register_forward_hook(layer._pmod_capture_mlp)
        layer._pmod_capturing, layer._pmod_mlp_out = False, None
    router = getattr(layer, ROUTER_NAME)
    router.alpha, router.beta = float(alpha), float(beta)
    layer.pmod_ratio = float(ratio)
    layer._pmod_context = context
    return layer


def check_attention(config: Any) -> None:
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise PmodError(
            f"attention implementation {impl!r} is not supported by MoD layers yet; "
            f"load the model with attn_implementation='sdpa' or 'eager'"
        )
