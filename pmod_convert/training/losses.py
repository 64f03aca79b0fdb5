"""Training losses: next-token cross-entropy on answer tokens, and the gamma-MoD router auxiliary loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data import IGNORE
from .routing import RouterRecord


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and how many there are.

    Summing (instead of averaging per micro-batch) lets the loop divide by the label tokens of the whole
    accumulation window on every process, so each answer token weighs the same whatever batch it is in.
    Only the labelled positions are gathered before the float32 cast, so the full-vocabulary logits are
    never copied for prompt and vision tokens.
    """
    targets = labels[:, 1:]
    chosen = targets != IGNORE
    count = int(chosen.sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    picked = logits[:, :-1][chosen].float()
    return F.cross_entropy(picked, targets[chosen], reduction="sum"), count


def router_aux_loss(records: Sequence[RouterRecord], attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """gamma-MoD router loss: binary cross-entropy of router logits against the layer's own top-k selection.

    Averaged over the routed (target) tokens of each MoD layer, then over the layers that routed anything.
    ``None`` when no layer routed a token in this forward (e.g. a text-only batch).
    """
    losses = []
    for rec in records:
        targets = rec.targets
        if attention_mask is not None:
            targets = targets & attention_mask.to(targets.device).bool()
        if not bool(targets.any()):
            continue
        logits = rec.logits[targets]
        losses.append(F.binary_cross_entropy_with_logits(logits, rec.keep[targets].to(logits.dtype)))
    if not losses:
        return None
    return torch.stack(losses).mean()
