"""Cost conventions and one figure per checkpoint (issue 14 item 4, issue 16 item 4).

The paper convention must reproduce the p-MoD paper's four published TFLOPs (arXiv 2412.04449: LLaVA-1.5-7B
8.38 -> 4.92, LLaVA-NeXT-7B 39.46 -> 21.94) and its 53.8% KV cache from Vicuna-7B-shaped configs alone; inspect
and estimate must give the same figure for a checkpoint, from its own schedule, and say which tokens it assumes.
"""

import json
import shutil

import pytest
from conftest import one_error_line, randomize_routers, run
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

from pmod_convert import load_pretrained
from pmod_convert.costs import checkpoint_cost, effective_routers
from pmod_convert.efficiency import TextShape, estimate
from pmod_convert.mod.schedule import layer_ratios
from pmod_convert.sidecar import save_sidecar

VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
# Published (p-MoD paper, Table 1/2): dense -> p-MoD inference TFLOPs.
PUBLISHED = {"llava": (8.38, 4.92), "llava_next": (39.46, 21.94)}


def _write_config(folder, family):
    text, vision = LlamaConfig(**VICUNA_7B), CLIPVisionConfig(**CLIP_L_336)
    if family == "llava":
        LlavaConfig(text_config=text, vision_config=vision).save_pretrained(folder)
    else:  # the LLaVA-NeXT default pinpoints: the largest, 672x672, gives 576 + 2304 + 48 = 2,928 vision tokens
        LlavaNextConfig(text_config=text, vision_config=vision).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_paper_convention_reproduces_published_tflops(family, tmp_path):
    folder = _write_config(tmp_path / family, family)
    code, output = run("estimate", "--config", folder, "--convention", "paper", "--json")
    assert code == 0, output
    est = json.loads(output)
    dense, mod = PUBLISHED[family]
    assert est["dense_prefill_flops"] / 1e12 == pytest.approx(dense, rel=0.01)
    assert est["mod_prefill_flops"] / 1e12 == pytest.approx(mod, rel=0.01)
    assert est["convention"] == "paper" and est["n_text"] == 58
    assert est["n_vision"] == (576 if family == "llava" else 2928)
    if family == "llava_next":
        assert est["flops_ratio"] == pytest.approx(0.556, abs=0.005)  # the headline 55.6%
        assert est["kv_ratio"] == pytest.approx(0.538, abs=0.005)  # and 53.8% KV cache
    # The text output states the convention, the tokens the figure assumes, and the other convention's figure.
    code, text = run("estimate", "--config", folder, "--convention", "paper")
    assert code == 0, text
    assert "convention: paper" in text and "lm_head on every prompt position" in text
    assert f"{est['n_vision']} vision + 58 text tokens per sample" in text
    assert "exact convention: FLOPs" in text
    code, text = run("estimate", "--config", folder)
    assert "convention: exact" in text and "paper convention: FLOPs" in text and "+ 100 text tokens" in text


def test_paper_convention_counts_by_hand():
    """Two layers, one MoD at 0.5: linears of the processed tokens, lm_head on all, KV over vision only."""
    shape = TextShape(hidden=8, intermediate=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, vocab=10)
    est = estimate(shape, [None, 0.5], 10, 3, convention="paper")
    per_token = 2 * (8 * 2 * 4 + 2 * 8 * 1 * 4 + 2 * 4 * 8 + 3 * 8 * 16)  # q, k+v, o, gated MLP
    head = 2 * 8 * 10 * 13
    assert est.dense_prefill_flops == 2 * 13 * per_token + head
    assert est.mod_prefill_flops == (13 + 8) * per_token + head
    assert est.head_flops == head and est.decoder_flops_ratio == pytest.approx(21 / 26)
    assert est.kv_ratio == pytest.approx((10 + 5) / 20)  # vision tokens only: 10 + 5 of 10 + 10
    exact = estimate(shape, [None, 0.5], 10, 3)
    assert exact.convention == "exact" and exact.head_flops == 0 and exact.kv_ratio == pytest.approx((13 + 8) / 26)


