"""How many vision tokens each MoD layer kept during a prefill (the engine's ``pmod_last_counts``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from ..api import mod_layers


@dataclass
class LayerRetention:
    layer: int
    ratio: float
    vision_tokens: int  # summed over the rows of the batch
    kept: int

    def to_dict(self) -> dict:
        return {"layer": self.layer, "ratio": self.ratio, "vision_tokens": self.vision_tokens, "kept": self.kept}


class RetentionRecorder:
    """``with RetentionRecorder(model) as rec: model.generate(...)``; then ``rec.results()``.

    Records the first routed call of every MoD layer (the prefill; decode steps route nothing).
    """

    def __init__(self, model: nn.Module):
        self.layers = mod_layers(model)
        self._handles: list = []
        self._records: dict[int, LayerRetention] = {}

    def __enter__(self) -> RetentionRecorder:
        for index, layer in self.layers:
            self._handles.append(layer.register_forward_hook(functools.partial(self._record, index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, index: int, module: nn.Module, args: tuple, output: object) -> None:
        counts = module.pmod_last_counts
        if index in self._records or counts is None:
            return
        targets, kept = counts
        self._records[index] = LayerRetention(index, module.pmod_ratio, int(targets.sum()), int(kept.sum()))

    def results(self) -> list[LayerRetention]:
        return [self._records[i] for i in sorted(self._records)]
