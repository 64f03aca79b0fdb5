"""Choosing the device a command runs on, and moving batches there."""

from __future__ import annotations

from typing import Any

import torch

from .errors import RecipeError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``/``cuda``/``cuda:N`` (default: cuda when available, else cpu), checked before anything loads."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise RecipeError(f"unknown device {device!r}; use cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("CUDA is not available in this torch build or machine; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise RecipeError(f"device {resolved.type!r} is not supported; use cpu or cuda")
    return resolved


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Every tensor of a batch on ``device`` (other entries unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
