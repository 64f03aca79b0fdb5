"""Datasets and batches: LLaVA-style conversations -> the checkpoint's processor -> padded batches."""

from ..errors import DataError
from .collate import collate, model_inputs, routed_model_inputs
from .conversations import Dataset, Sample, read_samples
from .encode import IGNORE, SampleEncoder

__all__ = ["DataError", "Dataset", "IGNORE", "Sample", "SampleEncoder", "collate", "model_inputs", "read_samples",
           "routed_model_inputs"]
