"""Training losses: answer cross-entropy, distillation from the dense teacher, and the router losses.

* :func:`lm_loss_sum`: next-token cross-entropy on the labelled (answer) tokens.
* :func:`distill_loss_sum`: KL(teacher || student) of next-token distributions at chosen positions
  (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": softened by a temperature T and
  scaled by T^2 so gradients keep their size when T changes).
* :func:`router_rank_loss`: per MoD layer, one minus the correlation of the router logits with the dense
  teacher's log text-to-vision attention over the row's vision tokens: a ranking signal that reaches every
  router, including the last MoD layer's, whose TanhNorm weights no later layer reads.
* :func:`router_aux_loss`: gamma-MoD's BCE of the router logits against the layer's own top-k selection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data import IGNORE
from ..errors import UnsupportedArchitecture
from .routing import RouterRecord


def logit_positions(labels: torch.Tensor, distill: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[batch, seq]``: the positions whose logits a training step reads, for the model's
    ``logits_to_keep`` (transformers' ``slice_logits_to_keep``: a boolean mask flattens the logits to
    ``[positions, vocab]`` in row-major order).

    The positions that predict a labelled token (``labels[:, 1:]``), plus ``distill`` (bool ``[batch, seq - 1]``,
    :func:`distill_positions`) when given; the last position predicts nothing and is never kept. Passing it
    spares the ``lm_head`` projection of every prompt and vision position: ``seq x hidden x vocab`` multiply-adds
    per row forward and again backward: about a quarter of a Qwen2-0.5B forward at 729 + 64 tokens
    (vocabulary 151,936: 216 of about 840 GFLOPs).
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    if distill is not None:
        keep[:, :-1] |= distill
    return keep


def check_kept_logits(logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``logits``, after checking that the model sliced them by the boolean ``logits_to_keep`` mask ``kept``
    (``[batch, seq]``): ``[kept positions, vocab]``.

    Raises ``UnsupportedArchitecture`` (one line) when the forward ignored the mask (a 3-D result, or another
    number of rows): transformers >= 5.21 slices by it in every supported family.
    """
    n = int(kept.sum())
    if logits.dim() != 2 or logits.shape[0] != n:
        raise UnsupportedArchitecture(
            f"the model returned logits of shape {tuple(logits.shape)} for a logits_to_keep mask of {n} positions, "
            "not [positions, vocab]: its forward does not slice by a boolean mask (transformers >= 5.21 does, for "
            "every supported family); upgrade transformers")
    return logits


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                kept: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and how many there are.

    logits: ``[batch, seq, vocab]``, or with ``kept`` (bool ``[batch, seq]``, :func:`logit_positions`) the
    ``[kept positions, vocab]`` rows the model computed for it. labels: ``[batch, seq]`` (``IGNORE`` where
    unlabelled).

    Summing (instead of averaging per micro-batch) lets the loop divide by the label tokens of the whole
    accumulation window on every process, so each answer token weighs the same whatever batch it is in.
    Only the labelled positions are gathered before the float32 cast, so the full-vocabulary logits are
    never copied for prompt and vision tokens.
    """
    targets = labels[:, 1:]
    if kept is not None:
        check_kept_logits(logits, kept)
        targets = targets[kept[:, :-1]]
        chosen = targets != IGNORE
        rows = logits
    else:
        chosen = targets != IGNORE
        rows = logits[:, :-1]
    count = int(chosen.sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    picked = rows[chosen].float()
    return F.cross_entropy(picked, targets[chosen], reduction="sum"), count


def distill_positions(labels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      vision_ids: Sequence[int], which: str = "answer") -> torch.Tensor:
    """Bool mask ``[batch, seq - 1]`` of the logit positions the distillation loss reads.

    ``answer``: positions that predict a labelled token (as :func:`lm_loss_sum`). ``text``: every real text
    position after the row's first vision token (the only positions routing can change), labelled or not.
    """
    answer = labels[:, 1:] != IGNORE
    if which == "answer":
        return answer
    vision = torch.isin(input_ids, torch.tensor(list(vision_ids), device=input_ids.device))
    seen_image = vision.long().cumsum(1) > 0
    text = seen_image & ~vision & attention_mask.bool()
    return text[:, :-1] | answer


def distill_loss_sum(student: torch.Tensor, teacher: torch.Tensor, positions: torch.Tensor,
                     temperature: float = 1.0, kept: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over ``positions``, and their count.

    student: ``[batch, seq, vocab]`` logits (attached to the graph), or with ``kept`` (bool ``[batch, seq]``,
    :func:`logit_positions`, a superset of ``positions``) the ``[kept positions, vocab]`` rows the model computed
    for it; teacher: ``[batch, seq, vocab]``, or already gathered ``[n, vocab]`` at ``positions`` (no gradient).
    positions: bool ``[batch, seq - 1]`` over the logits that predict the next token (``logits[:, :-1]``).
    Computed in float32 on the chosen rows only.
    """
    count = int(positions.sum())
    if count == 0:
        return student.sum() * 0.0, 0
    if kept is not None:
        check_kept_logits(student, kept)
        if bool((positions & ~kept[:, :-1]).any()):
            raise ValueError("distill_loss_sum: positions outside the kept logits (kept must include them)")
        s = student[positions[kept[:, :-1]]].float() / temperature
    else:
        s = student[:, :-1][positions].float() / temperature
    t = teacher if teacher.dim() == 2 else teacher[:, :-1][positions]
    t = t.float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return kl * temperature**2, count


