"""The MoD decoder layer: a mixin subclass of the model's own decoder layer class.

Swapping the class of an existing layer (instead of wrapping it) keeps checkpoint key names,
``output_hidden_states``, gradient checkpointing and peft's module matching intact. The router is a
new child module, ``<layer>.pmod_router``.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import mod_cache_layer
from .context import RoutingContext
from .router import ROUTER_NAME, TanhNormRouter
from .routing import Gather, kept_attention_mask, select_tokens
from .scoring import inner_attention_name


class MoDLayerMixin:
    """Routes vision tokens around the wrapped decoder layer (p-MoD: top-k, TanhNorm, STRing).

    Kept tokens (all text + top-k vision) run through the unchanged layer as a shorter sequence with
    their original rotary embeddings and the model's own mask rows/columns. A kept vision token ends
    at ``y + (w - 1) * mlp_delta`` (= ``x + attn + w * mlp``); a skipped one at ``w * x``.

    With a baseline method (FastV / PyramidDrop, ``context.method != "pmod"``) the router is not called:
    targets are ranked by the attention scores of the forward's scoring layer
    (:mod:`pmod_convert.mod.scoring`), kept tokens come out as the dense layer's output ``y`` and skipped
    ones as ``x`` (a skipped token is never a key again, so it is pruned for every later layer).
    """

    pmod_ratio: float
    _pmod_context: RoutingContext
    _pmod_mlp_out: torch.Tensor | None
    _pmod_capturing: bool
    pmod_last_counts: tuple[torch.Tensor, torch.Tensor] | None = None  # (targets, kept targets) per row
    # Positions (in the last forward call's tokens) of the tokens this layer ran on, [batch, kept], -1 padded:
    # row j of the layer's attention map (output_attentions=True) is token pmod_last_kept[b, j].
    pmod_last_kept: torch.Tensor | None = None
    # Logical positions of the keys of that attention map, [batch, keys], -1 padded (cached entries first).
    pmod_last_key_positions: torch.Tensor | None = None

    def _pmod_capture_mlp(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._pmod_capturing:
            self._pmod_mlp_out = output

    @property
    def pmod_layer_idx(self) -> int:
        return self.self_attn.layer_idx

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        batch, seq, _ = hidden_states.shape
        targets = self._pmod_context.route_call(self.pmod_layer_idx, hidden_states)
        cache_layer = mod_cache_layer(cache, self.pmod_layer_idx) if use_cache or cache is not None else None
        past = cache_layer.get_seq_length() if cache_layer is not None else 0
        past_compressed = cache_layer is not None and cache_layer.compressed

        router: TanhNormRouter = getattr(self, ROUTER_NAME)
        context = self._pmod_context
        if targets is not None and bool(targets.any()):
            if context.method == "pmod":
                logits = router.logits(hidden_states)
                weights = router.token_weights(logits).to(hidden_states.dtype)
            else:  # training-free baseline: rank by the scoring layer's attention, no router weighting
                logits, weights = context.selection_scores(self.pmod_layer_idx, hidden_states), None
            with torch.no_grad():
                keep = select_tokens(logits, targets, self.pmod_ratio,
                                     segments=self._pmod_context.segments_for(hidden_states))
                # Per row: target tokens seen and kept in this call (read by retention reports).
                self.pmod_last_counts = (targets.sum(1), (keep & targets).sum(1))
        else:
            targets, weights = None, None
            keep = torch.ones(batch, seq, dtype=torch.bool, device=hidden_states.device)
            self.pmod_last_counts = None
        gather = Gather.from_keep(keep)
        self.pmod_last_kept = torch.where(gather.valid, gather.index, torch.full_like(gather.index, -1))
        if targets is not None and gather.index.shape[1] == 0:
            # Every token of every row is a skipped target (e.g. a 1-token step keeping floor(ratio * 1) = 0):
            # the layer is not run at all; the cache advances its logical length with no entry.
            self.pmod_last_key_positions = self.pmod_last_kept
            if cache_layer is not None:
                cache_layer.skip(seq)
            if weights is None:
                return hidden_states
            return torch.where(targets.unsqueeze(-1), weights.unsqueeze(-1) * hidden_states, hidden_states)

        call_kwargs = dict(kwargs, use_cache=use_cache)
        if cache is not None:
            call_kwargs["cache"] = cache
        # A sliding-window layer's mask starts at logical position key_offset (it covers only the window).
        key_offset = past + seq - attention_mask.shape[-1] if attention_mask is not None else 0
        if gather.is_identity and not past_compressed and key_offset == 0:
            # Nothing to cut: the layer sees exactly what the dense layer sees.
            sub_hidden, sub_mask, sub_pos, sub_pe = hidden_states, attention_mask, position_ids, position_embeddings
            new_slots = None
            self.pmod_last_key_positions = (torch.arange(past + seq, device=hidden_states.device)
                                            .expand(batch, past + seq))
        else:
            sub_hidden = gather.take(hidden_states, 1)
            sub_pos = gather.take(position_ids, -1)
            sub_pe = tuple(gather.take(t, -2) for t in position_embeddings) if position_embeddings else None
            query_slots = gather.index + past
            new_slots = torch.where(gather.valid, query_slots, torch.full_like(query_slots, -1))
            key_slots = new_slots
            if cache_layer is not None and cache_layer.slots is not None:
                key_slots = torch.cat([cache_layer.slots.to(new_slots.device), new_slots], dim=1)
            mask_dtype = attention_mask.dtype if attention_mask is not None else (
                torch.bool if inner_attention_name(self.self_attn) == "sdpa" else hidden_states.dtype
            )
            sub_mask = kept_attention_mask(attention_mask, gather.index, gather.valid, query_slots, key_slots, mask_dtype,
                                           key_offset=max(key_offset, 0))
            self.pmod_last_key_positions = key_slots
        if cache_layer is not None:
            if new_slots is None:
                new_slots = (torch.arange(seq, device=hidden_states.device) + past).expand(batch, seq)
            cache_layer.arm(new_slots, seq, compressed=not gather.is_identity)

        self._pmod_capturing, self._pmod_mlp_out = True, None
        if not gather.is_identity:  # a scoring layer maps its keys back to positions with this
            context.key_index, context.key_valid = gather.index, gather.valid
        try:
            out = super().forward(sub_hidden, attention_mask=sub_mask, position_ids=sub_pos,
                                  position_embeddings=sub_pe, **call_kwargs)
        finally:
            self._pmod_capturing = False
            context.key_index, context.key_valid = None, None
            mlp_delta, self._pmod_mlp_out = self._pmod_mlp_out, None
        if isinstance(out, tuple):  # some layers still return (hidden, ...)
            out = out[0]
        if targets is None or weights is None:  # no routing, or a baseline: skipped tokens pass unchanged
            return gather.scatter(hidden_states, out) if not gather.is_identity else out

        # STRing: kept targets scale their MLP branch by w, skipped targets become w * x.
        kept_targets = gather.take(targets, 1) & gather.valid
        kept_weights = gather.take(weights, 1)
        out = torch.where(kept_targets.unsqueeze(-1), out + (kept_weights - 1).unsqueeze(-1) * mlp_delta, out)
        skipped = torch.where(targets.unsqueeze(-1), weights.unsqueeze(-1) * hidden_states, hidden_states)
        return out if gather.is_identity else gather.scatter(skipped, out)
