"""A KV-cache layer for MoD layers: stores kept tokens only, reports the logical length."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import PmodError


class MoDCacheLayer(DynamicLayer):
    """Keys/values of the tokens an MoD layer kept, with each entry's logical slot.

    ``slots[b, j]`` is the position (in the logical sequence that transformers sees) of physical
    entry ``j`` of row ``b``, or -1 for padding (rows keep different numbers of tokens).
    ``get_seq_length()`` and ``get_mask_sizes()`` report the LOGICAL length, because position ids
    and masks for the whole model are built from one layer's cache (layer 0 may be an MoD layer).

    ``sliding_window`` (set when it replaces a ``DynamicSlidingWindowLayer``): the layer attends to the
    last ``sliding_window`` logical positions. ``get_mask_sizes`` then answers exactly as a
    ``DynamicSlidingWindowLayer`` with the same logical length would (the model builds one mask for all its
    sliding layers, MoD or not), and entries that no later query can see (slot <= length - window) are
    dropped after each update.
    """

    def __init__(self, sliding_window: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.sliding_window = None if sliding_window is None else int(sliding_window)
        self.record_past = False  # sliding layers: keep old entries until the next crop (assisted decoding)
        # Slots are stored as an explicit prefix [batch, P] plus a tail: the entries after the prefix, at the
        # contiguous logical slots ``_tail_start ..`` (the same in every row). A step that keeps every token (a
        # decode step) only appends keys, so nothing else changes. ``slots`` materialises both on access.
        # Lengths derive from the key tensor's size (logical = physical + ``_offset``), so torch.compile sees
        # one growing tensor dimension per step and no Python int that changes every step.
        self._prefix: torch.Tensor | None = None
        self._prefix_ragged = False  # the prefix holds padding entries (-1): rows keep different counts
        self._prefix_index: torch.Tensor | None = None  # prefix.clamp(min=0), built on first decode_mask use
        self._tail_start, self._batch, self._offset = 0, 0, 0
        self.compressed = False  # True once physical entries stop mapping 1:1 to logical slots
        self._pending: tuple[torch.Tensor, int, bool] | None = None

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None

    def activate_past_recording(self) -> None:
        self.record_past = True

    @classmethod
    def from_dynamic(cls, layer: DynamicLayer) -> "MoDCacheLayer":
        new = cls(sliding_window=getattr(layer, "sliding_window", None))
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
            # a sliding layer may already have dropped its oldest entries: its last entry is position length - 1
            new.logical_length = int(getattr(layer, "cumulative_length", 0) or layer.keys.shape[-2]) - layer.keys.shape[-2]
            new.update(layer.keys, layer.values)
        return new

    # ---- lengths and slots: an explicit prefix plus a contiguous tail ----------------------------------
    @property
    def logical_length(self) -> int:
        """Tokens the layer has seen (kept or not): what transformers builds positions and masks from."""
        return self.physical_length() + self._offset

    @logical_length.setter
    def logical_length(self, value: int) -> None:
        self._offset = value - self.physical_length()

    @property
    def _tail(self) -> int:
        return self.physical_length() - (self._prefix.shape[1] if self._prefix is not None else 0)

    @property
    def slots(self) -> torch.Tensor | None:
        """``[batch, physical]`` logical slot of each cached entry, -1 for padding; None when empty."""
        if self._tail:
            device = self._prefix.device if self._prefix is not None else self.device
            tail = (torch.arange(self._tail, device=device) + self._tail_start).expand(self._batch, self._tail)
            self._set_prefix(tail if self._prefix is None else torch.cat([self._prefix, tail], dim=1))
        return self._prefix

    @slots.setter
    def slots(self, value: torch.Tensor | None) -> None:
        self._set_prefix(value)

    def _set_prefix(self, value: torch.Tensor | None) -> None:
        self._prefix, self._prefix_index = value, None
        self._prefix_ragged = value is not None and value.numel() > 0 and bool((value < 0).any())
        if value is not None:
            self._batch = value.shape[0]

    def arm(self, slots: torch.Tensor, query_length: int, compressed: bool) -> None:
        """Announce the slots of the keys the next ``update`` receives, and the logical step size."""
        self._pending = (slots, query_length, compressed)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        pending, self._pending = self._pending, None
        if pending is None:  # every token kept (a decode step, or a layer converted from a dense one)
            if self._tail == 0:  # the new entries start the tail
                self._tail_start, self._batch = self.logical_length, key_states.shape[0]
            keys, values = super().update(key_states, value_states, *args, **kwargs)  # logical grows with them
        else:
            slots, query_length, compressed = pending
            current, length = self.slots, self.logical_length
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self.slots = slots if current is None else torch.cat([current, slots.to(current.device)], dim=1)
            self.logical_length = length + query_length
            self.compressed = self.compressed or compressed
        self._drop_outside_window()
        return keys, values  # every key this call attends to (as DynamicSlidingWindowLayer returns)

    def decode_mask(self, attention_mask: torch.Tensor | None, query_length: int, attention,
                    dtype: torch.dtype) -> torch.Tensor | None:
        """The mask of a call that keeps all its ``query_length`` tokens, over the cached entries plus them.

        ``attention_mask``: the model's mask for this call (``[b or 1, 1, q, logical + q]`` bool or additive
        float, or None for plain causal with no padding); ``attention``: the inner attention's name
        ("sdpa"/"eager"), or a callable returning it (called only when a mask has to be built).
        Returns None where no mask is needed (one query, no padding entries, no padding in the model's mask:
        the query sees every cached entry and itself). Otherwise the model's mask columns at the cached entries' slots (one
        gather over the prefix; the tail and the new tokens are a contiguous slice), padding entries masked.
        Only for non-sliding layers (sliding layers take the layer's general path).
        """
        if attention_mask is None and query_length == 1 and not self._prefix_ragged:
            return None
        if callable(attention):
            attention = attention()
        if attention_mask is None:
            from .routing import kept_attention_mask

            keys = self.slots
            new = (torch.arange(query_length, device=keys.device if keys is not None else None)
                   + self.logical_length).expand(max(self._batch, 1), query_length)
            key_slots = new if keys is None else torch.cat([keys, new.to(keys.device)], dim=1)
            index = torch.arange(query_length, device=new.device).expand_as(new)
            valid = torch.ones_like(new, dtype=torch.bool)
            mask_dtype = torch.bool if attention == "sdpa" else dtype
            return kept_attention_mask(None, index, valid, new, key_slots, mask_dtype)
        batch = max(self._batch, attention_mask.shape[0])
        mask = attention_mask.expand(batch, *attention_mask.shape[1:])
        start = self._tail_start if self._tail else self.logical_length
        tail = mask[..., start:]
        if self._prefix is None or self._prefix.shape[1] == 0:
            return tail
        if self._prefix_index is None:
            self._prefix_index = self._prefix.clamp(min=0)
        prefix = self._prefix_index.to(mask.device)
        cols = torch.gather(mask, 3, prefix[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], -1))
        if self._prefix_ragged:
            bad = (self._prefix < 0).to(mask.device)[:, None, None, :]
            cols = cols & ~bad if cols.dtype == torch.bool else cols.masked_fill(bad, torch.finfo(cols.dtype).min)
        return torch.cat([cols, tail], dim=-1)

    def _drop_outside_window(self) -> None:
        """Sliding layers: forget entries at slots <= logical_length - window (no later query sees them)."""
        if self.sliding_window is None or self.slots is None or self.record_past:
            return
        stale = self.slots <= self.logical_length - self.sliding_window
        if not bool(stale.any()):
            return
        slots = self.slots.masked_fill(stale, -1)
        # entries are stored in slot order per row: drop the leading columns stale in every row
        drop = int((slots < 0).all(0).long().cumprod(0).sum())
        length = self.logical_length
        self.keys, self.values, self.slots = self.keys[..., drop:, :], self.values[..., drop:, :], slots[:, drop:]
        self.logical_length = length
        self.compressed = True

    def skip(self, query_length: int) -> None:
        """Advance the logical length by ``query_length`` tokens of which none was kept (no entry stored)."""
        self._pending = None
        self.slots = self.slots  # materialise the tail: the logical length moves on without entries
        self.logical_length += query_length
        self.compressed = True
        self._drop_outside_window()

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.sliding_window is not None:  # as DynamicSlidingWindowLayer at this logical length
            window, length = self.sliding_window, self.logical_length
            kv_length = (window - 1 if length >= window else length) + query_length
            return kv_length, max(length - window + 1, 0)
        return self.logical_length + query_length, 0

    def physical_length(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def kept_lengths(self) -> torch.Tensor:
        """Valid cached entries per row (padding excluded)."""
        if self.slots is None:
            return torch.zeros(0, dtype=torch.long)
        return (self.slots >= 0).sum(1)

    def reset(self) -> None:
        super().reset()
        self.slots, self.compressed, self._pending = None, False, None
        self._tail_start, self._batch, self._offset = 0, 0, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.slots is not None:
            self.slots = self.slots.index_select(0, beam_idx.to(self.slots.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.slots is not None:
            self.slots = self.slots.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.slots is not None:
            self.slots = self.slots[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("MoDCacheLayer.crop takes a negative number of tokens to remove")
        if (self.sliding_window is not None and not self.record_past and self.logical_length >= self.sliding_window
                and tokens_to_remove < 0):
            raise RuntimeError("crop on a sliding-window MoD cache layer past its window needs activate_past_recording() "
                               "first (entries that become visible again were dropped)")
        if tokens_to_remove < 0 and self.slots is not None:
            new_length = max(self.logical_length + tokens_to_remove, 0)
            slots = self.slots.masked_fill(self.slots >= new_length, -1)
            valid_cols = (slots >= 0).any(0).nonzero()
            keep = int(valid_cols.max()) + 1 if valid_cols.numel() else 0
            self.keys, self.values, self.slots = self.keys[..., :keep, :], self.values[..., :keep, :], slots[:, :keep]
            self.logical_length = new_length
            self.compressed = True
        # a sliding layer recording its past is trimmed back to its window here, as DynamicSlidingWindowLayer
        self.record_past, record_past = False, self.record_past
        self._drop_outside_window()
        self.record_past = record_past


def mod_cache_layer(cache: Cache | None, layer_idx: int) -> MoDCacheLayer | None:
    """The MoD cache layer for ``layer_idx`` in ``cache``, swapping in one where a plain dynamic layer is."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise PmodError(f"MoD layers need a transformers Cache object, got {type(cache).__name__}")
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if replicate is not None:
        while len(layers) <= layer_idx:
            layers.append(replicate())
    current = layers[layer_idx]
    if isinstance(current, MoDCacheLayer):
        return current
    if type(current) not in (DynamicLayer, DynamicSlidingWindowLayer):
        raise PmodError(
            f"MoD layers work with DynamicCache only (layer {layer_idx} has a {type(current).__name__}); "
            "use the default cache (no cache_implementation='static'/'quantized')"
        )
    layers[layer_idx] = MoDCacheLayer.from_dynamic(current)
    return layers[layer_idx]
