"""The per-layer router and its TanhNorm weighting."""

from __future__ import annotations

import torch
from torch import nn

ROUTER_NAME = "pmod_router"  # child-module name inside a decoder layer; checkpoint keys use it


class TanhNormRouter(nn.Linear):
    """``Linear(hidden, 1)``, zero-initialised, scoring each token; ``w = alpha * tanh(logit) + beta``.

    With zero weights and bias the weight is exactly ``beta`` (1 by default), so a fresh router leaves
    the model's computation unchanged.
    """

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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}"
