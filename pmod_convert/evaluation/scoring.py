"""Answer scoring: exact match after normalisation, and multiple-choice letter match."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LETTER_REFERENCE = re.compile(r"^\(?([A-H])[).:]?$")  # upper case only: "a" is a word, not option A
# A letter the model chose: at the very start ("B", "B.", "(B) red") or after "answer is"/"answer:".
_LETTER_PREDICTION = (re.compile(r"^\(?([A-H])(?:[).:]|$)"), re.compile(r"answer(?: is)?:?\s*\(?([A-H])\b", re.I))


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def choice_letter(reference: str) -> str | None:
    """The option letter if ``reference`` is a multiple-choice answer ("B", "(B)", "B."), else None."""
    match = _LETTER_REFERENCE.match(reference.strip())
    return match.group(1).upper() if match else None


def predicted_letter(prediction: str) -> str | None:
    text = prediction.strip()
    for pattern in _LETTER_PREDICTION:
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return None


def is_correct(prediction: str, reference: str) -> tuple[bool, str]:
    """``(correct, kind)`` with kind ``"choice"`` (letter match) or ``"exact"`` (normalised exact match)."""
    letter = choice_letter(reference)
    if letter is not None:
        return predicted_letter(prediction) == letter, "choice"
    return normalize(prediction) == normalize(reference), "exact"
