"""FastV / PyramidDrop baselines on the MoD engine: dense equivalence, cache, selection, budget, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_inputs, tiny_model
from typer.testing import CliRunner

from pmod_convert import load_pretrained
from pmod_convert.adapters import adapter_by_family
from pmod_convert.api import add_pruning, pmod_method
from pmod_convert.calibration.budget import BudgetError, Workload, solve_baseline_budget
from pmod_convert.cli import app
from pmod_convert.efficiency import TextShape
from pmod_convert.errors import CheckpointError, RecipeError
from pmod_convert.mod.cache import MoDCacheLayer
from pmod_convert.mod.scoring import fastv_ratios, pdrop_boundaries, pdrop_ratios, score_layers_for
from pmod_convert.tiny import RESERVED

SPECIAL_IDS = list(range(RESERVED))
GEN = dict(max_new_tokens=6, do_sample=False, suppress_tokens=SPECIAL_IDS)


def fastv(model, k=2, keep=0.5):
    return add_pruning(model, "fastv", fastv_ratios(len(adapter_by_family(_family(model)).decoder_layers(model)), k, keep))


def pdrop(model, lam=0.5, stages=4):
    n = len(adapter_by_family(_family(model)).decoder_layers(model))
    return add_pruning(model, "pdrop", pdrop_ratios(n, pdrop_boundaries(n, stages), lam))


def _family(model):
    from pmod_convert.adapters import get_adapter

    return get_adapter(model).family


def vision_mask(model, inputs):
    return torch.isin(inputs["input_ids"], torch.tensor(model._pmod_context.target_token_ids))


def kept_positions(model, family, inputs, layer):
    """Logical positions stored in ``layer``'s MoD cache after one prefill, per row (padding dropped)."""
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    slots = cache.layers[layer]
    assert isinstance(slots, MoDCacheLayer)
    return [set(int(s) for s in row if s >= 0) for row in slots.slots]


# ---- ratio 1.0 is the dense model ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "llava_next"])
@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_keep_everything_equals_dense(family, method):
    dense, config = tiny_model(family)
    model = fastv(copy.deepcopy(dense), keep=1.0) if method == "fastv" else pdrop(copy.deepcopy(dense), lam=1.0)
    inputs = batch_inputs(family, config)
    ok = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref, out = dense(**inputs).logits, model(**inputs).logits
        torch.testing.assert_close(out[ok], ref[ok], rtol=0, atol=1e-6)
        assert torch.equal(model.generate(**inputs, **GEN), dense.generate(**inputs, **GEN))


# ---- cached generation equals recomputation (query pinned to the last prompt token) ----------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_cached_generation_equals_uncached(family, method):
    dense, config = tiny_model(family)
    model = fastv(dense, k=1, keep=0.4) if method == "fastv" else pdrop(dense, lam=0.5)
    inputs = batch_inputs(family, config)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        cached = model.generate(**inputs, **GEN)
        uncached = model.generate(**inputs, use_cache=False, pmod_score_query=prompt - 1, **GEN)
    assert torch.equal(cached, uncached)
    # pruning changed the computation (the test is not vacuous)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, tiny_model(family)[0](**inputs).logits)


# ---- the kept set follows the attention scores (slow eager reference) ------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_keeps_the_most_attended_vision_tokens(family, attn):
    k, keep = 2, 0.5
    dense, config = tiny_model(family, attn)
    reference, _ = tiny_model(family, "eager")
    model = fastv(dense, k=k, keep=keep)
    inputs = batch_inputs(family, config)
    with torch.no_grad():
        attentions = reference(**inputs, output_attentions=True).attentions  # per layer [b, heads, q, kv]
    score = attentions[k - 1][:, :, -1].float().mean(1)  # last query, mean over heads: [b, seq]
    targets = vision_mask(model, inputs)
    kept = kept_positions(model, family, inputs, layer=k)
    for b in range(score.shape[0]):
        vision = targets[b].nonzero().flatten()
        n_keep = int(len(vision) * keep + 1e-6)
        top = vision[torch.topk(score[b, vision], n_keep).indices]
        text = (~targets[b] & inputs["attention_mask"][b].bool()).nonzero().flatten()
        assert kept[b] >= set(text.tolist())
        assert kept[b] & set(vision.tolist()) == set(top.tolist()), b
    # FastV: the same tokens in every later layer
    assert kept_positions(model, family, inputs, layer=k + 1) == kept


