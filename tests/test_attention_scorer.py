"""The attention scorer (``scorer = "attention"``): an MoD layer ranks its vision tokens by the attention its own
text queries give them. Oracle: the dense model's eager attention weights in that layer, in every family."""

import json

import pytest
import torch
from conftest import constant, run, single_rows, tiny_model

from pmod_convert import add_routers, load_pretrained, save_pretrained, set_scorers
from pmod_convert.adapters import adapter_by_family, all_adapters
from pmod_convert.api import mod_layers
from pmod_convert.calibration.budget import Workload, solve_budget
from pmod_convert.checkpoint import read_config
from pmod_convert.data import collate
from pmod_convert.efficiency import TextShape, estimate, scorer_flops
from pmod_convert.errors import CheckpointError, PmodError
from pmod_convert.mod.context import score_query_positions
from pmod_convert.mod.router import ROUTER_NAME, layer_scorers, set_layer_scorers
from pmod_convert.mod.routing import select_tokens
from pmod_convert.mod.scoring import own_attention_scores
from pmod_convert.tiny import RESERVED

FAMILIES = [a.family for a in all_adapters()]


def _layer_inputs(model, layer):
    """Capture a decoder layer's input hidden states and kwargs in the next forward."""
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = kwargs

    return captured, layer.register_forward_pre_hook(hook, with_kwargs=True)


