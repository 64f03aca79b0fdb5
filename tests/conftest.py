import copy

import pytest
import torch

from pmod_convert.adapters import adapter_by_family, all_adapters
from pmod_convert.tiny import build_tiny_model

FAMILIES = [a.family for a in all_adapters()]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


_MODEL_CACHE: dict = {}


def tiny_model(family: str, attn: str = "sdpa", **overrides):
    """A fresh copy of a cached tiny dense model (building is the slow part)."""
    key = (family, attn, tuple(sorted(overrides.items())))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = build_tiny_model(family, attn_implementation=attn, **overrides)
    model, config = _MODEL_CACHE[key]
    return copy.deepcopy(model), config


def batch_inputs(family: str, config, batch_size: int = 2, seed: int = 0):
    """Left-padded batch whose rows differ in text length and, where the family allows, in vision tokens."""
    adapter = adapter_by_family(family)
    extra = VARIED.get(family, {}) if batch_size == 2 else {}
    return adapter.dummy_inputs(config, batch_size=batch_size, seed=seed, **extra)


# Per-family arguments that make rows of a 2-row batch differ in their number of vision tokens.
VARIED: dict = {"llava": {"images_per_row": [1, 2]}}


# Two single-row samples per family that differ in text length and in their number of vision tokens.
ROWS: dict = {
    "llava": [dict(images_per_row=[1], text_lengths=[12]), dict(images_per_row=[2], text_lengths=[5])],
    "llava_next": [dict(image_sizes=[(32, 32)], text_lengths=[12]), dict(image_sizes=[(64, 64)], text_lengths=[5])],
    "llava_onevision": [dict(image_sizes=[(32, 32)], text_lengths=[12]), dict(image_sizes=[(64, 64)], text_lengths=[5])],
    "qwen2_vl": [dict(image_sizes=[(64, 64)], text_lengths=[12]), dict(image_sizes=[(96, 96)], text_lengths=[5])],
    "qwen2_5_vl": [dict(image_sizes=[(64, 64)], text_lengths=[12]), dict(image_sizes=[(96, 96)], text_lengths=[5])],
    "idefics3": [dict(image_sizes=[(32, 32)], text_lengths=[12]), dict(image_sizes=[(64, 64)], text_lengths=[5])],
    "smolvlm": [dict(image_sizes=[(32, 32)], text_lengths=[12]), dict(image_sizes=[(64, 64)], text_lengths=[5])],
}


def single_rows(family: str, config):
    adapter = adapter_by_family(family)
    return [adapter.dummy_inputs(config, batch_size=1, seed=i, **kw) for i, kw in enumerate(ROWS[family])]