def router_rank_loss(records: Sequence[RouterRecord], attention: dict[int, torch.Tensor],
                     vision: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Summed ``1 - corr(router_logits, log teacher attention)`` over MoD layers and rows, and the number of
    (layer, row) terms.

    ``attention[layer]``: ``[batch, seq]`` attention the dense teacher's text queries after the image pay to
    each key (mean over heads and queries, from :class:`~pmod_convert.training.distill.Teacher`).
    ``vision``: bool ``[batch, seq]`` vision tokens; the Pearson correlation runs over the row's routed vision
    tokens, and rows with fewer than two have no term. The loss is 0 when the router orders the tokens as
    the log attention does (linearly), 1 when uncorrelated (a zero router), 2 when reversed; the router's
    logit spread has a floor of 0.01 (std) so a zero router gets a finite gradient.

    Why a correlation: it is the objective of the calibration warm start (a least-squares fit of the router
    to the standardised log attention, ``calibration/warm_start.py``) and it is scale-invariant, so it moves
    the ORDER of the logits (which tokens top-k keeps) without pushing their scale, which the TanhNorm weights
    ``alpha * tanh(logit) + beta`` turn into output changes (a softmax-matching loss grows the logits until
    the weights saturate). Summing (the loop divides by the terms of the whole window on all processes)
    weighs every row alike whatever micro-batch it is in.
    """
    total, count = None, 0
    for rec in records:
        received = attention.get(rec.layer)
        if received is None or received.shape != rec.logits.shape:
            continue
        targets = rec.targets & vision.to(rec.targets.device)
        rows = targets.sum(1) >= 2
        if not bool(rows.any()):
            continue
        mask = targets[rows].float()
        n = mask.sum(1, keepdim=True)
        x = rec.logits[rows].float()
        y = torch.log(received[rows].float().to(x.device).clamp_min(1e-12))

        def centred(v: torch.Tensor) -> torch.Tensor:
            return (v - (v * mask).sum(1, keepdim=True) / n) * mask

        xc, yc = centred(x), centred(y)
        # A floor of logit std 0.01 on the router's spread keeps the gradient finite at a zero (all-tied) router.
        spread = (xc.pow(2).sum(1) + n.squeeze(1) * 1e-4).sqrt()
        corr = (xc * yc).sum(1) / (spread * yc.pow(2).sum(1).sqrt() + 1e-12)
        part = (1.0 - corr).sum()
        total = part if total is None else total + part
        count += int(rows.sum())
    return total, count


def rank_terms(input_ids: torch.Tensor, vision_ids: Sequence[int], mod_layers: int) -> int:
    """How many (layer, row) terms :func:`router_rank_loss` will have for a batch: rows with at least two
    vision tokens, times the MoD layers (known before the forward, for the window's normaliser)."""
    vision = torch.isin(input_ids, torch.tensor(list(vision_ids), device=input_ids.device))
    return int((vision.sum(1) >= 2).sum()) * mod_layers


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
