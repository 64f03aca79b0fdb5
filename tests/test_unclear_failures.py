"""Unclear failures (issue 12, items 10-12): base-model classes, sliding-window layers, output_attentions."""

import copy

import pytest
import torch
from conftest import batch_inputs, constant, randomize_routers, tiny_model

from pmod_convert import add_routers
from pmod_convert.adapters import adapter_by_family
from pmod_convert.api import mod_layers
from pmod_convert.errors import UnsupportedArchitecture
from pmod_convert.mod.cache import MoDCacheLayer


def ok(inputs):
    return inputs["attention_mask"].bool()


# ---- item 10: base-model classes (LlavaModel, Qwen2VLModel, ...) ----------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_add_routers_on_a_base_model_routes_like_the_full_model(family):
    full, config = tiny_model(family)
    base = copy.deepcopy(full.model)  # e.g. LlavaModel: no LM head, decoder at .language_model
    assert type(base).__name__ == full.model.__class__.__name__ and not hasattr(base, "lm_head")
    dense_base = copy.deepcopy(base)
    add_routers(full, constant(0.5, layers=[0, 2]))
    add_routers(base, constant(0.5, layers=[0, 2]))
    randomize_routers(full)
    randomize_routers(base)
    assert [i for i, _ in mod_layers(base)] == [0, 2]
    inputs = batch_inputs(family, config)
    with torch.no_grad():
        ref = full.model(**inputs).last_hidden_state  # the full model's routed base model
        got = base(**inputs).last_hidden_state
        cached = base(**inputs, use_cache=True).last_hidden_state
        dense = dense_base(**inputs).last_hidden_state
    torch.testing.assert_close(got[ok(inputs)], ref[ok(inputs)])
    torch.testing.assert_close(cached[ok(inputs)], got[ok(inputs)])
    assert not torch.allclose(got[ok(inputs)], dense[ok(inputs)], atol=1e-4)  # it really routes
    targets, kept = dict(mod_layers(base))[2].pmod_last_counts
    assert bool((targets > 0).all()) and bool((kept < targets).all())


def test_a_model_without_decoder_layers_is_refused_in_one_line():
    _, config = tiny_model("llava")
    adapter = adapter_by_family("llava")

    class NotAModel(torch.nn.Module):
        pass

    stray = NotAModel()
    stray.config = config
    with pytest.raises(UnsupportedArchitecture, match="LlavaForConditionalGeneration") as err:
        add_routers(stray, constant(0.5))
    assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedArchitecture):
        adapter.decoder_layers(stray)