def _reference(attentions, targets):
    """Mean over heads and over the text queries after the last vision token of eager attention weights."""
    last = max(int(i) for i in targets[0].nonzero().flatten())
    queries = torch.zeros_like(targets)
    queries[:, last + 1:] = True
    weights = attentions.float().mean(1) * queries[:, :, None]
    return weights.sum(1) / queries.sum(1, keepdim=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_the_layers_own_eager_attention_in_every_family(family):
    adapter = adapter_by_family(family)
    model, config = tiny_model(family, attn="eager")
    inputs = adapter.dummy_inputs(config)
    targets = torch.isin(inputs["input_ids"], torch.tensor(adapter.vision_token_ids(config)))
    layers = adapter.decoder_layers(model)
    for index, layer in enumerate(layers):
        captured, handle = _layer_inputs(model, layer)
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
        handle.remove()
        kw = captured["kwargs"]
        mine = own_attention_scores(layer, captured["hidden"], targets, kw.get("attention_mask"),
                                    kw.get("position_embeddings"), norm_name=adapter.input_norm,
                                    rope=adapter.attention_rope(layer))
        torch.testing.assert_close(mine, _reference(out.attentions[index], targets), rtol=1e-5, atol=1e-6,
                                   msg=f"{family} layer {index}")


def _attention_model(family="llava", ratio=0.5, layers=(1, 2, 3)):
    dense, config = tiny_model(family)
    mod = add_routers(dense, constant(ratio, layers=list(layers)))
    n = len(adapter_by_family(family).decoder_layers(mod))
    set_scorers(mod, ["attention" if i in layers else None for i in range(n)])
    return dense, mod, config


def test_the_first_routed_layer_keeps_the_top_k_of_the_dense_attention():
    dense, _ = tiny_model("llava", attn="eager")
    _, mod, config = _attention_model(layers=(1,))
    row = single_rows("llava", config)[0]
    adapter = adapter_by_family("llava")
    targets = torch.isin(row["input_ids"], torch.tensor(adapter.vision_token_ids(config)))
    with torch.no_grad():
        attentions = dense(**row, output_attentions=True).attentions[1]
        mod(**row)
    expected = select_tokens(_reference(attentions, targets), targets, 0.5)
    layer = adapter.decoder_layers(mod)[1]
    kept = torch.zeros_like(targets)
    kept[0, layer.pmod_last_kept[0]] = True
    assert torch.equal(kept, expected)
    assert int((kept & targets).sum()) == int(targets.sum()) // 2


def test_ratio_one_is_dense_and_the_scorer_changes_what_is_kept():
    dense, mod, config = _attention_model(ratio=1.0)
    row = single_rows("llava", config)[0]
    with torch.no_grad():
        torch.testing.assert_close(mod(**row).logits, dense(**row).logits, rtol=0, atol=0)
    _, routed, _ = _attention_model(ratio=0.5)
    _, first_k, _ = _attention_model(ratio=0.5)
    set_scorers(first_k, None)  # zero routers: the first k
    with torch.no_grad():
        assert not torch.allclose(routed(**row).logits, first_k(**row).logits)


def test_cached_equals_uncached_with_the_prompt_pinned_and_padded_batch_equals_rows():
    _, mod, config = _attention_model()
    rows = single_rows("llava", config)
    batch = collate(rows, adapter_by_family("llava").pad_token_id(config), padding_side="left")
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=list(range(RESERVED)))
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        cached = mod.generate(**batch, **kw)
        # without a cache every step recomputes the prompt: pin the queries to the prompt as the prefill saw it
        assert torch.equal(cached, mod.generate(**batch, use_cache=False, pmod_score_query=width - 1, **kw))
        logits = mod(**batch).logits
        for i, row in enumerate(rows):
            n = row["input_ids"].shape[1]
            torch.testing.assert_close(logits[i, -n:], mod(**row).logits[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(cached[i:i + 1, width:], mod.generate(**row, **kw)[:, n:])


def test_answer_tokens_never_choose_what_the_prompt_keeps():
    _, mod, config = _attention_model(layers=(1,))
    row = single_rows("llava", config)[0]
    n = row["input_ids"].shape[1]
    answer = torch.tensor([[RESERVED + 3, RESERVED + 5, RESERVED + 7]])
    forced = dict(row, input_ids=torch.cat([row["input_ids"], answer], 1),
                  attention_mask=torch.ones(1, n + 3, dtype=torch.long))
    labels = torch.full_like(forced["input_ids"], -100)
    labels[0, n:] = answer
    assert score_query_positions(labels).tolist() == [n - 1]
    layer = adapter_by_family("llava").decoder_layers(mod)[1]
    with torch.no_grad():
        mod(**row)
        prompt_kept = layer.pmod_last_kept[0].tolist()
        mod(**forced, pmod_score_query=score_query_positions(labels))
        forced_kept = [p for p in layer.pmod_last_kept[0].tolist() if p < n]
    assert forced_kept == prompt_kept
    assert score_query_positions(torch.full((1, 4), -100)).tolist() == [-1]  # no answer: the whole row


def test_packed_rows_and_chunked_prefill_are_refused():
    _, mod, config = _attention_model()
    row = single_rows("llava", config)[0]
    n = row["input_ids"].shape[1]
    packed = dict(row, input_ids=row["input_ids"].repeat(1, 2), attention_mask=torch.ones(1, 2 * n, dtype=torch.long),
                  position_ids=torch.arange(n).repeat(1, 2), pixel_values=row["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(PmodError, match="packing several samples with images"):
        mod(**packed)
    with torch.no_grad():
        out = mod(**{k: v for k, v in row.items()}, use_cache=True)
        more = dict(row, input_ids=row["input_ids"], attention_mask=torch.ones(1, 2 * n, dtype=torch.long))
        with pytest.raises(PmodError, match="one forward"):
            mod(**more, cache=out.past_key_values, use_cache=True)


def test_scorer_survives_save_and_load_and_is_checked(tmp_path):
    _, mod, config = _attention_model(layers=(1, 2))
    save_pretrained(mod, tmp_path / "ckpt")
    assert read_config(tmp_path / "ckpt")["pmod"]["scorer"] == [None, "attention", "attention", None]
    code, output = run("inspect", tmp_path / "ckpt", "--json")
    assert code == 0, output
    assert [row["scorer"] for row in json.loads(output)["layers"]] == [None, "attention", "attention", None]
    scored_flops = json.loads(output)["estimate"]["mod_decoder_flops"]
    loaded = load_pretrained(tmp_path / "ckpt")
    assert layer_scorers(loaded.model.language_model.layers) == [None, "attention", "attention", None]
    row = single_rows("llava", config)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**row).logits, mod(**row).logits)
    assert loaded.config.pmod["scorer"] == [None, "attention", "attention", None]
    set_scorers(loaded, None)
    assert "scorer" not in loaded.config.pmod  # the config in memory follows at once (bench's estimate reads it)
    set_scorers(loaded, [None, "attention", None, None])
    assert loaded.config.pmod["scorer"] == [None, "attention", "router", None]
    set_scorers(loaded, None)
    save_pretrained(loaded, tmp_path / "none")
    assert "scorer" not in read_config(tmp_path / "none")["pmod"]
    code, output = run("inspect", tmp_path / "none", "--json")
    assert code == 0, output
    assert json.loads(output)["estimate"]["mod_decoder_flops"] < scored_flops  # the scorer's cost is counted
    path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(path.read_text())
    dense_layer = [None, "attention", "attention", "attention"]  # layer 3 is dense
    for bad in (["x", None, None, None], [None, "attention"], "attention", dense_layer):
        cfg["pmod"]["scorer"] = bad
        path.write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match="scorer"):
            load_pretrained(tmp_path / "ckpt")


def test_a_layer_without_the_attention_structure_and_bad_arguments_are_refused():
    _, mod, config = _attention_model(layers=(1,))
    layers = adapter_by_family("llava").decoder_layers(mod)
    with pytest.raises(PmodError, match="no post_norm"):
        set_layer_scorers(layers, [None, "attention", None, None], norm_name="post_norm", rope=lambda layer: True)
    with pytest.raises(PmodError, match="rope="):  # the family decides which layers use rotary embeddings
        set_layer_scorers(layers, [None, "attention", None, None])
    with pytest.raises(PmodError, match="unknown scorer"):
        set_scorers(mod, [None, "oracle", None, None])
    with pytest.raises(PmodError, match="dense layer"):  # layer 0 routes nothing
        set_scorers(mod, ["attention", "attention", None, None])
    for bad in ("attention", 3, {1: "attention"}):
        with pytest.raises(PmodError, match="one entry per decoder layer"):
            set_scorers(mod, bad)
    # a bad entry after good ones changes nothing: not the layers, not config.pmod
    _, two, _ = _attention_model(layers=(1, 2))
    two_layers = adapter_by_family("llava").decoder_layers(two)
    before = (layer_scorers(two_layers), dict(two.config.pmod))
    with pytest.raises(PmodError, match="unknown scorer"):
        set_scorers(two, [None, "router", "bogus", None])
    with pytest.raises(PmodError, match="dense layer"):
        set_scorers(two, [None, "router", "router", "attention"])
    assert (layer_scorers(two_layers), dict(two.config.pmod)) == before
    row = single_rows("llava", config)[0]
    for bad in ([3, 4], "5", True, 2.5):
        with pytest.raises(PmodError, match="pmod_score_query"):
            mod(**row, pmod_score_query=bad)
    with pytest.raises(PmodError, match="no prompt text after"):  # a query before the image: nothing ranks
        mod(**row, pmod_score_query=0)
    vision = torch.isin(row["input_ids"][0], torch.tensor(adapter_by_family("llava").vision_token_ids(config)))
    end = int(vision.nonzero().max()) + 1  # the row cut right after its image
    cut = dict(row, input_ids=row["input_ids"][:, :end], attention_mask=row["attention_mask"][:, :end])
    with pytest.raises(PmodError, match="no prompt text after"):
        mod(**cut)


def test_left_padding_with_position_ids_works_and_packed_images_are_refused():
    _, mod, config = _attention_model()
    rows = single_rows("llava", config)
    batch = collate(rows, adapter_by_family("llava").pad_token_id(config), padding_side="left")
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what HF / TRL pass with left padding
    with torch.no_grad():
        torch.testing.assert_close(mod(**batch, position_ids=position_ids).logits, mod(**batch).logits)


def test_multi_crop_separators_are_no_queries():
    from pmod_convert.mod.scoring import scorer_queries

    targets = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)  # two crops, a separator, a prompt
    assert scorer_queries(targets, None, None)[0].tolist() == [False] * 6 + [True] * 3
    segments = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1]])  # a second (text-only) sample packed after it
    assert scorer_queries(targets, None, None, segments)[0].tolist() == [False] * 6 + [True, False, False]


