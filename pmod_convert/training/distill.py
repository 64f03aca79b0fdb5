"""The dense teacher of a finetune: the model being trained, run with routing off and LoRA adapters off.

No second copy of the weights is held: :meth:`Teacher.forward` runs the same modules under ``torch.no_grad``
with every MoD layer computing its dense layer (``pmod_convert.mod.context.routing_disabled``) and, for a
peft model, ``disable_adapter()``; dropout is off for the teacher pass (eval mode), and the training mode
is restored afterwards. The teacher pass therefore gives exactly the input checkpoint's dense logits.

With ``attention=True`` the pass also records, for every MoD layer whose router has no position prior (see
:class:`~pmod_convert.mod.router.TanhNormRouter`), the attention each key receives from
the text queries after the row's first vision token (mean over heads and those queries): the ranking
target of :func:`~pmod_convert.training.losses.router_rank_loss`. For a model on sdpa (or another fused
kernel) the teacher pass runs under a registered attention function (``pmod_capture_<kernel>``, see
transformers' ``AttentionInterface``) that calls the model's own kernel and, in MoD layers, also computes
``softmax(q_text K^T * scaling)`` for the text query rows only, from the post-RoPE query and key states
the kernel receives: ``[batch, heads, text queries, seq]`` instead of a full ``seq x seq`` map. A model
loaded with eager attention is hooked instead (eager returns the weights). Either way nothing is kept
beyond one ``[batch, seq]`` vector per MoD layer.

Cost: one extra forward without gradient per micro-batch (about a third of a training step's compute), the
teacher's logits at the distilled positions, and with ``attention=True`` one text-query attention map at a
time (see ``benchmarks/finetune_step.py`` for the measured step-time ratio).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import RecipeError
from ..mod.router import ROUTER_NAME
from ..mod.scoring import text_query_attention
from .losses import check_kept_logits
from .routing import bare_model, mod_layers


def _peft_model(model: nn.Module) -> nn.Module | None:
    return model if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") else None


def _register_capture(kernel: str) -> str:
    """Register (once) ``pmod_capture_<kernel>``: ``kernel``'s attention plus the text-query attention map."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = f"pmod_capture_{kernel}"
    if name in AttentionInterface._global_mapping:
        return name
    inner = AttentionInterface._global_mapping[kernel]

    def capture_attention(module, query, key, value, attention_mask, **kwargs):
        capture = getattr(module, "_pmod_capture", None)
        if capture is not None:
            capture(query, key, attention_mask, kwargs.get("scaling"))
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, capture_attention)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[kernel])
    return name


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
        every = dict(mod_layers(model))
        if not every:
            raise RecipeError("distillation needs an MoD model (its MoD layers are switched off for the teacher)")
        # Attention targets only for routers that train and rank by content: a router whose calibration chose a
        # position prior (``TanhNormRouter.position_prior``) was measured to keep better tokens in that order
        # than in the dense attention's, so the ranking loss would pull it the wrong way; a frozen one has no use.
        self.layers = {i: layer for i, layer in every.items()
                       if not getattr(layer, ROUTER_NAME).position_prior
                       and getattr(layer, ROUTER_NAME).weight.requires_grad}
        self.received: dict[int, torch.Tensor] = {}
        self._queries: torch.Tensor | None = None

    def _hook(self, index: int):
        def hook(module, args, output):  # eager attention: the module returns its weights
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RecipeError("the attention modules return no attention weights under eager attention; "
                                  "set router_rank_coef 0 for this model family")
            q = self._queries.to(weights.device, weights.dtype)  # [batch, seq]
            n = q.sum(1).clamp_min(1.0)
            got = torch.einsum("bhqk,bq->bk", weights.detach().float(), q.float())
            self.received[index] = got / (n.unsqueeze(1) * weights.shape[1])
        return hook

    def _capture(self, index: int):
        def capture(query, key, mask, scaling):
            queries = self._queries.to(query.device)
            if queries.shape[1] != query.shape[2]:
                raise RecipeError(f"layer {index}: the teacher saw {query.shape[2]} queries for a batch of "
                                  f"{queries.shape[1]} tokens; set router_rank_coef 0 for this model family")
            self.received[index] = text_query_attention(query.detach(), key.detach(), mask, queries, scaling)
        return capture

    @torch.no_grad()
    def forward(self, inputs: dict[str, torch.Tensor], positions: torch.Tensor | None = None) -> torch.Tensor:
        """Dense logits ``[batch, seq, vocab]`` for ``inputs`` (``model_inputs`` of a batch, on the device).

        ``positions`` (bool ``[batch, seq - 1]``, as ``losses.distill_positions``): only the logits there,
        ``[positions, vocab]`` in row-major order (the model's ``logits_to_keep``; the ``lm_head`` projection
        of every other position is skipped). With ``attention=True``, :attr:`received` then maps each MoD
        layer index to ``[batch, seq]``.
        """
        if positions is not None:
            keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
            keep[:, :-1] = positions
            inputs = {**inputs, "logits_to_keep": keep}
        from ..mod.context import routing_disabled

        self.received = {}
        peft = _peft_model(self.model)
        was_training = self.model.training
        handles, previous, captured = [], None, []
        if self.attention:
            self._queries = text_queries(inputs["input_ids"], inputs["attention_mask"], self.vision_ids)
            previous = self.bare.config._attn_implementation
            if previous == "eager":
                handles = [layer.self_attn.register_forward_hook(self._hook(i)) for i, layer in self.layers.items()]
                previous = None
            else:
                self.bare.set_attn_implementation(_register_capture(previous))
                for i, layer in self.layers.items():
                    layer.self_attn._pmod_capture = self._capture(i)
                    captured.append(layer.self_attn)
        self.model.eval()
        try:
            adapters = peft.disable_adapter() if peft is not None else contextlib.nullcontext()
            with adapters, routing_disabled(self.bare):
                out = self.model(**inputs, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
            for module in captured:
                del module._pmod_capture
            if previous is not None:
                self.bare.set_attn_implementation(previous)
            self._queries = None
            self.model.train(was_training)
        if positions is not None:
            return check_kept_logits(out.logits.detach(), keep)
        return out.logits.detach()
