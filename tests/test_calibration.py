"""``pmod-convert calibrate`` end to end on tiny LLaVA checkpoints and small PNG datasets made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from pmod_convert import Recipe, RouterSettings, layer_infos, load_pretrained
from pmod_convert.api import convert
from pmod_convert.calibration import calibrate
from pmod_convert.checkpoint import read_config, read_routers
from pmod_convert.cli import app
from pmod_convert.efficiency import TextShape, estimate
from pmod_convert.errors import CheckpointError, RecipeError
from pmod_convert.tiny import save_tiny_checkpoint

runner = CliRunner()
QUESTIONS = ["w40 w41 w42 w43 w44 w45 w46 w47", "w50 w51 w52 w53 w54 w55 w56 w57 w58 w59"]


def write_dataset(root: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` PNGs (a few bright rectangles on a dark background) and a LLaVA-style JSON about them."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 80, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, size - 12, 2))
            w, h = (int(v) for v in rng.integers(6, 20, 2))
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(120, 256, 3)))
        image.save(images / f"img{i:02d}.png")
        answer = " ".join(f"w{int(w)}" for w in rng.integers(100, 320, 8))
        rows.append({"id": f"s{i:02d}", "image": f"img{i:02d}.png",
                     "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[i % 2]}"},
                                       {"from": "gpt", "value": answer}]})
    data = root / "data.json"
    data.write_text(json.dumps(rows))
    return data, images


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """16 images of 48 px (36 vision tokens each) and a 4-layer tiny LLaVA."""
    root = tmp_path_factory.mktemp("small")
    data, images = write_dataset(root, 16, 48)
    save_tiny_checkpoint("llava", root / "ckpt", num_hidden_layers=4)
    return root / "ckpt", data, images


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """48 images of 64 px (64 vision tokens each) and a 6-layer tiny LLaVA whose attention depends on content.

    Random weights at the usual 0.02 scale give near-uniform attention (no token matters more than another),
    and random rotary frequencies make attention mostly a function of position; a trained LLM has neither.
    Larger text weights (0.2) and a huge rope_theta (rotations negligible at these lengths) make which vision
    tokens the text attends to depend on their content, which is what routing can learn.
    """
    root = tmp_path_factory.mktemp("peaked")
    data, images = write_dataset(root, 48, 64)
    save_tiny_checkpoint("llava", root / "ckpt", num_hidden_layers=6, vision_image_size=64, text_initializer_range=0.2,
                         text_rope_parameters={"rope_type": "default", "rope_theta": 1e9})
    return root / "ckpt", data, images


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def recomputed(report: dict, ratios: list, config: dict):
    """The cost model applied to the written schedule and the report's token counts."""
    tokens = report["tokens"]
    return estimate(TextShape.from_config(config), ratios, tokens["n_vision"], tokens["n_text"])


