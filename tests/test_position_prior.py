"""The router's position prior: what it selects, that the engine's oracles still hold with it, and that it
travels through save -> load_pretrained and is checked when read."""

import json

import pytest
import torch
from conftest import constant, randomize_routers, run, single_rows, tiny_model

from pmod_convert import add_routers, load_pretrained, save_pretrained
from pmod_convert.api import mod_layers
from pmod_convert.calibration.warm_start import RouterFit, order_candidates, select_routers
from pmod_convert.checkpoint import read_config
from pmod_convert.data import collate
from pmod_convert.adapters import adapter_by_family
from pmod_convert.errors import CheckpointError
from pmod_convert.mod.router import ROUTER_NAME, position_priors, relative_positions
from pmod_convert.mod.routing import select_tokens
from pmod_convert.tiny import RESERVED

SPECIAL_IDS = list(range(RESERVED))


def test_relative_positions_per_row_and_per_packed_sample():
    targets = torch.tensor([[0, 1, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    u = relative_positions(targets)
    assert torch.allclose(u[0], torch.tensor([0, 0, 1 / 3, 0, 2 / 3, 1, 0]))
    assert torch.equal(u[1], torch.zeros(7))  # a lone target sits at 0
    # two samples packed in one row: each gets its own 0..1 scale, exactly as if alone
    packed = torch.tensor([[1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert torch.allclose(relative_positions(packed, segments)[0], torch.tensor([0, 1, 0, 0, 0.5, 1]))


def test_zero_router_with_positive_prior_keeps_the_last_tokens():
    dense, config = tiny_model("llava")
    mod = add_routers(dense, constant(0.5))
    router = getattr(mod_layers(mod)[0][1], ROUTER_NAME)
    targets = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    logits = torch.zeros(1, 6)
    first = select_tokens(router.selection_scores(logits, targets), targets, 0.5)
    router.position_prior = 1.0
    last = select_tokens(router.selection_scores(logits, targets), targets, 0.5)
    assert first.tolist() == [[True, True, True, False, False, True]]
    assert last.tolist() == [[True, False, False, True, True, True]]
    # the prior never enters the TanhNorm weights: outputs at ratio 1.0 stay the dense ones
    assert torch.equal(router.token_weights(logits), torch.full((1, 6), router.beta))


def _with_priors(mod, prior):
    for _, layer in mod_layers(mod):
        getattr(layer, ROUTER_NAME).position_prior = prior
    return mod


def test_prior_changes_the_selection_and_keeps_cached_equal_uncached_and_padded_equal_alone():
    dense, config = tiny_model("llava")
    mod = add_routers(dense, constant(0.5, layers=[0, 2, 3]))
    randomize_routers(mod, std=0.05)  # small logits: a prior of 1 reorders most tokens
    rows = single_rows("llava", config)
    batch = collate(rows, adapter_by_family("llava").pad_token_id(config), padding_side="left")
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=SPECIAL_IDS)
    with torch.no_grad():
        before = mod(**batch).logits
        _with_priors(mod, 1.0)
        after = mod(**batch).logits
        assert not torch.allclose(before, after), "the prior must change which tokens are kept"
        cached = mod.generate(**batch, **kw)
        assert torch.equal(cached, mod.generate(**batch, use_cache=False, **kw))
        for i, row in enumerate(rows):
            n = row["input_ids"].shape[1]
            torch.testing.assert_close(after[i, -n:], mod(**row).logits[0], rtol=1e-5, atol=1e-5)
            alone = mod.generate(**row, **kw)[:, n:]
            assert torch.equal(cached[i : i + 1, batch["input_ids"].shape[1]:], alone)


def test_prior_survives_save_and_load_pretrained_and_is_checked(tmp_path):
    dense, config = tiny_model("llava")
    mod = _with_priors(add_routers(dense, constant(0.5, layers=[1, 2])), 0.75)
    save_pretrained(mod, tmp_path / "ckpt")  # the routers' priors are recorded, not only calibrate's
    assert read_config(tmp_path / "ckpt")["pmod"]["position_prior"] == [None, 0.75, 0.75, None]
    code, output = run("inspect", tmp_path / "ckpt", "--json")
    assert code == 0, output
    assert [row["position_prior"] for row in json.loads(output)["layers"]] == [None, 0.75, 0.75, None]
    loaded = load_pretrained(tmp_path / "ckpt")
    assert position_priors(loaded.model.language_model.layers) == [None, 0.75, 0.75, None]
    save_pretrained(loaded, tmp_path / "again")  # load -> save keeps them
    assert read_config(tmp_path / "again")["pmod"]["position_prior"] == [None, 0.75, 0.75, None]
    row = single_rows("llava", config)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**row).logits, mod(**row).logits)
    _with_priors(loaded, 0.0)
    save_pretrained(loaded, tmp_path / "none")  # all zero: no key, as checkpoints without priors
    assert "position_prior" not in read_config(tmp_path / "none")["pmod"]
    path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(path.read_text())
    for bad in (["x", 1, 1, None], [None, 1.0], [None, float("nan"), 1, None], [None, 1e39, 1, None]):
        cfg["pmod"]["position_prior"] = bad
        path.write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match="position_prior"):
            load_pretrained(tmp_path / "ckpt")


def test_router_choice_can_take_one_candidate_on_every_layer_at_once():
    # A candidate that only helps when every layer uses it: layer-by-layer search from zero never takes it.
    zero = torch.zeros(4)
    cand = {"last": {i: RouterFit(i, zero, 0.0, 8, 0.0, 0.0, "last", 1.0) for i in (1, 2)}}

    def kl(trial):
        return 0.1 if len(trial) == 2 else (1.0 if not trial else 1.5)

    chosen, history = select_routers([1, 2], cand, kl)
    assert sorted(chosen) == [1, 2] and all(f.prior == 1.0 for f in chosen.values())
    assert history[0]["layer"] == "all" and history[0]["choice"] == "last"
    # and the greedy pass may still put a single layer back to the zero router when that is better
    chosen, _ = select_routers([1, 2], cand, lambda t: {0: 1.0, 1: 0.2, 2: 0.5}[len(t)] if 2 in t or not t
                               else 0.9)
    assert sorted(chosen) == [2]


def test_order_candidates_are_zero_last_and_tilted_fits():
    fits = {1: RouterFit(1, torch.ones(4), 0.5, 10, 0.3, 0.1, "text_attention")}
    cands = order_candidates(fits, 4, 0.1)
    assert set(cands) == {"last", "text_attention+last"}
    assert torch.equal(cands["last"][1].weight, torch.zeros(4)) and cands["last"][1].prior == 1.0
    tilted = cands["text_attention+last"][1]
    assert torch.equal(tilted.weight, torch.ones(4)) and tilted.prior == pytest.approx(0.2)
