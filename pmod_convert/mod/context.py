"""Which tokens of the current forward call are routing targets (vision tokens), and the routing switch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class RoutingContext:
    """Filled by a forward pre-hook on the multimodal base model (``model.model``) at every call.

    The hook is a bound method of this object, not a closure: ``copy.deepcopy`` of the model then
    copies the context together with the layers that read it, so a copy never routes with the
    original's mask. MoD layers read ``targets_for(hidden_states)``.

    ``disabled`` (a nesting depth, see :func:`routing_disabled`): while positive, MoD layers run the
    dense computation and the hook leaves the recorded targets of the last routed call untouched.
    """

    def __init__(self, target_token_ids: list[int]):
        self.target_token_ids = [int(i) for i in target_token_ids]
        self.is_target: torch.Tensor | None = None
        self.disabled = 0
        self._embedding: nn.Module | None = None

    def attach(self, base_model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        self._embedding = base_model.get_input_embeddings() if hasattr(base_model, "get_input_embeddings") else None
        return base_model.register_forward_pre_hook(self.capture, with_kwargs=True)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.disabled:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            ids = torch.tensor(self.target_token_ids, device=input_ids.device, dtype=input_ids.dtype)
            self.is_target = torch.isin(input_ids, ids)
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and self._embedding is not None:
            # Without ids, a placeholder is recognised by its embedding (what the processor inserted).
            ids = torch.tensor(self.target_token_ids, device=embeds.device)
            placeholder = self._embedding(ids).to(embeds.dtype)  # [n_ids, hidden]
            self.is_target = (embeds.unsqueeze(-2) == placeholder).all(-1).any(-1)
            return
        self.is_target = None

    def targets_for(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The target mask ``[batch, seq]`` for these hidden states, or None (route nothing)."""
        if self.disabled:
            return None
        mask = self.is_target
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return None
        return mask.to(hidden_states.device)


def routing_contexts(model: nn.Module) -> list[RoutingContext]:
    """Every distinct :class:`RoutingContext` read by the MoD layers inside ``model``.

    ``model`` may be wrapped (peft ``PeftModel``, DDP, ``torch.compile``'s ``OptimizedModule``, an
    accelerate-prepared model): the MoD layers are found among its submodules.
    """
    found: dict[int, RoutingContext] = {}
    for module in model.modules():
        context = module.__dict__.get("_pmod_context")
        if isinstance(context, RoutingContext):
            found.setdefault(id(context), context)
    return list(found.values())


@contextlib.contextmanager
def routing_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run an MoD model as its dense self: ``with routing_disabled(model): teacher = model(**batch)``.

    Inside the block every MoD layer runs exactly the dense decoder layer (every token is processed,
    no router weighting, the router is not even called), so the logits equal those of the model the
    routers were added to (e.g. a distillation teacher sharing weights with the student). The routing
    state of the last routed forward is left untouched, so a gradient-checkpointed student forward
    made before the block still recomputes its own routing in ``backward`` after it. Nests; works on
    wrapped models (peft, DDP, ``torch.compile``). The "MoD layer did not route" guard never fires
    inside the block. Yields ``model``. Raises ``ValueError`` if ``model`` has no MoD layers.
    """
    contexts = routing_contexts(model)
    if not contexts:
        raise ValueError(f"{type(model).__name__} has no MoD layers (pmod_convert.add_routers / load_pretrained)")
    for context in contexts:
        context.disabled += 1
    try:
        yield model
    finally:
        for context in contexts:
            context.disabled -= 1
