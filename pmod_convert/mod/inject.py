"""Turning chosen decoder layers of a loaded model into MoD layers, in place."""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
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
                  alpha: float, beta: float, bias: bool, mlp_branch: str = "mlp") -> nn.Module:
    """Make ``layer`` an MoD layer keeping ``ratio`` of the target tokens (idempotent: updates settings).

    ``mlp_branch``: the child whose output is the MLP branch added to the residual (STRing scales it): ``mlp``,
    or the norm after it in sandwich-norm layers (Gemma 2/3, GLM-4V; the adapter's ``mlp_branch``).
    """
    if not hasattr(layer, "mlp") or not hasattr(layer, "self_attn") or not hasattr(layer, mlp_branch):
        raise PmodError(f"{type(layer).__name__} has no mlp/self_attn/{mlp_branch}; this decoder layer cannot be routed")
    if not isinstance(layer, MoDLayerMixin):
        # A quantized layer's first parameter may be a packed integer weight: take a floating one (a norm).
        param = next((p for p in layer.parameters() if p.is_floating_point()), next(layer.parameters()))
        layer.__class__ = mod_class_for(type(layer))
        layer.add_module(ROUTER_NAME, TanhNormRouter(hidden_size, alpha=alpha, beta=beta, bias=bias,
                                                     dtype=param.dtype, device=router_device(layer)))
        # the MLP branch's output is captured by a forward hook registered only around routed calls (a hook that
        # stays registered would put every call of the branch, decode steps included, on torch's slower hook path)
        layer.pmod_mlp_branch = mlp_branch
        layer._pmod_capturing, layer._pmod_mlp_out = False, None
    _route_under_accelerate(layer)
    router = getattr(layer, ROUTER_NAME)
    router.alpha, router.beta = float(alpha), float(beta)
    layer.pmod_ratio = float(ratio)
    layer._pmod_context = context
    context.register(layer.pmod_layer_idx)
    return layer


def router_device(layer: nn.Module) -> torch.device:
    """Where a new router of ``layer`` lives: the device the layer computes on, never ``meta``.

    Under an accelerate device map with CPU/disk offload, the layer's weights sit on ``meta`` between calls
    and its hooks load them onto their ``execution_device`` for each call; the (tiny) router stays resident
    on that execution device. Raises ``PmodError`` when no real device can be found.
    """
    devices = []
    for module in layer.modules():
        hook = getattr(module, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            devices.append(torch.device(device if not isinstance(device, int) else f"cuda:{device}"))
    devices += [p.device for p in layer.parameters()]
    for device in devices:
        if device.type != "meta":
            return device
    raise PmodError(f"{type(layer).__name__} has its weights on the meta device and no accelerate hook that "
                    "says where it runs; load the model with real weights (or a device_map) before add_routers")


def _route_under_accelerate(layer: nn.Module) -> None:
    """Make an accelerate-hooked layer call the MoD forward.

    ``add_hook_to_module`` (device maps, offload) stores the bound ``forward`` of the layer *at hook time* as
    ``_old_forward`` and calls it from the hooked ``forward``: after the class swap that is still the dense
    decoder forward. Rebind it to the MoD forward (the hook's device alignment and offload stay in place).
    """
    if "_old_forward" in layer.__dict__:
        layer._old_forward = types.MethodType(type(layer).forward, layer)


def check_attention(config: Any) -> None:
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise PmodError(
            f"attention implementation {impl!r} is not supported by MoD layers yet; "
            f"load the model with attn_implementation='sdpa' or 'eager'"
        )
