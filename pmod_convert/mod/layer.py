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
from ..errors import PmodError
from .scoring import inner_attention_name, own_attention_scores


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
    pmod_input_norm: str = "input_layernorm"  # the pre-attention norm the attention scorer runs (adapter's name)
    pmod_scorer_rope: bool = True  # whether the attention scorer applies rotary embeddings (as the layer does)
    _pmod_context: RoutingContext
    _pmod_mlp_out: torch.Tensor | None
    _pmod_capturing: bool
    pmod_last_counts: tuple[torch.Tensor, torch.Tensor] | None = None  # (targets, kept targets) per row
    _pmod_last_kept: object = None
    _pmod_last_key_positions: object = None

    # Positions (in the last forward call's tokens) of the tokens this layer ran on, [batch, kept], -1 padded:
    # row j of the layer's attention map (output_attentions=True) is token pmod_last_kept[b, j]. Built on
    # first read (a decode step stores only what it needs to build it).
    @property
    def pmod_last_kept(self) -> torch.Tensor | None:
        value = self._pmod_last_kept
        if callable(value):
            value = self._pmod_last_kept = value()
        return value

    @pmod_last_kept.setter
    def pmod_last_kept(self, value) -> None:
        self._pmod_last_kept = value

    # Logical positions of the keys of that attention map, [batch, keys], -1 padded (cached entries first).
    @property
    def pmod_last_key_positions(self) -> torch.Tensor | None:
        value = self._pmod_last_key_positions
        if callable(value):
            value = self._pmod_last_key_positions = value()
        return value

    @pmod_last_key_positions.setter
    def pmod_last_key_positions(self, value) -> None:
        self._pmod_last_key_positions = value

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
        context = self._pmod_context
        targets = context.route_call(self.pmod_layer_idx, hidden_states)
        cache_layer = mod_cache_layer(cache, self.pmod_layer_idx) if use_cache or cache is not None else None
        call_kwargs = dict(kwargs, use_cache=use_cache)
        if cache is not None:
            call_kwargs["cache"] = cache
        if targets is None:  # nothing routed in this call (decode steps, text): the dense layer's cost
            self.__dict__["pmod_last_counts"] = None  # (plain attributes: nn.Module.__setattr__ is slow)
            return self._pmod_keep_all(hidden_states, attention_mask, position_ids, position_embeddings,
                                       cache_layer, call_kwargs)
        return self._pmod_route(hidden_states, targets, attention_mask, position_ids, position_embeddings,
                                cache_layer, call_kwargs)

    def _pmod_attention_name(self) -> str:
        return inner_attention_name(self.self_attn)

    def _pmod_run(self, hidden_states, attention_mask, position_ids, position_embeddings, call_kwargs):
        out = super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                              position_embeddings=position_embeddings, **call_kwargs)
        return out[0] if isinstance(out, tuple) else out  # some layers still return (hidden, ...)

    def _pmod_keep_all(self, hidden_states, attention_mask, position_ids, position_embeddings, cache_layer,
                       call_kwargs):
        """Every token of the call is kept: no gather, no scatter, the model's own mask where it is exact.

        Without a cache, or with one that still maps entries 1:1 to positions, the layer sees exactly what the
        dense layer sees. With a compressed cache (a decode step after a routed prefill) the queries are still
        every token; only the key mask changes: none at all for one sdpa query over unpadded entries, else the
        model's mask columns at the cached slots (``MoDCacheLayer.decode_mask``). Sliding-window layers with a
        compressed cache take the general path.
        """
        batch, seq, _ = hidden_states.shape
        past = cache_layer.get_seq_length() if cache_layer is not None else 0
        key_offset = past + seq - attention_mask.shape[-1] if attention_mask is not None else 0
        if key_offset == 0 and (cache_layer is None or not cache_layer.compressed or not cache_layer.is_sliding):
            self.__dict__["_pmod_last_kept"] = _arange_rows(batch, seq, hidden_states.device)
            self.__dict__["_pmod_last_key_positions"] = _key_positions(cache_layer, batch, past, seq,
                                                                       hidden_states.device)
            if cache_layer is not None and cache_layer.compressed:
                attention_mask = cache_layer.decode_mask(attention_mask, seq, self._pmod_attention_name,
                                                         hidden_states.dtype)
            return self._pmod_run(hidden_states, attention_mask, position_ids, position_embeddings, call_kwargs)
        return self._pmod_gathered(hidden_states, None, None, Gather.identity(batch, seq, hidden_states.device),
                                   attention_mask, position_ids, position_embeddings, cache_layer, call_kwargs)

    @torch.compiler.disable(recursive=True)
    def _pmod_route(self, hidden_states, targets, attention_mask, position_ids, position_embeddings, cache_layer,
                    call_kwargs):
        batch, seq, _ = hidden_states.shape
        router: TanhNormRouter = getattr(self, ROUTER_NAME)
        context = self._pmod_context
        if context.method == "pmod":
            logits = router.logits(hidden_states)
            weights = router.token_weights(logits).to(hidden_states.dtype)
            if router.scorer == "attention" and self.pmod_ratio < 1.0:  # rank by the layer's own attention
                if cache_layer is not None and cache_layer.get_seq_length():
                    raise PmodError(f"MoD layer {self.pmod_layer_idx} ranks by its own attention and needs the whole "
                                    "prompt in one forward (no chunked prefill)")
                logits = own_attention_scores(self, hidden_states, targets, attention_mask, position_embeddings,
                                              query_end=context.query_end(hidden_states),
                                              norm_name=self.pmod_input_norm, rope=self.pmod_scorer_rope,
                                              segments=context.segments_for(hidden_states))
        else:  # training-free baseline: rank by the scoring layer's attention, no router weighting
            logits, weights = context.selection_scores(self.pmod_layer_idx, hidden_states), None
        with torch.no_grad():
            n_targets = targets.sum(1)
            if self.pmod_ratio >= 1.0:  # floor(n * ratio) >= n: every target is kept, no ranking needed
                gather = Gather.identity(batch, seq, hidden_states.device)
                self.pmod_last_counts = (n_targets, n_targets)
            else:
                segments = context.segments_for(hidden_states)
                scores = router.selection_scores(logits, targets, segments) if (
                    context.method == "pmod" and router.scorer == "router") else logits
                keep = select_tokens(scores, targets, self.pmod_ratio, segments=segments)
                gather = Gather.from_keep(keep)
                # Per row: target tokens seen and kept in this call (read by retention reports).
                self.pmod_last_counts = (n_targets, (keep & targets).sum(1))
        if gather.index.shape[1] == 0:
            # Every token of every row is a skipped target (e.g. a 1-token step keeping floor(ratio * 1) = 0):
            # the layer is not run at all; the cache advances its logical length with no entry.
            self.pmod_last_kept = self.pmod_last_key_positions = gather.index
            if cache_layer is not None:
                cache_layer.skip(seq)
            if weights is None:
                return hidden_states
            return torch.where(targets.unsqueeze(-1), weights.unsqueeze(-1) * hidden_states, hidden_states)
        return self._pmod_gathered(hidden_states, targets, weights, gather, attention_mask, position_ids,
                                   position_embeddings, cache_layer, call_kwargs)

    def _pmod_gathered(self, hidden_states, targets, weights, gather, attention_mask, position_ids,
                       position_embeddings, cache_layer, call_kwargs):
        """Run the layer on the kept tokens of ``gather`` and apply STRing (``targets``/``weights`` None: none)."""
        batch, seq, _ = hidden_states.shape
        context = self._pmod_context
        past = cache_layer.get_seq_length() if cache_layer is not None else 0
        past_compressed = cache_layer is not None and cache_layer.compressed
        # A sliding-window layer's mask starts at logical position key_offset (it covers only the window).
        key_offset = past + seq - attention_mask.shape[-1] if attention_mask is not None else 0
        identity = gather.is_identity
        if identity and not past_compressed and key_offset == 0:
            # Nothing to cut: the layer sees exactly what the dense layer sees.
            sub_hidden, sub_mask, sub_pos, sub_pe = hidden_states, attention_mask, position_ids, position_embeddings
            new_slots = None
            self.pmod_last_kept = _arange_rows(batch, seq, hidden_states.device)
            self.pmod_last_key_positions = _key_positions(cache_layer, batch, past, seq, hidden_states.device)
        else:
            sub_hidden = gather.take(hidden_states, 1)
            sub_pos = gather.take(position_ids, -1)
            sub_pe = tuple(gather.take(t, -2) for t in position_embeddings) if position_embeddings else None
            query_slots = gather.index + past
            new_slots = torch.where(gather.valid, query_slots, -1) if gather.ragged else query_slots
            attention = inner_attention_name(self.self_attn)
            if attention_mask is None and attention == "sdpa" and past == 0:
                # Plain causal prompt (no padding, nothing cached): kept tokens keep their order, so the kept
                # sequence is plain causal too and sdpa needs no mask (is_causal). Padding entries of ragged
                # rows come after a row's kept tokens: no kept query sees them.
                sub_mask, key_slots = None, new_slots
            else:
                key_slots = new_slots
                if cache_layer is not None and cache_layer.slots is not None:
                    key_slots = torch.cat([cache_layer.slots.to(new_slots.device), new_slots], dim=1)
                mask_dtype = attention_mask.dtype if attention_mask is not None else (
                    torch.bool if attention == "sdpa" else hidden_states.dtype)
                sub_mask = kept_attention_mask(attention_mask, gather.index, gather.valid, query_slots, key_slots,
                                               mask_dtype, key_offset=max(key_offset, 0))
            self.pmod_last_kept = (lambda g=gather: torch.where(g.valid, g.index, -1))
            self.pmod_last_key_positions = key_slots
        if cache_layer is not None:
            if new_slots is None:
                new_slots = (torch.arange(seq, device=hidden_states.device) + past).expand(batch, seq)
            cache_layer.arm(new_slots, seq, compressed=not identity)

        capture = targets is not None and weights is not None  # STRing needs the MLP branch's output
        self._pmod_capturing, self._pmod_mlp_out = capture, None
        hook = getattr(self, getattr(self, "pmod_mlp_branch", "mlp")).register_forward_hook(
            self._pmod_capture_mlp) if capture else None
        if not identity:  # a scoring layer maps its keys back to positions with this
            context.key_index, context.key_valid = gather.index, gather.valid
        try:
            out = self._pmod_run(sub_hidden, sub_mask, sub_pos, sub_pe, call_kwargs)
        finally:
            if hook is not None:
                hook.remove()
            self._pmod_capturing = False
            context.key_index, context.key_valid = None, None
            mlp_delta, self._pmod_mlp_out = self._pmod_mlp_out, None
        if targets is None or weights is None:  # no routing, or a baseline: skipped tokens pass unchanged
            return out if identity else gather.scatter(hidden_states, out)

        # STRing: kept targets scale their MLP branch by w (out + (w - 1) * mlp), skipped targets become w * x.
        if identity:
            scale = torch.where(targets, weights - 1, 0).unsqueeze(-1).to(out.dtype)
            return torch.addcmul(out, scale, mlp_delta)
        kept_targets = gather.take(targets, 1)
        if gather.ragged:
            kept_targets = kept_targets & gather.valid
        scale = torch.where(kept_targets, gather.take(weights, 1) - 1, 0).unsqueeze(-1).to(out.dtype)
        out = torch.addcmul(out, scale, mlp_delta)
        skipped = hidden_states * torch.where(targets, weights, 1).unsqueeze(-1).to(hidden_states.dtype)
        return gather.scatter(skipped, out, inplace=True)


def _arange_rows(batch: int, seq: int, device: torch.device):
    """A deferred ``[batch, seq]`` arange (pmod_last_kept of a call that kept every token)."""
    return lambda: torch.arange(seq, device=device).expand(batch, seq)


def _key_positions(cache_layer, batch: int, past: int, seq: int, device: torch.device):
    """Deferred logical positions of the keys a keep-all call attends to: cached entries, then the call's tokens."""
    if cache_layer is None:
        prefix, start = None, 0
    else:  # read before this call's update: its entries follow the cached tail (or start one after the prefix)
        prefix, start = cache_layer._prefix, cache_layer._tail_start if cache_layer._tail else past

    def build() -> torch.Tensor:
        tail = torch.arange(start, past + seq, device=device).expand(batch, past + seq - start)
        return tail if prefix is None else torch.cat([prefix.to(device), tail], dim=1)

    return build
