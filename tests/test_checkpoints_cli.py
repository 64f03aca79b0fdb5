"""add-routers -> save -> load_pretrained, the dense fallback, and the CLI's handling of bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from pmod_convert import Recipe, ScheduleSettings, add_routers, layer_infos, load_pretrained, save_pretrained
from pmod_convert.adapters import adapter_by_family
from pmod_convert.cli import app
from pmod_convert.tiny import RESERVED, save_tiny_checkpoint

runner = CliRunner()
SPECIAL_IDS = list(range(RESERVED))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for family in ("llava", "qwen2_vl", "idefics3"):
        paths[family] = root / family
        save_tiny_checkpoint(family, paths[family], num_hidden_layers=6)
    return paths


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_cli_add_routers_then_load_and_generate(family, checkpoints, tmp_path):
    out = tmp_path / "mod"
    code, output = run("add-routers", checkpoints[family], "--out", out)
    assert code == 0, output
    assert "MoD layers" in output
    config = json.loads((out / "config.json").read_text())
    pmod = config["pmod"]
    assert pmod["family"] == family and len(pmod["layer_ratios"]) == 6
    assert pmod["router"] == {"tanh_alpha": 0.2, "tanh_beta": 1.0, "bias": True}
    assert (out / "recipe.yaml").is_file() and Recipe.load(out / "recipe.yaml") == Recipe()
    copied = {p.name for p in checkpoints[family].iterdir()} - {"model.safetensors", "config.json"}
    assert copied and copied <= {p.name for p in out.iterdir()}  # tokenizer / processor files
    model = load_pretrained(out)
    assert [i.ratio for i in layer_infos(model)] == pmod["layer_ratios"]
    adapter = adapter_by_family(family)
    inputs = adapter.dummy_inputs(model.config, batch_size=2)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=SPECIAL_IDS)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_save_load_reproduces_logits_and_dense_fallback(family, checkpoints, tmp_path):
    from pmod_convert.api import load_dense

    dense = load_dense(checkpoints[family])
    model = load_dense(checkpoints[family])
    add_routers(model, Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5, layers=[0, 3, 5])))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pmod_router" in name:
                p.normal_(std=0.3)
    out = save_pretrained(model, tmp_path / "saved", source=checkpoints[family])
    inputs = adapter_by_family(family).dummy_inputs(model.config, batch_size=2)
    ok = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**inputs).logits
        reloaded = load_pretrained(out)(**inputs).logits
        torch.testing.assert_close(reloaded[ok], expected[ok], rtol=0, atol=0)
        # plain transformers loads the dense model and ignores the routers
        fallback = adapter_by_family(family).model_cls().from_pretrained(out)
        assert not any("pmod_router" in n for n, _ in fallback.named_parameters())
        torch.testing.assert_close(fallback(**inputs).logits[ok], dense(**inputs).logits[ok], rtol=0, atol=0)


def test_inspect_and_estimate(checkpoints, tmp_path):
    out = tmp_path / "mod"
    assert run("add-routers", checkpoints["llava"], "--out", out, "--schedule", "constant", "--ratio", "0.5",
               "--layers", "1-3")[0] == 0
    code, output = run("inspect", out, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert [row["kind"] for row in report["layers"]] == ["dense", "MoD", "MoD", "MoD", "dense", "dense"]
    assert report["layers"][1]["ratio"] == 0.5 and report["layers"][1]["router_weight_norm"] == 0.0
    assert 0 < report["estimate"]["flops_ratio"] < 1
    code, output = run("inspect", out, "--vision-tokens", "36", "--text-tokens", "10")
    assert code == 0 and "decoder" in output
    code, output = run("inspect", out, "--json", "--vision-tokens", "36", "--text-tokens", "10")
    from_checkpoint = json.loads(output)["estimate"]
    code, output = run("estimate", "--config", out / "config.json", "--vision-tokens", "36", "--text-tokens", "10",
                       "--ratio", "0.5", "--layers", "1-3", "--json")
    assert code == 0, output
    from_config = json.loads(output)
    assert from_config["num_mod_layers"] == 3
    assert from_config["flops_ratio"] == pytest.approx(from_checkpoint["flops_ratio"])
    assert from_config["kv_ratio"] == pytest.approx(from_checkpoint["kv_ratio"])
    # 3 of 6 layers keep 18 of 36 vision tokens: cached tokens 3*46 + 3*28 of 6*46
    assert from_config["kv_ratio"] == pytest.approx((3 * 46 + 3 * 28) / (6 * 46))


def test_estimate_llava_next_7b_near_published(tmp_path):
    from transformers import LlamaConfig, LlavaNextConfig

    LlavaNextConfig(text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
                    ).save_pretrained(tmp_path)
    code, output = run("estimate", "--config", tmp_path, "--vision-tokens", "2880", "--text-tokens", "100", "--json")
    assert code == 0, output
    est = json.loads(output)
    assert est["num_mod_layers"] == 24
    assert est["flops_ratio"] == pytest.approx(0.556, abs=0.02)  # published: 55.6% inference TFLOPs
    assert est["kv_ratio"] == pytest.approx(0.538, abs=0.02)  # published: 53.8% KV cache


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.5"], "ratio must be in (0, 1]"),
    (["--ratio", "0"], "ratio must be in (0, 1]"),
    (["--min-ratio", "0.9", "--max-ratio", "0.5"], "must not exceed"),
    (["--layers", "2-40"], "outside 0..5"),
    (["--layers", "a,b"], "--layers must look like"),
    (["--schedule", "zigzag"], "unknown schedule"),
    (["--dtype", "float8"], "dtype must be one of"),
])
def test_add_routers_bad_options(args, message, checkpoints, tmp_path):
    out = tmp_path / "never"
    code, output = run("add-routers", checkpoints["llava"], "--out", out, *args)
    assert code != 0
    assert message in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_add_routers_bad_sources_and_recipes(checkpoints, tmp_path):
    out = tmp_path / "never"
    code, output = run("add-routers", tmp_path / "missing", "--out", out)
    assert code != 0 and "does not exist" in output
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(text_only)
    code, output = run("add-routers", text_only, "--out", out)
    assert code != 0 and "supported families" in output and "llava" in output
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("schedule:\n  kind: constant\n  ratio: 0.5\n  ratioo: 0.2\n")
    code, output = run("add-routers", checkpoints["llava"], "--out", out, "--recipe", recipe)
    assert code != 0 and "unknown key(s) ratioo" in output
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = run("add-routers", empty, "--out", out)
    assert code != 0 and "no config.json" in output
    assert not out.exists()
    code, output = run("inspect", checkpoints["llava"])  # a dense checkpoint
    assert code != 0 and "not a pmod-convert checkpoint" in output


def test_existing_out_is_refused_unless_overwrite(checkpoints, tmp_path):
    out = tmp_path / "mod"
    assert run("add-routers", checkpoints["llava"], "--out", out)[0] == 0
    code, output = run("add-routers", checkpoints["llava"], "--out", out, "--ratio", "0.5")
    assert code != 0 and "already exists" in output
    code, output = run("add-routers", checkpoints["llava"], "--out", out, "--ratio", "0.5", "--overwrite")
    assert code == 0, output
    assert json.loads((out / "config.json").read_text())["pmod"]["layer_ratios"] == [0.5] * 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mod"]  # no temporary folders left


def test_load_pretrained_reports_missing_routers(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "mod"
    assert run("add-routers", checkpoints["llava"], "--out", out)[0] == 0
    weights = load_file(out / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "pmod_router" not in k}, out / "model.safetensors",
              metadata={"format": "pt"})
    from pmod_convert import CheckpointError

    with pytest.raises(CheckpointError, match="lacks the router"):
        load_pretrained(out)