def test_pdrop_stages_are_nested_and_shrink():
    dense, config = tiny_model("llava")
    model = pdrop(dense, lam=0.5)
    assert model.config.pmod["score_layers"] == [0, 1, 2]
    inputs = batch_inputs("llava", config)
    sets = [kept_positions(model, "llava", inputs, layer) for layer in (1, 2, 3)]
    n_vision = vision_mask(model, inputs).sum(1)
    for stage, (outer, inner) in enumerate(zip(sets, sets[1:]), start=1):
        for b in range(len(outer)):
            assert inner[b] < outer[b]
    targets = vision_mask(model, inputs)
    for stage, kept in enumerate(sets, start=1):
        for b in range(len(kept)):
            vision = set(targets[b].nonzero().flatten().tolist())
            assert len(kept[b] & vision) == int(int(n_vision[b]) * 0.5 ** stage + 1e-6)


# ---- budget solver -----------------------------------------------------------------------------------
SHAPE = TextShape(hidden=64, intermediate=128, num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16, vocab=320,
                  gated_mlp=True)


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
@pytest.mark.parametrize("target", [0.75, 0.55, 0.40])
def test_solver_meets_the_flops_target(method, target):
    workload = Workload(SHAPE, [576, 300, 576], [40, 60, 20])
    solution = solve_baseline_budget(workload, method, target_flops=target, tolerance=0.01)
    assert abs(solution.achieved - target) <= 0.01
    assert abs(workload.metric(solution.ratios, "flops") - target) <= 0.01
    assert solution.score_layers == score_layers_for(solution.ratios)
    if method == "fastv":
        assert solution.k <= 2 and solution.ratios[:solution.k] == [None] * solution.k
    else:
        assert solution.boundaries == [2, 4, 6]


def test_solver_errors():
    workload = Workload(SHAPE, [576], [40])
    with pytest.raises(BudgetError, match="reachable"):
        solve_baseline_budget(workload, "fastv", target_flops=0.3, k=6)
    with pytest.raises(RecipeError):
        solve_baseline_budget(workload, "fastv", target_flops=0.5, k=8)
    with pytest.raises(RecipeError):
        solve_baseline_budget(workload, "median", target_flops=0.5)


# ---- checkpoints: calibrate --method, load, generate, finetune refuses ---------------------------------
def test_calibrate_method_checkpoint_loads_and_finetune_refuses(tmp_path):
    from test_calibration import write_dataset

    from pmod_convert.tiny import save_tiny_checkpoint
    from pmod_convert.training.finetune import finetune

    data, images = write_dataset(tmp_path / "data", 8, 48)
    save_tiny_checkpoint("llava", tmp_path / "dense", num_hidden_layers=4)
    runner = CliRunner()
    for method in ("fastv", "pdrop"):
        out = tmp_path / method
        result = runner.invoke(app, ["calibrate", str(tmp_path / "dense"), "--data", str(data), "--image-folder",
                                     str(images), "--out", str(out), "--method", method, "--target-flops", "0.6"])
        assert result.exit_code == 0, result.output
        model = load_pretrained(out)
        assert pmod_method(model) == method and model.config.pmod["score_layers"]
        assert model._pmod_context.method == method
        with pytest.raises(CheckpointError, match="pruning baseline"):
            finetune(out, data, images)
        result = runner.invoke(app, ["finetune", str(out), "--data", str(data), "--image-folder", str(images)])
        assert result.exit_code != 0 and "pruning baseline" in result.output
        assert len([line for line in result.output.strip().splitlines() if line.strip()]) == 1


# ---- compare: table and plot from a result document ------------------------------------------------------
def test_compare_table_and_plot(tmp_path):
    from pmod_convert.calibration.pareto import plot_compare, table_lines

    row = dict(label="dense", method="dense", budget=None, checkpoint="d", accuracy=0.66, decoder_flops_ratio=1.0,
               kv_ratio=1.0, prefill_time_ratio=1.0, setting="", error=None)
    rows = [row, dict(row, label="FastV @ 0.4", method="fastv", budget=0.4, accuracy=0.44, decoder_flops_ratio=0.38,
                      prefill_time_ratio=0.64, setting="K=1 R=0.91"),
            dict(row, label="PyramidDrop @ 0.2", method="pdrop", budget=0.2, accuracy=None, decoder_flops_ratio=None,
                 prefill_time_ratio=None, error="out of reach")]
    lines = table_lines({"rows": rows})
    assert len(lines) == 5 and "44.0%" in lines[3] and "failed: out of reach" in lines[4]
    assert plot_compare({"rows": rows}, tmp_path / "c.png").stat().st_size > 0
    result = CliRunner().invoke(app, ["compare", str(tmp_path), "--data", "t.json", "--calib", "c.json",
                                      "--budgets", "0.5,x"])
    assert result.exit_code != 0 and "--budgets" in result.output
