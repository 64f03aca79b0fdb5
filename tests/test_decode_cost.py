"""What an MoD model dispatches, counted (not timed): a decode step costs what the dense step costs, and an
unpadded prompt reaches sdpa without a mask. Timing lives in benchmarks/perf.py."""

import collections
import copy

import pytest
import torch
from conftest import constant, randomize_routers, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from pmod_convert import add_routers
from pmod_convert.bench import build_prompts

# Ops a routed layer needs and a layer that keeps every token must not run.
ROUTING_OPS = {"gather", "scatter", "scatter_", "sort", "argsort", "index_select", "masked_fill", "masked_fill_"}
# The routing hook's own work once per forward (target mask and its count), whatever the number of layers.
PER_FORWARD_OPS = 12


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name; records the mask argument of every sdpa kernel call."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.sdpa_masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if "scaled_dot_product" in name:
            self.sdpa_masks.append(kwargs.get("attn_mask"))
        return func(*args, **kwargs)


def unpadded(family, config, batch_size=2):
    inputs, _ = build_prompts(config, batch_size=batch_size, vision_tokens=16, text_tokens=8)  # same-length rows
    assert bool(inputs["attention_mask"].bool().all()), "rows must be unpadded"
    return inputs


def generate_ops(model, inputs, steps):
    counter = OpCounter()
    with torch.no_grad(), counter:
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return counter


def pair(family, ratio=0.5):
    dense, config = tiny_model(family)
    mod = add_routers(copy.deepcopy(dense), constant(ratio))  # every layer routed
    randomize_routers(mod)
    return dense, mod, config


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_decode_step_dispatches_what_the_dense_step_dispatches(family):
    dense, mod, config = pair(family)
    inputs = unpadded(family, config)
    short, long = 2, 6
    per_step = {}
    for name, model in (("dense", dense), ("mod", mod)):
        a, b = generate_ops(model, inputs, short), generate_ops(model, inputs, long)
        per_step[name] = {op: (b.ops[op] - a.ops[op]) / (long - short) for op in set(a.ops) | set(b.ops)}
    extra = {op: per_step["mod"].get(op, 0) - per_step["dense"].get(op, 0) for op in per_step["mod"]}
    extra = {op: n for op, n in extra.items() if n}
    assert not ROUTING_OPS & set(extra), f"a decode step runs routing ops: {extra}"
    n_layers = config.get_text_config(decoder=True).num_hidden_layers
    assert sum(extra.values()) <= PER_FORWARD_OPS < 4 * n_layers, f"extra ops per decode step: {extra}"
    # the routed prefill did compress the cache (the step above is the compressed-cache path)
    with torch.no_grad():
        out = mod(**inputs, use_cache=True)
    assert all(layer.compressed for layer in out.past_key_values.layers)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_unpadded_prompt_reaches_sdpa_without_a_mask_and_equals_eager(family):
    _, mod, config = pair(family)
    inputs = unpadded(family, config)
    counter = OpCounter()
    with torch.no_grad(), counter:
        sdpa_logits = mod(**inputs).logits
    assert counter.sdpa_masks and all(mask is None for mask in counter.sdpa_masks)
    eager = copy.deepcopy(mod)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        eager_logits = eager(**inputs).logits
    torch.testing.assert_close(sdpa_logits, eager_logits, rtol=1e-5, atol=1e-5)
    # and a decode step after it: one query over unpadded kept entries, no mask either
    counter = OpCounter()
    with torch.no_grad(), counter:
        mod.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert all(mask is None for mask in counter.sdpa_masks)