def test_paper_convention_refusals(tmp_path):
    shape = TextShape(hidden=8, intermediate=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, vocab=0)
    with pytest.raises(Exception, match="vocab_size"):
        estimate(shape, [0.5], 10, 3, convention="paper")
    with pytest.raises(Exception, match="prefill only"):
        estimate(TextShape(8, 16, 1, 2, 1, 4, 10), [0.5], 10, 3, convention="paper", new_tokens=2)
    folder = _write_config(tmp_path / "c", "llava")
    code, output = run("estimate", "--config", folder, "--convention", "flops")
    assert code != 0 and "--convention must be one of exact, paper" in one_error_line(output)


def test_one_figure_per_checkpoint(mod, tmp_path):
    """inspect and estimate --config <checkpoint> use the checkpoint's own schedule and the same token counts;
    with a calibration report they use its token counts, and both print them."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(mod, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    ratios = config["pmod"]["layer_ratios"]
    code, out = run("inspect", ckpt, "--json")
    assert code == 0, out
    from_inspect = json.loads(out)
    code, out = run("estimate", "--config", ckpt, "--json")
    assert code == 0, out
    from_estimate = json.loads(out)
    assert from_estimate["flops_ratio"] == from_inspect["estimate"]["flops_ratio"]
    assert from_estimate["cost"]["ratios_source"].startswith("the checkpoint's own schedule")
    assert [row["ratio"] for row in from_estimate["layers"]] == ratios
    # A calibration report next to the weights: its per-sample token counts become the default workload.
    (ckpt / "calibration_report.json").write_text(json.dumps({"tokens": {"n_vision": [20, 40], "n_text": [7, 9]}}))
    code, text = run("inspect", ckpt)
    assert code == 0, text
    assert "30 vision + 8 text tokens per sample (mean of 2 samples); the calibration data" in text
    code, text = run("estimate", "--config", ckpt / "config.json")
    assert "30 vision + 8 text tokens per sample (mean of 2 samples)" in text
    want = estimate(TextShape.from_config(config), ratios, [20, 40], [7, 9])
    assert checkpoint_cost(config, ckpt).estimate.flops_ratio == want.flops_ratio
    # Options that differ from the checkpoint's schedule are used, and the output says the figure is not its own.
    code, text = run("estimate", "--config", ckpt, "--ratio", "0.25")
    assert code == 0 and "NOT the checkpoint's" in text and "schedule: the schedule options" in text


def test_inspect_shows_the_routers_load_pretrained_runs(mod, tmp_path):
    """After a finetune the trained routers live in the sidecar: inspect shows those, and says so."""
    ckpt = tmp_path / "ft"
    shutil.copytree(mod, ckpt)
    code, out = run("inspect", ckpt, "--json")
    before = json.loads(out)
    assert before["routers_source"].startswith("stored with the weights")
    assert all(row["router_weight_norm"] in (None, 0.0) for row in before["layers"])
    model = load_pretrained(ckpt)
    randomize_routers(model, seed=3)
    save_sidecar(model, ckpt)  # routers only (no LoRA), as finetune writes them
    code, out = run("inspect", ckpt, "--json")
    assert code == 0, out
    after = json.loads(out)
    assert after["routers_source"].startswith("finetuned: pmod_adapter/routers.safetensors")
    loaded = load_pretrained(ckpt)
    for row in after["layers"]:
        if row["kind"] != "MoD":
            continue
        layer = loaded.model.language_model.layers[row["layer"]]
        assert row["router_weight_norm"] == pytest.approx(float(layer.pmod_router.weight.norm()), rel=1e-6)
        assert row["router_weight_norm"] > 0
    code, text = run("inspect", ckpt)
    assert "routers: finetuned" in text
    assert effective_routers(ckpt).finetuned


def test_exact_convention_default_unchanged():
    shape = TextShape.from_config(LlavaNextConfig(text_config=LlamaConfig(**VICUNA_7B)).to_dict())
    est = estimate(shape, layer_ratios(32), 2880, 100)
    assert est.convention == "exact" and est.flops_ratio == pytest.approx(0.545, abs=0.005)
