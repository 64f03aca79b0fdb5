"""Batch single-sample model inputs of any supported family (processor outputs, dummy inputs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Per-token tensors padded along the sequence; everything else is per image (or per row) and is
# concatenated along dim 0 after zero-padding its other dims (tiles, images) to the largest sample,
# which is how the families' processors pad (LLaVA-NeXT tiles, Idefics3 images per row).
SEQUENCE_PAD = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0, "labels": -100,
                "instruction_mask": 0}
# Batch entries that are training targets / routing hints, not arguments of the model's forward.
NOT_MODEL_INPUTS = ("labels", "instruction_mask")


def collate(samples: Sequence[dict[str, torch.Tensor]], pad_token_id: int, padding_side: str = "left") -> dict:
    """One batch from samples that each hold a single row (``input_ids`` of shape ``[1, n]``)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(s["input_ids"].shape[-1] for s in samples)
    keys = list(dict.fromkeys(k for s in samples for k in s))
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [s[key] for s in samples if key in s]
        if key in SEQUENCE_PAD:
            if len(values) != len(samples):
                raise ValueError(f"every sample needs {key!r}")
            fill = pad_token_id if SEQUENCE_PAD[key] is None else SEQUENCE_PAD[key]
            batch[key] = torch.cat([_pad_sequence(v, length, fill, padding_side) for v in values])
        else:
            dims = max(v.dim() for v in values)
            shape = [max(v.shape[d] for v in values) for d in range(1, dims)]
            batch[key] = torch.cat([_pad_to(v, shape) for v in values])
    return batch


def _pad_sequence(t: torch.Tensor, length: int, fill: int, side: str) -> torch.Tensor:
    missing = length - t.shape[-1]
    pad = (missing, 0) if side == "left" else (0, missing)
    return F.pad(t, pad, value=fill)


def _pad_to(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    pad: list[int] = []
    for d in reversed(range(1, t.dim())):
        pad += [0, shape[d - 1] - t.shape[d]]
    return F.pad(t, pad) if any(pad) else t


def model_inputs(batch: dict) -> dict:
    """The entries of a batch that the model's ``forward`` / ``generate`` takes."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def routed_model_inputs(batch: dict) -> dict:
    """``model_inputs`` for an MoD model's teacher-forced forward: with ``labels`` in the batch, also
    ``pmod_score_query`` (each row's last prompt position, ``mod.context.score_query_positions``), so that the
    answer tokens never choose which vision tokens an attention-scored layer keeps (at inference the prompt
    alone chooses). Do not pass it to a dense model."""
    from ..mod.context import SCORE_QUERY_KWARG, score_query_positions

    inputs = model_inputs(batch)
    if batch.get("labels") is not None:
        inputs[SCORE_QUERY_KWARG] = score_query_positions(batch["labels"])
    return inputs
