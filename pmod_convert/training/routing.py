"""Training-time routing: router taps (logits + selection per MoD layer), masked routing of text, shared router.

Nothing here changes the engine (``pmod_convert.mod``); it only observes or steers it from outside:

* :class:`RouterTaps` records, for every MoD layer, the router logits the layer routed with and what the layer
  really kept (read from the layer after its forward: top-k by the logits, plus any position prior, or by the
  layer's own attention).
  The engine asks the router for logits through ``TanhNormRouter.logits``, which calls ``nn.Linear.forward``
  directly, so module forward hooks on ``pmod_router`` never fire; the taps wrap ``logits`` on each router
  instance instead (an instance attribute shadowing the class method), and remove the wrapper on exit.
* :class:`TextRouting` (gamma-MoD masked routing learning) widens the routing targets of a training forward
  from the vision tokens to every real token except the instruction tokens.
* :func:`tie_routers` makes all MoD layers share one router's parameters (gamma-MoD shared router).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import get_adapter
from ..adapters.base import unwrap
from ..errors import RecipeError
from ..mod.router import ROUTER_NAME, TanhNormRouter


def bare_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / peft wrappers."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return unwrap(model)


def mod_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(decoder layer index, layer)`` of every MoD layer of ``model`` (peft/DDP wrappers allowed)."""
    from ..api import mod_layers as layers_of

    return layers_of(bare_model(model))


def routers(model: nn.Module) -> list[tuple[int, TanhNormRouter]]:
    return [(i, getattr(layer, ROUTER_NAME)) for i, layer in mod_layers(model)]


# ---- router taps ---------------------------------------------------------------------------------------------


@dataclass
class RouterRecord:
    layer: int
    logits: torch.Tensor  # [batch, seq] float32, attached to the graph (the router's own output)
    targets: torch.Tensor  # [batch, seq] bool: tokens the layer routed
    module: nn.Module  # the MoD layer: ``keep`` is read from what it really kept (after its forward)
    weights: torch.Tensor  # [batch, seq] TanhNorm weights alpha * tanh(logit) + beta (detached)

    @property
    def keep(self) -> torch.Tensor:
        """``[batch, seq]`` bool: the tokens the layer really kept in the recorded forward (its top-k by router
        logits plus position prior, or by its own attention; non-targets are kept too). Read it before the
        layer's next forward."""
        kept = self.module.pmod_last_kept
        keep = torch.zeros(self.targets.shape[0], self.targets.shape[1] + 1, dtype=torch.bool,
                           device=self.targets.device)
        index = torch.where(kept >= 0, kept, self.targets.shape[1]).to(self.targets.device)
        return keep.scatter_(1, index, True)[:, :-1]


class _Tap:
    """Replaces ``router.logits`` on one router instance; records what the layer routes with."""

    def __init__(self, taps: RouterTaps, index: int, layer: nn.Module, router: TanhNormRouter):
        self.taps, self.index, self.layer, self.router = taps, index, layer, router

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = TanhNormRouter.logits(self.router, hidden_states)
        if self.taps.recording:
            targets = self.layer._pmod_context.targets_for(hidden_states)
            if targets is not None and bool(targets.any()):
                with torch.no_grad():
                    weights = self.router.token_weights(logits.detach())
                self.taps.records.append(RouterRecord(self.index, logits, targets, self.layer, weights))
        return logits


