"""Per-layer redundancy signals of a dense model on calibration samples, gathered by forward hooks.

For every decoder layer and sample (batch of one):

- ARank (gamma-MoD): the numerical rank of each head's attention map, averaged over heads and samples.
  The map is the softmax attention over the whole prompt; for long prompts a fixed, evenly spaced subset
  of query rows is used (``rank_rows``), and ranks are also reported as a fraction of the rows used, so
  samples of different lengths average sensibly. Singular values above ``rank_rtol * largest`` count.
  Low ARank: many tokens attend alike, i.e. the layer's tokens are redundant.
- vision cosine: mean cosine similarity of each vision token's hidden state before and after the layer;
  near 1 means the layer hardly changes vision tokens (skipping them costs little).
- text-to-vision attention: the attention mass that text queries after the first vision token put on
  vision keys, averaged over heads and queries; low means text barely reads the vision tokens here.

The attention weights come from the attention modules' own return value ``(output, weights)``, which
transformers 5.x fills only with the eager implementation: load the model with
``attn_implementation="eager"``. Weights are reduced inside the hook and never kept, so memory stays at
one layer's attention map. Per-token signals for router warm start are handed to an optional ``sink``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import get_adapter
from ..errors import PmodError

TokenSink = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], None]
# sink(layer, vision_inputs [n_v, hidden], signals): per vision token [n_v] signals of the dense layer:
#   "text_attention": attention received from the text queries after the image (mean over heads, queries)
#   "key_attention":  attention received from every query that can see the token (column sum, head mean)
#   "update":         |output - input| / |input| of the token


@dataclass
class LayerMetrics:
    layer: int
    arank: float  # mean numerical rank of the heads' attention maps (rows used: see arank_fraction)
    arank_fraction: float  # the same rank divided by the number of query rows it was computed on
    vision_cosine: float | None  # mean cos(input, output) over vision tokens; None without vision tokens
    text_to_vision: float | None  # mean attention mass text queries put on vision keys
    samples: int


def numerical_rank(maps: torch.Tensor, rtol: float) -> torch.Tensor:
    """Rank of each matrix in ``maps`` [..., m, n]: singular values above ``rtol`` times the largest."""
    values = torch.linalg.svdvals(maps.double())
    return (values > rtol * values[..., :1]).sum(-1)


def rank_rows(length: int, limit: int) -> torch.Tensor:
    """Evenly spaced query rows (all rows when the prompt is short enough); always includes the last."""
    if length <= limit:
        return torch.arange(length)
    return torch.linspace(0, length - 1, limit).round().long().unique()


class _Sums:
    def __init__(self) -> None:
        self.rank = self.fraction = 0.0
        self.samples = 0
        self.cosine = self.attention = 0.0
        self.vision_samples = 0


class LayerObserver:
    """Hooks on every decoder layer and its attention module; ``observe(inputs)`` runs one sample."""

    def __init__(self, model: nn.Module, *, rank_rows: int = 64, rank_rtol: float = 1e-3,
                 sink: TokenSink | None = None, sink_layers: set[int] | None = None,
                 layers: set[int] | None = None):
        self.model = model
        self.adapter = get_adapter(model)
        self.layers = self.adapter.decoder_layers(model)
        self.vision_ids = self.adapter.vision_token_ids(model.config)
        self.rank_limit = int(rank_rows)
        self.rank_rtol = float(rank_rtol)
        self.sink = sink
        self.sink_layers = set(range(len(self.layers))) if sink_layers is None else set(sink_layers)
        # Layers to hook (all by default); an MoD layer must not be hooked unless it keeps every token.
        self.hooked = set(range(len(self.layers))) if layers is None else set(layers)
        self.sums = [_Sums() for _ in self.layers]
        self._handles: list = []
        self._vision: torch.Tensor | None = None  # [seq] bool, for the current sample
        self._queries: torch.Tensor | None = None  # [seq] bool: text queries after the first vision token
        self._inputs: dict[int, torch.Tensor] = {}
        self._received: dict[int, dict[str, torch.Tensor]] = {}

    # ---- hooks ------------------------------------------------------------------------------------
    def __enter__(self) -> LayerObserver:
        for index, layer in enumerate(self.layers):
            if index not in self.hooked:
                continue
            self._handles.append(layer.register_forward_pre_hook(self._layer_input(index), with_kwargs=True))
            self._handles.append(layer.self_attn.register_forward_hook(self._attention(index)))
            self._handles.append(layer.register_forward_hook(self._layer_output(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_input(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._inputs[index] = hidden.detach()
        return hook

    def _attention(self, index: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise PmodError("the attention modules return no attention weights; load the model with "
                                "attn_implementation='eager' for calibration")
            self._reduce_attention(index, weights[0].detach().float())  # [heads, q, k], batch of one
        return hook

    def _layer_output(self, index: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self._reduce_hidden(index, self._inputs.pop(index)[0], out.detach()[0])
        return hook

    # ---- reductions ---------------------------------------------------------------------------------
    def _reduce_attention(self, index: int, weights: torch.Tensor) -> None:
        sums = self.sums[index]
        n = weights.shape[-1]
        rows = rank_rows(n, self.rank_limit).to(weights.device)
        ranks = numerical_rank(weights[:, rows, :], self.rank_rtol).double()
        sums.rank += float(ranks.mean())
        sums.fraction += float(ranks.mean()) / len(rows)
        sums.samples += 1
        vision, queries = self._vision, self._queries
        if vision is None or not bool(vision.any()) or queries is None or not bool(queries.any()):
            return
        from_text = weights[:, queries, :][..., vision]  # [heads, n_queries, n_vision]
        sums.attention += float(from_text.sum(-1).mean())
        self._received[index] = {"text_attention": from_text.mean(dim=(0, 1)),
                                 "text_log_attention": from_text.clamp_min(1e-30).log().mean(dim=(0, 1)),
                                 "key_attention": weights[..., vision].sum(1).mean(0)}

    def _reduce_hidden(self, index: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        vision = self._vision
        received = self._received.pop(index, None)
        if vision is None or not bool(vision.any()):
            return
        x, y = inputs[vision].float(), outputs[vision].float()
        sums = self.sums[index]
        sums.cosine += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())
        sums.vision_samples += 1
        if self.sink is not None and index in self.sink_layers and received is not None:
            received["update"] = (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)
            self.sink(index, inputs[vision], received)

    # ---- running ------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, inputs: dict[str, torch.Tensor]) -> None:
        """One forward pass of a single-sample batch (``input_ids`` [1, seq], the family's pixel inputs)."""
        ids = inputs["input_ids"]
        if ids.shape[0] != 1:
            raise PmodError("LayerObserver.observe takes one sample at a time")
        self._vision, self._queries = vision_and_queries(ids[0], self.vision_ids, inputs.get("attention_mask"))
        try:
            self.model(**inputs, use_cache=False)
        finally:
            self._vision = self._queries = None
            self._inputs.clear()
            self._received.clear()

    def metrics(self) -> list[LayerMetrics]:
        out = []
        for index, s in enumerate(self.sums):
            n, nv = max(s.samples, 1), s.vision_samples
            out.append(LayerMetrics(
                layer=index, arank=s.rank / n, arank_fraction=s.fraction / n,
                vision_cosine=s.cosine / nv if nv else None,
                text_to_vision=s.attention / nv if nv else None, samples=s.samples))
        return out


def vision_and_queries(ids: torch.Tensor, vision_ids: list[int],
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision positions of one row, and the text positions after its first vision token (the queries
    whose view of the image routing changes)."""
    vision = torch.isin(ids, torch.tensor(vision_ids, device=ids.device))
    valid = torch.ones_like(vision) if attention_mask is None else attention_mask[0].bool()
    vision = vision & valid
    if not bool(vision.any()):
        return vision, torch.zeros_like(vision)
    first = int(vision.nonzero()[0, 0])
    after = torch.arange(ids.shape[0], device=ids.device) > first
    return vision, after & ~vision & valid
