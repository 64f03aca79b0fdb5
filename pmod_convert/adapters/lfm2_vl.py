"""LFM2-VL (``lfm2_vl``): refused. Its LFM2 decoder is not attention-only: most layers are gated short-convolution
blocks (``layer_types`` "conv") between a few attention layers. An MoD layer removes skipped tokens from the
sequence a layer sees; a causal convolution over the shortened sequence mixes tokens that were not neighbours, and
its cache (the last few inputs) no longer matches the dense model's, so neither the ratio-1.0 identity nor cached
decoding could be kept. Routing only the attention layers would leave most of the compute dense."""

from __future__ import annotations

from .base import refuse

REASON = ("LFM2-VL (model_type 'lfm2_vl') is not supported: its LFM2 decoder interleaves short-convolution blocks "
          "with attention layers, and MoD routing needs attention-only decoder layers (a convolution over the kept "
          "tokens would mix tokens that are not neighbours)")

refuse("lfm2_vl", REASON)
refuse("lfm2", REASON.replace("LFM2-VL (model_type 'lfm2_vl')", "LFM2 (model_type 'lfm2')"))