class RouterTaps:
    """Context manager recording :class:`RouterRecord` per MoD layer while ``recording`` is true.

    Under gradient checkpointing a layer's forward runs again during backward; set ``recording`` only around
    the forward call so the recomputation does not record twice (the wrapper computes the same logits either
    way, which the non-reentrant checkpoint requires).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: list[RouterRecord] = []
        self.recording = False
        self._patched: list[TanhNormRouter] = []

    def __enter__(self) -> RouterTaps:
        for index, layer in mod_layers(self.model):
            router = getattr(layer, ROUTER_NAME)
            if "logits" in router.__dict__:
                raise RecipeError(f"the router of layer {index} is already tapped; RouterTaps cannot be nested")
            router.logits = _Tap(self, index, layer, router)
            self._patched.append(router)
        return self

    def __exit__(self, *exc) -> None:
        for router in self._patched:
            router.__dict__.pop("logits", None)
        self._patched.clear()
        self.records.clear()

    def record(self) -> _Recording:
        """``with taps.record(): model(**inputs)`` clears old records and records this forward only."""
        self.records.clear()
        return _Recording(self)


class _Recording:
    def __init__(self, taps: RouterTaps):
        self.taps = taps

    def __enter__(self) -> RouterTaps:
        self.taps.recording = True
        return self.taps

    def __exit__(self, *exc) -> None:
        self.taps.recording = False


# ---- masked routing of text (gamma-MoD) -----------------------------------------------------------------------


class TextRouting:
    """Routes text as well as vision tokens during training; instruction tokens are never routed.

    Registered (on enter) as a forward pre-hook on the same module as the engine's ``RoutingContext`` hook and
    after it, so it sees the vision mask the context just computed from ``input_ids`` and replaces it with::

        is_target = (vision | ~instruction_mask) & attention_mask

    i.e. vision tokens and answer/template text are routed, question/instruction text and padding are not.
    (When ``instruction_mask`` already excludes vision tokens, as the shared encoder's does, this equals
    ``(vision | text) & ~instruction_mask & attention_mask``.) Set the batch's masks with :meth:`set_batch`
    before each forward; they stay in place until the next one, which gradient-checkpoint recomputation
    (it reads the context again during backward) relies on.
    """

    def __init__(self, model: nn.Module):
        base = bare_model(model)
        self.context = getattr(base, "_pmod_context", None)
        if self.context is None:
            raise RecipeError("route_text needs an MoD model (pmod_convert.add_routers / load_pretrained)")
        adapter = get_adapter(base)
        self.root = getattr(base, adapter.layers_path.split(".")[0])
        self.instruction_mask: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self._handle = None

    def set_batch(self, instruction_mask: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.instruction_mask = instruction_mask.bool()
        self.attention_mask = attention_mask.bool()

    def __enter__(self) -> TextRouting:
        self._handle = self.root.register_forward_pre_hook(self.widen, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def widen(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        vision = self.context.is_target
        if vision is None or self.instruction_mask is None or vision.shape != self.instruction_mask.shape:
            return
        device = vision.device
        self.context.is_target = (vision | ~self.instruction_mask.to(device)) & self.attention_mask.to(device)


# ---- shared router (gamma-MoD) --------------------------------------------------------------------------------


def tie_routers(model: nn.Module) -> TanhNormRouter | None:
    """Make every MoD layer's router use the same weight/bias ``Parameter`` objects (the first layer's).

    The shared router starts at the mean of the layers' routers (zero for a fresh conversion).
    """
    found = routers(model)
    if not found:
        return None
    first = found[0][1]
    with torch.no_grad():
        first.weight.copy_(torch.stack([r.weight.detach().float() for _, r in found]).mean(0).to(first.weight.dtype))
        if first.bias is not None:
            first.bias.copy_(torch.stack([r.bias.detach().float() for _, r in found]).mean(0).to(first.bias.dtype))
    for _, router in found[1:]:
        router.weight = first.weight
        if router.bias is not None:
            router.bias = first.bias
    return first


def untie_routers(model: nn.Module) -> None:
    """Give each router its own copy of the (shared) values, so per-layer router files are complete."""
    seen: set[int] = set()
    for _, router in routers(model):
        for name in ("weight", "bias"):
            param = getattr(router, name)
            if param is None:
                continue
            if id(param) in seen:
                setattr(router, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
            seen.add(id(param))


def routers_are_tied(model: nn.Module) -> bool:
    found = routers(model)
    return len(found) > 1 and all(r.weight is found[0][1].weight for _, r in found)
