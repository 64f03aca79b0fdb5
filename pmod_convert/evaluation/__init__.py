"""``pmod-convert eval``: generate answers for a LLaVA-style question set and score them."""

from .evaluate import EvalSummary, evaluate
from .scoring import choice_letter, is_correct, normalize

__all__ = ["EvalSummary", "evaluate", "choice_letter", "is_correct", "normalize"]
