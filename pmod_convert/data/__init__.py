"""Turning samples into model batches."""

from .collate import collate

__all__ = ["collate"]
