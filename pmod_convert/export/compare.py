"""How far an exported model's logits are from the unquantized MoD model on the same inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import ArchitectureAdapter
from ..devices import to_device
from ..errors import RecipeError

Batch = Mapping[str, torch.Tensor]


def check_batches(check_inputs: Batch | Sequence[Batch] | None, adapter: ArchitectureAdapter, config: Any) -> list[dict]:
    """The inputs logits are compared on: given ones, else two dummy batches of the family."""
    if check_inputs is None:
        return [adapter.dummy_inputs(config, batch_size=2, seed=0), adapter.dummy_inputs(config, batch_size=1, seed=1)]
    batches = [check_inputs] if isinstance(check_inputs, Mapping) else list(check_inputs)
    if not batches:
        raise RecipeError("check_inputs is empty; pass model input dicts or None for the family's dummy inputs")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
            raise RecipeError(f"check_inputs[{i}] must be a dict of model inputs with an input_ids tensor")
    return [{k: v for k, v in b.items() if k not in ("labels", "instruction_mask")} for b in batches]


@torch.no_grad()
def model_logits(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """Float32 CPU logits ``[tokens, vocab]`` of every attended position of every batch."""
    device = next(p.device for p in model.parameters())
    out = []
    for batch in batches:
        moved = to_device(batch, device)
        logits = model(**moved).logits.float().cpu()
        mask = batch.get("attention_mask")
        keep = mask.bool() if mask is not None else torch.ones(logits.shape[:2], dtype=torch.bool)
        out.append(logits[keep])
    return out


def text_positions(batches: list[dict], vision_ids: list[int]) -> list[torch.Tensor]:
    """Per batch, aligned with ``model_logits``: True where the attended token is not a vision token."""
    out = []
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        keep = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        out.append(~torch.isin(ids, torch.tensor(vision_ids, dtype=ids.dtype))[keep])
    return out


@dataclass
class LogitDeviation:
    inputs: int
    positions: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    per_position_max: torch.Tensor  # [positions] max |diff| over the vocabulary (for the histogram)
    text: dict | None = None  # the same figures over text positions only

    def to_dict(self) -> dict:
        out = {"inputs": self.inputs, "positions": self.positions, "max_abs_diff": self.max_abs_diff,
               "mean_abs_diff": self.mean_abs_diff, "top1_agreement": self.top1_agreement}
        if self.text is not None:
            out["text_positions"] = self.text
        return out


def _figures(ref: torch.Tensor, new: torch.Tensor) -> dict:
    if ref.shape[0] == 0:
        return {"positions": 0, "max_abs_diff": 0.0, "mean_abs_diff": 0.0, "top1_agreement": 1.0}
    diff = (new - ref).abs()
    return {"positions": ref.shape[0], "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "top1_agreement": float((ref.argmax(-1) == new.argmax(-1)).float().mean())}


def logit_deviation(reference: list[torch.Tensor], candidate: list[torch.Tensor],
                    text: list[torch.Tensor] | None = None) -> LogitDeviation:
    """Deviation over all attended positions; with ``text`` masks, also over text positions alone.

    Vision positions can deviate much more than text ones: a perturbed router may keep a different
    top-k, and a token that is skipped instead of processed (or the reverse) changes a lot.
    """
    ref, new = torch.cat(reference), torch.cat(candidate)
    if ref.shape != new.shape:
        raise RuntimeError(f"logit shapes differ: reference {tuple(ref.shape)}, exported {tuple(new.shape)}")
    figures = _figures(ref, new)
    text_mask = torch.cat(text) if text is not None else None
    return LogitDeviation(
        inputs=len(reference),
        positions=figures["positions"],
        max_abs_diff=figures["max_abs_diff"],
        mean_abs_diff=figures["mean_abs_diff"],
        top1_agreement=figures["top1_agreement"],
        per_position_max=(new - ref).abs().max(-1).values,
        text=_figures(ref[text_mask], new[text_mask]) if text_mask is not None else None,
    )
