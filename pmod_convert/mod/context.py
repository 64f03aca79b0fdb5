"""Which tokens of the current forward call are routing targets (vision tokens)."""

from __future__ import annotations

import torch
from torch import nn


class RoutingContext:
    """Filled by a forward pre-hook on the multimodal base model (``model.model``) at every call.

    The hook is a bound method of this object, not a closure: ``copy.deepcopy`` of the model then
    copies the context together with the layers that read it, so a copy never routes with the
    original's mask. MoD layers read ``targets_for(hidden_states)``.
    """

    def __init__(self, target_token_ids: list[int]):
        self.target_token_ids = [int(i) for i in target_token_ids]
        self.is_target: torch.Tensor | None = None
        self._embedding: nn.Module | None = None

    def attach(self, base_model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        self._embedding = base_model.get_input_embeddings() if hasattr(base_model, "get_input_embeddings") else None
        return base_model.register_forward_pre_hook(self.capture, with_kwargs=True)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
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
        mask = self.is_target
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return None
        return mask.to(hidden_states.device)