def test_router_taps_record_what_the_layer_really_kept():
    from pmod_convert.training.routing import RouterTaps

    _, mod, config = _attention_model()
    row = single_rows("llava", config)[0]
    layers = adapter_by_family("llava").decoder_layers(mod)
    with RouterTaps(mod) as taps, taps.record(), torch.no_grad():
        mod(**row)
        for rec in taps.records:
            kept = layers[rec.layer].pmod_last_kept[0]
            assert rec.keep[0].nonzero().flatten().tolist() == kept[kept >= 0].tolist()


def test_the_scorer_is_paid_for_in_the_flops_estimate_and_the_budget():
    shape = TextShape(hidden=64, intermediate=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, vocab=100)
    ratios = [None, 0.5, 0.5, 0.25]
    plain = estimate(shape, ratios, 64, 12)
    scored = estimate(shape, ratios, 64, 12, scorers=[None, "attention", "attention", "router"])
    extra = scorer_flops(shape, 64, 12)
    assert extra == 2 * 76 * 64 * 32 + 2 * 12 * 64 * 64 + 2 * 12 * 76 * 64  # k of every token, q of text, pairs
    assert scored.mod_decoder_flops == plain.mod_decoder_flops + 2 * extra
    assert scored.dense_decoder_flops == plain.dense_decoder_flops
    # at ratio 1.0 nothing is ranked, so nothing is paid
    assert estimate(shape, [None, 1.0, 1.0, 1.0], 64, 12, scorers=[None] + ["attention"] * 3).flops_ratio == 1.0
    workload = Workload(shape, [64] * 4, [12] * 4)
    routed = solve_budget(workload, target_flops=0.6, kind="shiftedcos")
    attention = solve_budget(Workload(shape, [64] * 4, [12] * 4, scorer="attention"), target_flops=0.6,
                             kind="shiftedcos")
    assert abs(attention.achieved - 0.6) <= 0.01 and abs(routed.achieved - 0.6) <= 0.01
    kept = lambda s: sum(r for r in s.ratios if r is not None) + s.ratios.count(None)  # noqa: E731
    assert kept(attention) < kept(routed)  # the same budget buys fewer kept tokens
