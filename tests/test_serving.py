"""``export --dense``: a plain dense folder that strict loaders and plain transformers accept, equal to the dense
model (issue 16 item 3)."""

import json

import torch
from conftest import batch_inputs, one_error_line, randomize_routers, run, snapshot
from safetensors import safe_open

from pmod_convert.api import load_dense, load_pretrained
from pmod_convert.export import export_dense, load_plain, strip_routers
from pmod_convert.mod.router import ROUTER_NAME


def tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_export_dense_writes_the_dense_model_without_routers(dense, mod, tmp_path):
    out = tmp_path / "served"
    code, output = run("export", mod, "--out", out, "--dense")
    assert code == 0, output
    assert "MoD savings are lost" in output
    config = json.loads((out / "config.json").read_text())
    assert "pmod" not in config
    assert not (out / "recipe.yaml").exists() and not (out / "pmod_manifest.json").exists()
    assert (out / "chat_template.jinja").exists() or (out / "tokenizer_config.json").exists()

    # Strict: exactly the dense checkpoint's tensors, bit for bit (mod = dense + routers, no LoRA).
    written, original = tensors(out), tensors(dense)
    assert not [k for k in written if ROUTER_NAME in k]
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)

    # Plain transformers loads it with nothing missing or unexpected, and it computes the dense logits.
    plain = load_plain(out)
    reference = load_dense(dense)
    inputs = batch_inputs("llava", reference.config)
    torch.testing.assert_close(logits(plain, inputs), logits(reference, inputs), rtol=0, atol=0)


def test_export_dense_keeps_the_dense_fallback_of_trained_weights(mod, tmp_path):
    # Routers that route (non-zero): the dense folder still equals the MoD model with routing off.
    from pmod_convert import save_pretrained
    from pmod_convert.mod.context import routing_disabled

    model = load_pretrained(mod)
    randomize_routers(model)
    save_pretrained(model, tmp_path / "trained", source=mod)
    result = export_dense(tmp_path / "trained", tmp_path / "served", progress=False)
    assert result.router_tensors_removed == 2 * len(load_pretrained(mod).config.pmod["mod_layers"])
    assert result.max_abs_logit_diff == 0.0
    inputs = batch_inputs("llava", model.config)
    with routing_disabled(model):
        expected = logits(model, inputs)
    torch.testing.assert_close(logits(load_plain(tmp_path / "served"), inputs), expected, rtol=0, atol=0)


def test_strip_routers_rewrites_every_shard_and_the_index(mod, tmp_path):
    model = load_pretrained(mod)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = {v for v in index["weight_map"].values()}
    assert len(shards) > 1
    routers = [k for k in index["weight_map"] if ROUTER_NAME in k]
    removed, removed_bytes = strip_routers(tmp_path / "sharded")
    assert removed == len(routers) > 0 and removed_bytes > 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert not [k for k in index["weight_map"] if ROUTER_NAME in k]
    assert set(index["weight_map"]) == set(tensors(tmp_path / "sharded"))
    assert "pmod" not in json.loads((tmp_path / "sharded" / "config.json").read_text())


def test_export_dense_refuses_quantize_options_and_export_needs_a_mode(mod, tmp_path):
    before = snapshot(mod)
    code, output = run("export", mod, "--out", tmp_path / "x", "--dense", "--quantize", "nf4")
    assert code != 0 and "--dense writes an unquantized plain folder" in one_error_line(output)
    code, output = run("export", mod, "--out", tmp_path / "y")
    assert code != 0 and "--quantize none|int8|nf4|fp4" in one_error_line(output)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert snapshot(mod) == before


def test_export_dense_merges_the_finetune_sidecar(dense, tmp_path):
    """A finetuned checkpoint (LoRA + routers sidecar): the dense folder computes the LoRA-adapted model with routing
    off (the merge is real: it differs from the original dense model)."""
    from peft import LoraConfig, get_peft_model

    from pmod_convert import add_routers, save_pretrained
    from pmod_convert.adapters import adapter_by_family
    from pmod_convert.mod.context import routing_disabled
    from pmod_convert.sidecar import save_sidecar
    from conftest import CONSTANT

    model = load_dense(dense)
    add_routers(model, CONSTANT)
    ckpt = save_pretrained(model, tmp_path / "mod", source=dense)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                                  target_modules=adapter_by_family("llava").lora_target_regex))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or ROUTER_NAME in name:
                p.normal_(std=0.2)
    peft_model.eval()
    save_sidecar(peft_model, ckpt, summary={"steps": 0})
    inputs = batch_inputs("llava", model.config)
    with routing_disabled(peft_model):
        expected = logits(peft_model, inputs)

    result = export_dense(ckpt, tmp_path / "served", progress=False)
    assert result.lora_merged
    served = logits(load_plain(tmp_path / "served"), inputs)
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)
    assert (served - logits(load_dense(dense), inputs)).abs().max() > 1e-3
