"""The per-layer router and its TanhNorm weighting."""

from __future__ import annotations

import torch
from torch import nn

ROUTER_NAME = "pmod_router"  # child-module name inside a decoder layer; checkpoint keys use it


class TanhNormRouter(nn.Linear):
    """``Linear(hidden, 1)``, zero-initialised, scoring each token; ``w = alpha * tanh(logit) + beta``.

    ``scorer`` (stored per layer in ``config.json`` ``pmod.scorer``): ``"router"`` ranks by these logits (plus
    the position prior); ``"attention"`` ranks by the attention the layer's own text queries give each vision
    token (:func:`pmod_convert.mod.scoring.own_attention_scores`), chosen by calibration where a linear router
    cannot rank well enough. The TanhNorm weights always come from the logits (1 for a zero router).

    With zero weights and bias the weight is exactly ``beta`` (1 by default), so a fresh router leaves
    the model's computation unchanged.

    ``position_prior`` (a float, not a parameter; stored per layer in ``config.json`` ``pmod.position_prior``)
    adds ``prior * u`` to the logits for *selection only*, where ``u`` in [0, 1] is a vision token's place
    among its sample's vision tokens (0 = first, 1 = last): with a zero router, ``prior > 0`` keeps the last
    ``k`` vision tokens, 0 the first ``k`` (stable sort). Calibration chooses it per layer by measured
    agreement with the dense model (under causal attention the last vision tokens have read the whole
    image; on some models keeping them loses far less than keeping the first ones). It never changes the
    TanhNorm weights, so the model's outputs at ratio 1.0 are unchanged.
    """

    position_prior: float = 0.0
    scorer: str = "router"  # "attention": top-k ranks by the layer's own text->vision attention (mod.scoring)

    def __init__(self, hidden_size: int, *, alpha: float = 0.2, beta: float = 1.0, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(hidden_size, 1, bias=bias, dtype=dtype, device=device)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.reset_parameters()

    def reset_parameters(self) -> None:  # zero init (nn.Linear's default would be random)
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logits ``[batch, seq]`` in float32 (selection is made on these)."""
        return super().forward(hidden_states).squeeze(-1).float()

    def token_weights(self, logits: torch.Tensor) -> torch.Tensor:
        return self.alpha * torch.tanh(logits) + self.beta

    def selection_scores(self, logits: torch.Tensor, targets: torch.Tensor,
                         segments: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[batch, seq]`` that top-k selection ranks: ``logits + position_prior * u``.

        ``targets`` ``[batch, seq]`` bool (the routed vision tokens); ``segments`` ``[batch, seq]`` long (sample
        index of packed rows, see ``select_tokens``) or None. ``u`` is the target's index among its sample's
        targets divided by ``(count - 1)``, so left padding and packing leave it unchanged.
        """
        if not self.position_prior:
            return logits
        return logits + self.position_prior * relative_positions(targets, segments).to(logits.dtype)

    def extra_repr(self) -> str:
        text = f"{nn.Linear.extra_repr(self)}, alpha={self.alpha}, beta={self.beta}"
        text += f", position_prior={self.position_prior}" if self.position_prior else ""
        return text + (f", scorer={self.scorer}" if self.scorer != "router" else "")


def relative_positions(targets: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """``u`` ``[batch, seq]`` float32: each target's index among its sample's targets over ``count - 1``
    (0 for the first, 1 for the last, 0 for a lone target and for non-targets).

    ``targets`` ``[batch, seq]`` bool; ``segments`` ``[batch, seq]`` long, non-decreasing per row (packed
    samples), or None (one sample per row).
    """
    t = targets.long()
    if segments is None:
        index = t.cumsum(1) - 1
        count = t.sum(1, keepdim=True)
    else:
        segments = segments.long()
        n_seg = int(segments.max()) + 1 if segments.numel() else 1
        per_seg = torch.zeros(t.shape[0], n_seg, dtype=torch.long, device=t.device).scatter_add_(1, segments, t)
        before = per_seg.cumsum(1) - per_seg  # targets in earlier samples of the row
        index = t.cumsum(1) - 1 - before.gather(1, segments)
        count = per_seg.gather(1, segments)
    u = index.float() / (count - 1).clamp_min(1).float()
    return torch.where(targets, u, torch.zeros_like(u))


def position_priors(layers) -> list[float | None]:
    """Per-layer ``position_prior`` of the routers of ``layers`` (None for a layer without a router), the
    ``config.json`` ``pmod.position_prior`` list."""
    out = []
    for layer in layers:
        router = getattr(layer, ROUTER_NAME, None)
        out.append(None if router is None else float(router.position_prior))
    return out


def set_position_priors(layers, priors) -> None:
    """Set ``position_prior`` of every MoD layer's router from a per-layer list (None / absent = 0).

    Raises ``ValueError`` when ``priors`` does not have one entry per layer.
    """
    priors = list(priors) if priors is not None else [None] * len(layers)
    if len(priors) != len(layers):
        raise ValueError(f"position_prior has {len(priors)} entries for {len(layers)} decoder layers")
    for layer, prior in zip(layers, priors):
        router = getattr(layer, ROUTER_NAME, None)
        if router is not None:
            router.position_prior = float(prior or 0.0)



def layer_scorers(layers) -> list[str | None]:
    """Per-layer ``scorer`` of the routers of ``layers`` (None for a layer without a router), the
    ``config.json`` ``pmod.scorer`` list."""
    return [None if getattr(layer, ROUTER_NAME, None) is None else getattr(layer, ROUTER_NAME).scorer
            for layer in layers]


def set_layer_scorers(layers, scorers, *, norm_name: str = "input_layernorm", rope=None) -> None:
    """Set every MoD layer's ``scorer`` from a per-layer list (None / absent = ``"router"``).

    ``norm_name``: the decoder layer's pre-attention norm (the adapter's ``input_norm``); ``rope``: a callable
    ``layer -> bool`` telling whether the layer's attention applies rotary embeddings (the adapter's
    ``attention_rope``), required when a layer gets ``"attention"`` (``pmod_convert.set_scorers`` passes both
    from the model's adapter). Every entry is checked before any layer changes. Raises ``PmodError`` (and
    changes nothing) for anything but a list with one entry per layer, an unknown scorer, a scorer on a dense
    layer, or ``"attention"`` on a layer whose attention the scorer cannot reproduce
    (:func:`pmod_convert.mod.scoring.attention_scorer_problem`).
    """
    from ..errors import PmodError
    from .scoring import SCORERS, attention_scorer_problem

    if scorers is not None and (isinstance(scorers, (str, bytes, dict, set, frozenset))
                                or not hasattr(scorers, "__iter__")):
        raise PmodError(f"scorers must be a sequence with one entry per decoder layer (or None), got "
                        f"{type(scorers).__name__} {str(scorers)[:40]}")
    scorers = list(scorers) if scorers is not None else [None] * len(layers)
    if len(scorers) != len(layers):
        raise PmodError(f"scorers has {len(scorers)} entry(ies) for {len(layers)} decoder layers; give one per layer")
    plan = []  # every entry is checked before any layer changes: a bad entry leaves the model as it was
    for index, (layer, scorer) in enumerate(zip(layers, scorers)):
        router = getattr(layer, ROUTER_NAME, None)
        if router is None:
            if scorer not in (None, "router"):
                raise PmodError(f"layer {index} is a dense layer (it routes nothing); its scorer must be None, got "
                                f"{scorer!r}")
            continue
        scorer = scorer or "router"
        if not isinstance(scorer, str) or scorer not in SCORERS:
            raise PmodError(f"layer {index}: unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
        if scorer == "attention":
            if rope is None:
                raise PmodError("set_layer_scorers needs rope= (the adapter's attention_rope) for the attention "
                                "scorer; use pmod_convert.set_scorers(model, scorers)")
            problem = attention_scorer_problem(layer, norm_name)
            if problem is not None:
                raise PmodError(f"layer {index} cannot rank vision tokens by its own attention: {problem}")
        plan.append((layer, router, scorer, bool(rope(layer)) if scorer == "attention" else None))
    for layer, router, scorer, uses_rope in plan:
        if scorer == "attention":
            layer.pmod_input_norm = norm_name
            layer.pmod_scorer_rope = uses_rope
        router.scorer = scorer
