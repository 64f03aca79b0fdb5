"""The MoD engine against the dense transformers model (the oracle), on every supported family."""

import copy
import types

import pytest
import torch
from conftest import FAMILIES, batch_inputs, constant, randomize_routers, single_rows, tiny_model

from pmod_convert import Recipe, add_routers, layer_infos
from pmod_convert.adapters import adapter_by_family
from pmod_convert.data import collate
from pmod_convert.mod.cache import MoDCacheLayer
from pmod_convert.mod.layer import MoDLayerMixin
from pmod_convert.mod.router import ROUTER_NAME
from pmod_convert.tiny import RESERVED

# A random model may emit a vision placeholder; recomputation would then see one image token too many.
SPECIAL_IDS = list(range(RESERVED))


def real_positions(inputs):
    return inputs["attention_mask"].bool()


def logits_of(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def mod_layers(model, family):
    return [l for l in adapter_by_family(family).decoder_layers(model) if isinstance(l, MoDLayerMixin)]


def vision_counts(model, inputs):
    ids = torch.tensor(model._pmod_context.target_token_ids)
    return torch.isin(inputs["input_ids"], ids).sum(1)


# ---- ratio 1.0 with fresh routers is the dense model -------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_fresh_routers_equals_dense(family, attn):
    dense, config = tiny_model(family, attn)
    mod = add_routers(copy.deepcopy(dense), constant(1.0))
    for batch_size in (1, 2):
        inputs = batch_inputs(family, config, batch_size=batch_size)
        ok = real_positions(inputs)
        ref = logits_of(dense, inputs)
        out = logits_of(mod, inputs)
        torch.testing.assert_close(out[ok], ref[ok], rtol=0, atol=1e-6)
        out_cached = logits_of(mod, inputs, use_cache=True)
        torch.testing.assert_close(out_cached[ok], ref[ok], rtol=0, atol=1e-6)
    gen_kw = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        assert torch.equal(mod.generate(**inputs, **gen_kw), dense.generate(**inputs, **gen_kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_default_schedule_fresh_routers_keeps_text_exact_before_first_mod_layer(family):
    dense, config = tiny_model(family, num_hidden_layers=8)
    mod = add_routers(copy.deepcopy(dense), Recipe())
    infos = layer_infos(mod)
    assert infos[0].ratio is None and infos[-1].ratio == pytest.approx(0.15)
    inputs = batch_inputs(family, config)
    assert torch.isfinite(logits_of(mod, inputs)[real_positions(inputs)]).all()


# ---- cached generation equals recomputation ------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_uncached_with_layer0_mod(family):
    dense, config = tiny_model(family)
    mod = add_routers(dense, constant(0.5, layers=[0, 2, 3]))
    randomize_routers(mod)
    inputs = batch_inputs(family, config)
    kw = dict(max_new_tokens=8, do_sample=False, suppress_tokens=SPECIAL_IDS)
    with torch.no_grad():
        cached = mod.generate(**inputs, **kw)
        uncached = mod.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    # and by hand: each step recomputes the whole sequence with no cache at all
    seq, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        for _ in range(3):
            last = mod(input_ids=seq, attention_mask=mask, **extra).logits[:, -1]
            nxt = last.index_fill(-1, torch.tensor(SPECIAL_IDS), float("-inf")).argmax(-1, keepdim=True)
            seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            for key, value in adapter_by_family(family).tiny_generated_types.items():  # per-token types grow too
                if key in extra:
                    extra[key] = torch.cat([extra[key], torch.full_like(nxt, value)], 1)
    assert torch.equal(seq, cached[:, : seq.shape[1]])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sampling_and_beam_search_cached_equal_uncached(family):
    dense, config = tiny_model(family)
    mod = add_routers(dense, constant(0.5, layers=[0, 1, 3]))
    randomize_routers(mod)
    inputs = batch_inputs(family, config)
    for kw in (dict(do_sample=True, top_k=20), dict(do_sample=False, num_beams=3)):
        outs = []
        for use_cache in (True, False):
            torch.manual_seed(123)
            with torch.no_grad():
                outs.append(mod.generate(**inputs, max_new_tokens=6, use_cache=use_cache,
                                         suppress_tokens=SPECIAL_IDS, **kw))
        assert torch.equal(outs[0], outs[1]), kw


# ---- fast gather/scatter path equals a slow masked reference -----------------------------------
def _reference_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                       use_cache=False, position_embeddings=None, **kwargs):
    """All tokens run through the dense layer; skipped tokens are masked out as keys and from the update."""
    dense_forward = type(self).__mro__[2].forward  # the original decoder layer class
    batch, seq, _ = hidden_states.shape
    # route_call (not targets_for): the "every MoD layer routed" guard counts this reference as routing
    targets = self._pmod_context.route_call(self.pmod_layer_idx, hidden_states)
    router = getattr(self, ROUTER_NAME)
    logits = router.logits(hidden_states)
    weights = router.token_weights(logits)
    keep = torch.ones(batch, seq, dtype=torch.bool)
    for b in range(batch):  # naive top-k: highest logit first, earlier position first on ties
        idx = [i for i in range(seq) if targets[b, i]]
        k = int(len(idx) * self.pmod_ratio + 1e-6)
        ranked = sorted(idx, key=lambda i: (-float(logits[b, i]), i))
        for i in ranked[k:]:
            keep[b, i] = False
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    if attention_mask is None:
        allowed = causal.expand(batch, 1, seq, seq)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask.expand(batch, 1, seq, seq)
    else:
        allowed = (attention_mask == 0).expand(batch, 1, seq, seq)
    allowed = (allowed & keep[:, None, None, :]) | torch.eye(seq, dtype=torch.bool)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        allowed = torch.zeros(allowed.shape, dtype=attention_mask.dtype).masked_fill(
            ~allowed, torch.finfo(attention_mask.dtype).min)
    captured = {}
    branch = getattr(self, self.pmod_mlp_branch)  # the MLP branch STRing scales (adapter.mlp_branch)
    handle = branch.register_forward_hook(lambda m, a, o: captured.setdefault("delta", o))
    try:
        y = dense_forward(self, hidden_states, attention_mask=allowed, position_ids=position_ids,
                          position_embeddings=position_embeddings, **kwargs)
    finally:
        handle.remove()
    w = weights.unsqueeze(-1).to(y.dtype)
    kept_out = torch.where(targets.unsqueeze(-1), y + (w - 1) * captured["delta"], y)
    return torch.where(keep.unsqueeze(-1), kept_out, torch.where(targets.unsqueeze(-1), w * hidden_states, hidden_states))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_equals_slow_masked_reference(family, attn):
    dense, config = tiny_model(family, attn)
    fast = add_routers(dense, constant(0.4, layers=[0, 1, 3]))
    randomize_routers(fast)
    slow = copy.deepcopy(fast)
    for layer in mod_layers(slow, family):
        layer.forward = types.MethodType(_reference_forward, layer)
    inputs = batch_inputs(family, config)
    ok = real_positions(inputs)
    torch.testing.assert_close(logits_of(fast, inputs)[ok], logits_of(slow, inputs)[ok], rtol=1e-5, atol=1e-5)


# ---- a padded batch equals its samples run one by one -----------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_samples_alone(family):
    dense, config = tiny_model(family)
    mod = add_routers(dense, constant(0.5, layers=[0, 2, 3]))
    randomize_routers(mod)
    rows = single_rows(family, config)
    assert len({int(v) for v in (vision_counts(mod, r)[0] for r in rows)}) == 2, "rows must differ in vision tokens"
    adapter = adapter_by_family(family)
    batch = collate(rows, adapter.pad_token_id(config), padding_side="left")
    kw = dict(max_new_tokens=6, do_sample=False, suppress_tokens=SPECIAL_IDS)
    batch_logits = logits_of(mod, batch)
    with torch.no_grad():
        batch_generated = mod.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
    for i, row in enumerate(rows):
        n = row["input_ids"].shape[1]
        torch.testing.assert_close(batch_logits[i, -n:], logits_of(mod, row)[0], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            alone = mod.generate(**row, **kw)[:, n:]
        assert torch.equal(batch_generated[i : i + 1], alone)


# ---- KV cache savings ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_holds_only_kept_tokens(family):
    dense, config = tiny_model(family)
    ratio = 0.25
    mod = add_routers(dense, constant(ratio, layers=[0, 2]))
    inputs = batch_inputs(family, config)
    n_vision = vision_counts(mod, inputs)
    seq = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = mod(**inputs, use_cache=True)
    cache = out.cache
    for idx, layer_cache in enumerate(cache.layers):
        assert layer_cache.get_seq_length() == seq  # logical length, what transformers builds positions from
        if idx in (0, 2):
            assert isinstance(layer_cache, MoDCacheLayer)
            expected = seq - n_vision + torch.floor(n_vision * ratio + 1e-6).long()
            assert torch.equal(layer_cache.kept_lengths(), expected)
            assert layer_cache.physical_length() == int(expected.max()) < seq
        else:
            assert layer_cache.keys.shape[-2] == seq
    # decoding appends one slot per step (text tokens are always kept); the last token is not fed yet
    with torch.no_grad():
        gen = mod.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=SPECIAL_IDS,
                           return_dict_in_generate=True)
    cache = gen.cache if hasattr(gen, "cache") else gen.past_key_values
    assert cache.layers[0].get_seq_length() == seq + 3
    expected = seq - n_vision + torch.floor(n_vision * ratio + 1e-6).long()
    assert torch.equal(cache.layers[0].kept_lengths(), expected + 3)
    assert cache.layers[1].keys.shape[-2] == seq + 3


# ---- gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_router_gets_gradient_from_kept_and_skipped_tokens(family):
    dense, config = tiny_model(family)
    mod = add_routers(dense, constant(0.5, layers=[1]))
    randomize_routers(mod, std=0.1)
    mod.train()
    layer = mod_layers(mod, family)[0]
    router = getattr(layer, ROUTER_NAME)
    seen = {}
    layer.register_forward_hook(lambda m, a, kw, out: seen.update(x=a[0] if a else kw["hidden_states"], out=out),
                                with_kwargs=True)
    inputs = batch_inputs(family, config)
    mod(**inputs)
    x, out = seen["x"], seen["out"]
    targets = mod._pmod_context.targets_for(x)
    from pmod_convert.mod.routing import select_tokens
    keep = select_tokens(router.logits(x).detach(), targets, 0.5)
    kept_targets, skipped = targets & keep, targets & ~keep
    assert kept_targets.any() and skipped.any()
    for selection in (kept_targets, skipped):
        grad = torch.autograd.grad(out[selection].sum(), router.weight, retain_graph=True)[0]
        assert grad.abs().sum() > 0
    text = ~targets & inputs["attention_mask"].bool()
    grad = torch.autograd.grad(out[text].sum(), router.weight, retain_graph=True, allow_unused=True)[0]
    # text tokens are never reweighted; their gradient reaches the router only through attention to
    # vision tokens in this layer (w scales nothing of theirs directly)
    assert grad is None or torch.isfinite(grad).all()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_gradient_checkpointing_non_reentrant_matches(family):
    dense, config = tiny_model(family)
    mod = add_routers(dense, constant(0.5, layers=[0, 2]))
    randomize_routers(mod, std=0.1)
    inputs = batch_inputs(family, config)
    labels = inputs["input_ids"].masked_fill(~inputs["attention_mask"].bool(), -100)

    def grads(model):
        model.train()
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if ROUTER_NAME in n}

    plain = grads(mod)
    ckpt = copy.deepcopy(mod)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads(ckpt)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)
        assert plain[name].abs().sum() > 0