# ---- item 11: sliding-window layers --------------------------------------------------------------
def generate(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("layers", [[0, 2], None])
def test_sliding_window_cached_generation_equals_recomputation(layers):
    # Qwen2-VL with layers 2 and 3 on a 6-token sliding window, a prompt of 30+ tokens: the window is shorter
    # than the prompt. layers=[0, 2]: an MoD sliding layer next to a plain DynamicSlidingWindowLayer (3).
    window = 6
    dense, config = tiny_model("qwen2_vl", text_use_sliding_window=True, text_sliding_window=window,
                               text_max_window_layers=2)
    assert config.text_config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    inputs = batch_inputs("qwen2_vl", config)
    assert inputs["input_ids"].shape[1] > 3 * window
    mod = add_routers(copy.deepcopy(dense), constant(0.5, layers=layers))
    randomize_routers(mod)
    cached, recomputed = generate(mod, inputs), generate(mod, inputs, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the dense model with the same window gives different tokens: routing is on
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(cached.logits, generate(dense, inputs).logits))
    # the MoD sliding layer keeps no more than its window of kept entries per row
    cache = cached.past_key_values
    layer2 = cache.layers[2]
    assert isinstance(layer2, MoDCacheLayer) and layer2.is_sliding
    assert int(layer2.kept_lengths().max()) <= window - 1
    assert layer2.get_seq_length() == cache.layers[3].get_seq_length() == cache.layers[0].get_seq_length()


def test_sliding_window_on_a_llama_text_config_matches_dense_at_ratio_one():
    # transformers' own Idefics3 test config sets sliding_window on its Llama text config: the dense model's
    # cache then keeps a window (DynamicSlidingWindowLayer) and its decode masks start at the window.
    dense, config = tiny_model("idefics3", text_sliding_window=8)
    inputs = batch_inputs("idefics3", config)
    assert inputs["input_ids"].shape[1] > 8
    mod = add_routers(copy.deepcopy(dense), constant(1.0))
    ref, got = generate(dense, inputs), generate(mod, inputs)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    half = add_routers(copy.deepcopy(dense), constant(0.5))
    randomize_routers(half)
    assert generate(half, inputs).sequences.shape == ref.sequences.shape


# ---- item 12: output_attentions over kept tokens, placed back with pmod_last_kept ------------------
def place(attn, kept, key_positions, seq_q, seq_k):
    """[b, h, kept, keys] attention over kept tokens -> [b, h, seq_q, seq_k] over the call's positions."""
    b, h = attn.shape[:2]
    full = attn.new_zeros(b, h, seq_q + 1, seq_k + 1)  # padding entries (-1) land in the extra row/column
    rows = torch.where(kept >= 0, kept, seq_q)
    cols = torch.where(key_positions >= 0, key_positions, seq_k)
    for i in range(b):
        full[i][:, rows[i][:, None], cols[i][None, :]] = attn[i]
    return full[:, :, :seq_q, :seq_k]


def test_output_attentions_are_placed_back_with_pmod_last_kept():
    dense, config = tiny_model("llava", attn="eager")
    inputs = batch_inputs("llava", config)
    mod = add_routers(copy.deepcopy(dense), constant(0.5, layers=[0, 2]))
    randomize_routers(mod)
    with torch.no_grad():
        ref = dense(**inputs, output_attentions=True).attentions[0]  # layer 0 sees the same inputs as dense
        out = mod(**inputs, output_attentions=True, use_cache=True)
    layer0 = dict(mod_layers(mod))[0]
    seq = inputs["input_ids"].shape[1]
    kept, keys = layer0.pmod_last_kept, layer0.pmod_last_key_positions
    attn = out.attentions[0]
    assert attn.shape[-2] == kept.shape[1] < seq and attn.shape[-1] == keys.shape[1]
    assert int(kept.max()) < seq and bool(((kept >= 0) == (keys >= 0)).all())
    placed = place(attn, kept, keys, seq, seq)
    # Over kept keys the MoD map is the dense map renormalised (same queries/keys, same rotary positions).
    is_kept = torch.zeros(kept.shape[0], seq + 1, dtype=torch.bool)
    is_kept = is_kept.scatter_(1, torch.where(kept >= 0, kept, seq), True)[:, :seq]
    rows = (is_kept & ok(inputs))[:, None, :, None].expand_as(ref)
    expected = ref * is_kept[:, None, None, :]
    expected = expected / expected.sum(-1, keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(placed[rows], expected[rows], rtol=1e-4, atol=1e-5)
    assert bool((placed[:, :, :, ~is_kept[0]][0] == 0).all())  # skipped tokens are no keys
    # a decode step: rows are the step's token, columns the logical positions of the cached + new keys
    step = {"input_ids": inputs["input_ids"][:, -1:],
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], 1)}
    with torch.no_grad():
        nxt = mod(**step, cache=out.past_key_values, output_attentions=True, use_cache=True)
    assert layer0.pmod_last_kept.tolist() == [[0], [0]]
    keys = layer0.pmod_last_key_positions
    assert nxt.attentions[0].shape[-1] == keys.shape[1] and int(keys.max()) == seq
    placed = place(nxt.attentions[0], layer0.pmod_last_kept, keys, 1, seq + 1)
    torch.testing.assert_close(placed.sum(-1), torch.ones_like(placed.sum(-1)))