def test_cli_meets_flops_budget_and_writes_report_and_plots(small, tmp_path):
    ckpt, data, images = small
    out = tmp_path / "calibrated"
    code, output = run("calibrate", ckpt, "--data", data, "--image-folder", images, "--out", out,
                       "--target-flops", 0.6, "--samples", 16)
    assert code == 0, output
    assert "estimated FLOPs ratio" in output and "held-out agreement" in output
    report = json.loads((out / "calibration_report.json").read_text())
    config = read_config(out)
    ratios = config["pmod"]["layer_ratios"]
    assert report["layer_ratios"] == ratios
    assert abs(report["estimate"]["flops_ratio"] - 0.6) <= 0.01
    assert abs(recomputed(report, ratios, config).flops_ratio - 0.6) <= 0.01
    assert report["budget"]["target"] == 0.6 and report["budget"]["metric"] == "flops"
    # recipe.yaml, the config's pmod section and the loaded model agree on the schedule
    recipe = Recipe.load(out / "recipe.yaml")
    assert recipe.schedule.layer_ratios(4) == ratios
    assert [i.ratio for i in layer_infos(load_pretrained(out))] == ratios
    # every layer is described
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2, 3]
    for row in report["layers"]:
        assert row["ratio"] == ratios[row["layer"]]
        assert 0 < row["arank"] and 0 < row["arank_fraction"] <= 1
        assert -1 <= row["vision_cosine"] <= 1 and 0 < row["text_to_vision"] < 1
    assert report["samples"]["total"] == 16 and report["samples"]["held_out"] == 4
    assert set(report["warm_start"]["zero_routers"]) >= {"top1", "kl", "positions"}
    for name in ("calibration_layers.png", "calibration_budget.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.size[0] > 400 and png.size[1] > 300
    assert {p.name for p in ckpt.iterdir()} - {"model.safetensors", "config.json"} <= {p.name for p in out.iterdir()}


def test_paper_convention_budget_is_met_in_the_papers_count_and_stated(small, tmp_path):
    ckpt, data, images = small
    out = tmp_path / "paper"
    code, output = run("calibrate", ckpt, "--data", data, "--image-folder", images, "--out", out,
                       "--target-flops", 0.6, "--samples", 12, "--convention", "paper", "--no-warm-start")
    assert code == 0, output
    assert "paper convention" in " ".join(output.split()) and "vision +" in output
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["budget"]["convention"] == "paper"
    config = read_config(out)
    ratios, tokens = config["pmod"]["layer_ratios"], report["tokens"]
    paper = estimate(TextShape.from_config(config), ratios, tokens["n_vision"], tokens["n_text"], convention="paper")
    exact = recomputed(report, ratios, config)
    assert abs(paper.flops_ratio - 0.6) <= 0.01 and abs(report["estimate"]["flops_ratio"] - paper.flops_ratio) < 1e-9
    assert abs(exact.flops_ratio - paper.flops_ratio) > 1e-4  # the two counts really differ
    code, output = run("calibrate", ckpt, "--data", data, "--out", tmp_path / "bad", "--target-flops", 0.6,
                       "--convention", "tflops")
    assert code != 0 and "--convention must be one of exact, paper" in output and not (tmp_path / "bad").exists()


def test_same_seed_same_report(small, tmp_path):
    ckpt, data, images = small
    kwargs = {"target_flops": 0.6, "samples": 12, "seed": 3, "progress": False}
    first = calibrate(ckpt, data, images, out=tmp_path / "a", **kwargs)
    second = calibrate(ckpt, data, images, out=tmp_path / "b", **kwargs)
    assert (tmp_path / "a" / "calibration_report.json").read_text() == (tmp_path / "b" / "calibration_report.json").read_text()
    assert first.report == second.report
    other = calibrate(ckpt, data, images, out=tmp_path / "c", **{**kwargs, "seed": 4})
    assert other.report["samples"]["held_out_ids"] != first.report["samples"]["held_out_ids"]


def test_impossible_budget_is_one_line_and_writes_nothing(small, tmp_path):
    ckpt, data, images = small
    out = tmp_path / "never"
    code, output = run("calibrate", ckpt, "--data", data, "--image-folder", images, "--out", out,
                       "--target-flops", 0.2)
    assert code != 0
    # (progress bars erase themselves on a terminal; here they are captured alongside the error)
    lines = [line for line in output.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert "0.2" in lines[0] and "reachable 0." in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
    code, output = run("calibrate", ckpt, "--data", data, "--out", out)
    assert code != 0 and "exactly one budget" in output and not out.exists()


@pytest.mark.parametrize("selection,shape,profile", [
    ("prd", "cosine", "arank"), ("arank", "cosine", "arank"), ("prd", "measured", "arank"),
    ("arank", "measured", "arank"), ("prd", "measured", "vision_change")])
def test_layer_selection_and_shape_meet_the_same_budget(peaked, tmp_path, selection, shape, profile):
    ckpt, data, images = peaked
    result = calibrate(ckpt, data, images, out=tmp_path / "out", target_flops=0.6, layer_selection=selection,
                       shape=shape, profile=profile, warm_start=False, samples=12, holdout=0, progress=False)
    report = result.report
    config = read_config(tmp_path / "out")
    assert abs(recomputed(report, result.ratios, config).flops_ratio - 0.6) <= 0.01
    assert abs(report["estimate"]["flops_ratio"] - 0.6) <= 0.01
    arank = [row["arank_fraction"] for row in report["layers"]]
    assert len(set(arank)) > 3  # the measurement separates the layers
    keep = [1.0 if r is None else r for r in result.ratios]
    if selection == "arank":
        # the less redundant (higher ARank) a layer, the more vision tokens it keeps
        for i in range(6):
            for j in range(6):
                if arank[i] > arank[j]:
                    assert keep[i] >= keep[j], (arank, keep)
    else:
        assert keep == sorted(keep, reverse=True)  # depth order: deeper layers keep fewer
    if selection == "prd" and shape == "cosine":
        assert result.schedule.kind == "shiftedcos"
    else:
        assert result.schedule.kind == "explicit"
    if shape == "measured":
        signal = {"arank": lambda row: row["arank_fraction"], "vision_change": lambda row: 1 - row["vision_cosine"]}
        assert all(row["profile"] == pytest.approx(signal[profile](row)) for row in report["layers"])


def test_warm_start_agrees_with_the_dense_model_better_than_zero_routers(peaked, tmp_path):
    ckpt, data, images = peaked
    result = calibrate(ckpt, data, images, out=tmp_path / "out", target_flops=0.6, samples=48, seed=0,
                       progress=False)
    figures = result.report["warm_start"]
    zero, warm = figures["zero_routers"], figures["warm_start"]
    assert zero["positions"] == warm["positions"] >= 200
    # a clear margin, on held-out samples, at the same schedule
    assert warm["kl"] < 0.95 * zero["kl"], figures
    assert warm["top1"] > zero["top1"] + 0.02, figures
    # the chosen routers are in the checkpoint; the others stayed zero
    routers = read_routers(tmp_path / "out")
    chosen = [row for row in result.report["layers"] if row["router"] is not None]
    assert any(row["router"]["choice"] != "zero" for row in chosen)
    for row in chosen:
        weight = routers[(row["layer"], "weight")]
        assert (float(weight.norm()) > 0) == (row["router"]["choice"] != "zero")
    # logits stay small: TanhNorm weights within a few percent of 1 on calibration tokens
    model = load_pretrained(tmp_path / "out")
    layer = next(row["layer"] for row in chosen if row["router"]["choice"] != "zero")
    from pmod_convert.adapters import get_adapter
    from pmod_convert.data import SampleEncoder, model_inputs, read_samples

    encoder = SampleEncoder.from_pretrained(tmp_path / "out")
    item = encoder.encode(read_samples(data, images).samples[0])
    captured = {}
    decoder = get_adapter(model).decoder_layers(model)[layer]
    handle = decoder.register_forward_pre_hook(lambda m, args, kwargs: captured.update(x=args[0] if args else kwargs["hidden_states"]),
                                               with_kwargs=True)
    with torch.no_grad():
        model(**model_inputs(item))
    handle.remove()
    vision = item["input_ids"][0] == model.config.image_token_id
    router = decoder.pmod_router
    with torch.no_grad():
        logits = router.logits(captured["x"])[0, vision]
        weights = router.token_weights(logits)
    assert float((weights - 1).abs().max()) < 0.1 and float(logits.std()) > 0.01


def test_in_place_update_of_a_pmod_checkpoint_keeps_its_router_settings(small, tmp_path):
    ckpt, data, images = small
    pmod = tmp_path / "pmod"
    convert(ckpt, pmod, Recipe(router=RouterSettings(tanh_alpha=0.3)))
    before = read_config(pmod)["pmod"]["layer_ratios"]
    result = calibrate(pmod, data, images, target_kv=0.7, samples=12, progress=False)
    assert result.path == pmod
    config = read_config(pmod)
    assert config["pmod"]["router"]["tanh_alpha"] == 0.3
    assert config["pmod"]["layer_ratios"] == result.ratios != before
    assert abs(result.report["estimate"]["kv_ratio"] - 0.7) <= 0.01
    assert (pmod / "calibration_report.json").is_file() and (pmod / "recipe.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pmod"]  # no temporary folders left behind
    assert all(info.tanh_alpha == 0.3 for info in layer_infos(load_pretrained(pmod)) if info.ratio is not None)


def test_vision_tower_budget_and_bad_input(small, tmp_path):
    ckpt, data, images = small
    result = calibrate(ckpt, data, images, out=tmp_path / "out", target_flops=0.8, include_vision_tower=True,
                       warm_start=False, holdout=0, samples=8, progress=False)
    est = result.report["estimate"]
    assert est["vision_flops"] > 0 and abs(est["flops_ratio"] - 0.8) <= 0.01
    assert est["decoder_flops_ratio"] < est["flops_ratio"]
    assert result.report["warm_start"]["zero_routers"] is None
    with pytest.raises(CheckpointError, match="already exists"):
        calibrate(ckpt, data, images, out=tmp_path / "out", target_flops=0.8, progress=False)
    with pytest.raises(RecipeError, match="constant schedule"):
        calibrate(ckpt, data, images, out=tmp_path / "x", target_flops=0.8, schedule="constant",
                  layer_selection="arank", progress=False)
    (tmp_path / "sidecar" / "pmod_adapter").mkdir(parents=True)
    for f in ckpt.iterdir():
        (tmp_path / "sidecar" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="sidecar"):
        calibrate(tmp_path / "sidecar", data, images, target_flops=0.8, progress=False)


def test_the_search_keeps_the_candidate_closest_to_dense_and_saves_exactly_it(small, tmp_path):
    ckpt, data, images = small
    result = calibrate(ckpt, data, images, out=tmp_path / "auto", target_flops=0.7, samples=16, seed=0,
                       progress=False)
    search = result.report["search"]["candidates"]
    assert {(c["schedule"], c["scorer"]) for c in search} == {
        (k, s) for k in ("shiftedcos", "shiftedlinear", "constant") for s in ("router", "attention")}
    measured = [c for c in search if c["ratios"] is not None and c["same_as"] is None]
    assert all(c["validation_kl"] is not None for c in measured)
    # on this 4-layer model the curve already keeps layer 0 dense: "first layers dense" repeats it, measured once
    repeats = [c for c in search if c["same_as"] is not None]
    assert repeats, [(c["schedule"], c["dense_first"], c["ratios"]) for c in search]
    for c in repeats:
        first = search[c["same_as"]]
        assert (first["ratios"], first["scorer"]) == (c["ratios"], c["scorer"]) and c["validation_kl"] is None
    chosen = [c for c in measured if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["validation_kl"] == min(c["validation_kl"] for c in measured)
    config = read_config(tmp_path / "auto")["pmod"]
    assert config["layer_ratios"] == chosen[0]["ratios"] == result.ratios
    expected = None if chosen[0]["scorer"] == "router" else [None if r is None else "attention" for r in result.ratios]
    assert config.get("scorer") == expected
    # an explicit scorer and schedule: one candidate, its cost in the budget, the scorer in config.json
    one = calibrate(ckpt, data, images, out=tmp_path / "att", target_flops=0.7, samples=16, seed=0,
                    schedule="shiftedcos", scorer="attention", progress=False)
    assert [(c["schedule"], c["scorer"]) for c in one.report["search"]["candidates"]] == [("shiftedcos", "attention")]
    assert abs(one.report["budget"]["achieved"] - 0.7) <= 0.01
    saved = read_config(tmp_path / "att")["pmod"]
    assert saved["scorer"] == [None if r is None else "attention" for r in saved["layer_ratios"]]
    assert all(row["scorer"] in (None, "attention") for row in one.report["layers"])
    model = load_pretrained(tmp_path / "att")
    from pmod_convert.mod.router import layer_scorers

    assert layer_scorers(model.model.language_model.layers) == saved["scorer"]
    with pytest.raises(RecipeError, match="--scorer"):
        calibrate(ckpt, data, images, out=tmp_path / "bad", target_flops=0.7, scorer="oracle", progress=False)