# ---- copies route independently ------------------------------------------------------------------
def test_deepcopy_routes_with_its_own_context():
    dense, config = tiny_model("llava")
    mod = add_routers(dense, constant(0.5))
    clone = copy.deepcopy(mod)
    assert all(l._pmod_context is clone._pmod_context for l in mod_layers(clone, "llava"))
    assert clone._pmod_context is not mod._pmod_context
    a = batch_inputs("llava", config, seed=0)
    b = batch_inputs("llava", config, seed=5)
    ref = logits_of(mod, a)
    logits_of(clone, b)  # must not disturb the original's routing
    torch.testing.assert_close(logits_of(mod, a), ref)


@pytest.mark.parametrize("keep_rows", [[5, 5, 5], [5, 2, 0]], ids=["even", "ragged"])
def test_gather_take_and_scatter_equal_element_indexed_references(keep_rows):
    """``Gather.take`` / ``Gather.scatter`` (row copies over flattened (batch, seq)) equal ``torch.gather`` /
    ``torch.scatter`` with per-element indices, values and gradients, for hidden states, broadcast rotary
    tables, ``[3, batch, seq]`` position ids and ragged rows (padding entries never written)."""
    from pmod_convert.mod.routing import Gather

    torch.manual_seed(0)
    batch, seq, hidden = 3, 9, 4
    keep = torch.zeros(batch, seq, dtype=torch.bool)
    for b, n in enumerate(keep_rows):
        keep[b, torch.randperm(seq)[:n]] = True
    g = Gather.from_keep(keep)
    assert g.ragged == (len(set(keep_rows)) > 1)
    idx = g.index

    x = torch.randn(batch, seq, hidden, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    got = g.take(x, 1)
    want = torch.gather(ref_x, 1, idx.unsqueeze(-1).expand(-1, -1, hidden))
    assert torch.equal(got, want)
    cos = torch.randn(1, seq, hidden)  # broadcast over the batch
    assert torch.equal(g.take(cos, -2), torch.gather(cos.expand(batch, -1, -1), 1,
                                                      idx.unsqueeze(-1).expand(-1, -1, hidden)))
    pos = torch.arange(seq).expand(3, batch, seq) * torch.tensor([1, 2, 3]).view(3, 1, 1)
    assert torch.equal(g.take(pos, -1), torch.gather(pos, 2, idx.unsqueeze(0).expand(3, -1, -1)))
    assert g.take(torch.zeros(batch, seq + 1), 1).shape == (batch, seq + 1)  # not token-aligned: unchanged

    values = torch.randn(batch, idx.shape[1], hidden, requires_grad=True)
    ref_values = values.detach().clone().requires_grad_(True)
    base = x * 2.0
    out = g.scatter(base, got * values)
    ref_base = ref_x * 2.0
    expected = ref_base.clone()
    for b in range(batch):
        for j in range(idx.shape[1]):
            if g.valid[b, j]:
                expected[b, idx[b, j]] = (want * ref_values)[b, j]
    assert torch.equal(out, expected)
    weights = torch.randn(batch, seq, hidden)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad) and torch.allclose(values.grad, ref_values.grad)
    inplace = g.scatter((x * 2.0).detach(), (got * values).detach(), inplace=True)
    assert torch.equal(inplace, expected.detach())
