"""The dense teacher of a finetune: the model being trained, run with routing off and LoRA adapters off.

No second copy of the weights is held: :meth:`Teacher.forward` runs the same modules under ``torch.no_grad``
with every MoD layer computing its dense layer (``pmod_convert.mod.context.routing_disabled``) and, for a
peft model, ``disable_adapter()``; dropout is off for the teacher pass (eval mode), and the training mode
is restored afterwards. The teacher pass therefore gives exactly the input checkpoint's dense logits.

With ``attention=True`` the pass also records, for every MoD layer, the attention each key receives from
the text queries after the row's first vision token (mean over heads and those queries): the ranking
target of :func:`~pmod_convert.training.losses.router_rank_loss`. The attention weights come from the
attention modules' return value, which transformers 5.x fills only with the eager implementation, so the
teacher pass switches the model to eager attention and back (``set_attn_implementation``). Each layer's
map ``[batch, heads, seq, seq]`` is reduced inside a forward hook and never kept.

Cost: one extra forward without gradient per micro-batch (about a third of a training step's compute), the
teacher's logits at the distilled positions, and with ``attention=True`` one eager attention map at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import RecipeError
from .routing import bare_model, mod_layers


def _peft_model(model: nn.Module) -> nn.Module | None:
    return model if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") else None


def text_queries(input_ids: torch.Tensor, attention_mask: torch.Tensor, vision_ids: Sequence[int]) -> torch.Tensor:
    """Bool ``[batch, seq]``: real text positions after the row's first vision token."""
    vision = torch.isin(input_ids, torch.tensor(list(vision_ids), device=input_ids.device))
    return (vision.long().cumsum(1) > 0) & ~vision & attention_mask.bool()


class Teacher:
    """Dense logits (and per-MoD-layer text-to-vision attention) of the model being trained.

    ``model``: the training model (peft- or DDP-wrapped allowed) with MoD layers. ``vision_ids``: the
    checkpoint's vision placeholder token ids. Raises :class:`RecipeError` when the model has no MoD layer.
    """

    def __init__(self, model: nn.Module, vision_ids: Sequence[int], *, attention: bool = False):
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.vision_ids = [int(i) for i in vision_ids]
        self.attention = attention
        self.bare = bare_model(model)
        self.layers = dict(mod_layers(model))
        if not self.layers:
            raise RecipeError("distillation needs an MoD model (its MoD layers are switched off for the teacher)")
        self.received: dict[int, torch.Tensor] = {}
        self._queries: torch.Tensor | None = None

    def _hook(self, index: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RecipeError("the attention modules return no attention weights under eager attention; "
                                  "set router_rank_coef 0 for this model family")
            q = self._queries.to(weights.device, weights.dtype)  # [batch, seq]
            n = q.sum(1).clamp_min(1.0)
            # attention each key receives: sum over heads and text queries, divided by heads * queries
            got = torch.einsum("bhqk,bq->bk", weights.detach().float(), q.float())
            self.received[index] = got / (n.unsqueeze(1) * weights.shape[1])
        return hook

    @torch.no_grad()
    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dense logits ``[batch, seq, vocab]`` for ``inputs`` (``model_inputs`` of a batch, on the device).

        With ``attention=True``, :attr:`received` then maps each MoD layer index to ``[batch, seq]``.
        """
        from ..mod.context import routing_disabled

        self.received = {}
        peft = _peft_model(self.model)
        was_training = self.model.training
        handles, previous = [], None
        if self.attention:
            self._queries = text_queries(inputs["input_ids"], inputs["attention_mask"], self.vision_ids)
            previous = self.bare.config._attn_implementation
            self.bare.set_attn_implementation("eager")
            handles = [layer.self_attn.register_forward_hook(self._hook(i)) for i, layer in self.layers.items()]
        self.model.eval()
        try:
            adapters = peft.disable_adapter() if peft is not None else contextlib.nullcontext()
            with adapters, routing_disabled(self.bare):
                out = self.model(**inputs, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
            if previous is not None:
                self.bare.set_attn_implementation(previous)
            self._queries = None
            self.model.train(was_training)
        return out.logits.detach()
