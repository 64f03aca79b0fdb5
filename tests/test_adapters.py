"""Adapters + tiny models: build, layer path, dummy inputs (forward/generate), LoRA regex, save/load."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from pmod_convert.adapters import adapter_by_family, all_adapters, get_adapter, supported_families
from pmod_convert.errors import UnsupportedArchitecture
from pmod_convert.tiny import RESERVED, build_tiny_model, save_tiny_checkpoint

ADAPTERS = all_adapters()
FAMILIES = [a.family for a in ADAPTERS]

# Batch-2 dummy_inputs kwargs giving rows with different vision-token counts.  LLaVA-1.5 images
# are fixed-size, so it varies the number of images; the others vary image sizes (the default).
VARIED = {a.family: dict(a.tiny_varied) for a in ADAPTERS}

_MODELS: dict[tuple, tuple] = {}


def tiny(family: str, attn: str = "sdpa"):
    key = (family, attn)
    if key not in _MODELS:
        _MODELS[key] = build_tiny_model(family, attn_implementation=attn)
    return _MODELS[key]


def vision_counts(adapter, config, input_ids):
    ids = torch.tensor(adapter.vision_token_ids(config))
    return torch.isin(input_ids, ids).sum(-1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_builds_with_layers_and_vocab(family):
    adapter = adapter_by_family(family)
    model, config = tiny(family)
    assert not model.training
    assert get_adapter(model) is adapter and get_adapter(config) is adapter
    assert get_adapter({"model_type": config.model_type}) is adapter
    assert type(model).__name__ == adapter.model_class
    text = adapter.text_config(config)
    layers = adapter.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == text.num_hidden_layers == 4
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
    ids = adapter.vision_token_ids(config)
    assert ids and len(ids) == len(adapter.vision_token_attrs)
    specials = {text.pad_token_id, text.bos_token_id, text.eos_token_id}
    for i in ids:
        assert 0 <= i < min(text.vocab_size, RESERVED) and i not in specials
    assert model.get_input_embeddings().num_embeddings == text.vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_overrides(family):
    adapter = adapter_by_family(family)
    model, config = build_tiny_model(family, num_hidden_layers=2, hidden_size=96, intermediate_size=160,
                                     num_attention_heads=6, num_key_value_heads=3, vocab_size=256,
                                     attn_implementation="eager")
    text = adapter.text_config(config)
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (2, 96, 160)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (6, 3, 256)
    assert len(adapter.decoder_layers(model)) == 2
    assert config._attn_implementation == "eager" and text._attn_implementation == "eager"
    inputs = adapter.dummy_inputs(config, batch_size=1)
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == 256


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dummy_inputs_forward_and_generate(family, attn):
    adapter = adapter_by_family(family)
    model, config = tiny(family, attn)
    assert config._attn_implementation == attn
    assert adapter.text_config(config)._attn_implementation == attn
    inputs = adapter.dummy_inputs(config, batch_size=2, text_lengths=[5, 9], seed=3, **VARIED.get(family, {}))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    counts = vision_counts(adapter, config, ids)
    assert counts[0] != counts[1] and min(counts) > 0
    assert ((ids >= RESERVED) & mask.bool()).sum(-1).tolist() == [5, 9]  # text never uses special ids
    lengths = mask.sum(-1)
    assert lengths[0] != lengths[1]
    short = int(lengths.argmin())
    assert mask[short, 0] == 0 and mask[:, -1].all()  # left padding
    with torch.no_grad():
        out = model(**inputs)
        assert out.logits.shape == (*ids.shape, adapter.text_config(config).vocab_size)
        assert torch.isfinite(out.logits).all()
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, ids.shape[1] + 3)
    # deterministic given the seed
    again = adapter.dummy_inputs(config, batch_size=2, text_lengths=[5, 9], seed=3, **VARIED.get(family, {}))
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_without_images_and_right_padding(family):
    adapter = adapter_by_family(family)
    model, config = tiny(family)
    inputs = adapter.dummy_inputs(config, batch_size=3, images_per_row=[0, 2, 1], padding_side="right")
    counts = vision_counts(adapter, config, inputs["input_ids"])
    assert counts[0] == 0 and counts[1] > 0 and counts[2] > 0
    assert inputs["attention_mask"][:, 0].all()
    with torch.no_grad():
        model(**inputs)
    text_only = adapter.dummy_inputs(config, batch_size=2, images_per_row=0)
    assert not any(k.startswith("pixel_values") for k in text_only)
    with torch.no_grad():
        model(**text_only)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_regex_targets_language_model_only(family):
    adapter = adapter_by_family(family)
    model, config = tiny(family)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    matched = [n for n in linears if re.fullmatch(adapter.lora_target_regex, n)]
    n_layers = adapter.text_config(config).num_hidden_layers
    assert len(matched) == 7 * n_layers
    assert all(n.startswith(adapter.layers_path + ".") for n in matched)
    for n in matched:
        assert not any(s in n for s in adapter.never_quantize), n
    vision = [n for n in linears if any(s in n for s in adapter.never_quantize if s != "lm_head")]
    assert vision, "expected vision tower / projector linears in the tiny model"
    assert not any(re.fullmatch(adapter.lora_target_regex, n) for n in vision)
    assert not re.fullmatch(adapter.lora_target_regex, f"{adapter.layers_path}.0.pmod_router")
    assert not re.fullmatch(adapter.lora_target_regex, "lm_head")


def test_lora_regex_with_peft():
    peft = pytest.importorskip("peft")
    adapter = adapter_by_family("qwen2_vl")
    model, _ = build_tiny_model("qwen2_vl", num_hidden_layers=2)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=adapter.lora_target_regex))
    wrapped = [n for n, m in lora.named_modules() if hasattr(m, "lora_A") and isinstance(m, nn.Module)
               and type(m).__name__ == "Linear" and "lora_" not in n.rsplit(".", 1)[-1]]
    assert len(wrapped) == 14 and all(".language_model.layers." in n for n in wrapped)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_tiny_checkpoint_roundtrip(family, tmp_path):
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    adapter = adapter_by_family(family)
    model, config = save_tiny_checkpoint(family, tmp_path, num_hidden_layers=2)
    assert (tmp_path / "model.safetensors").exists()
    loaded_config = AutoConfig.from_pretrained(tmp_path)
    assert loaded_config.model_type == config.model_type and get_adapter(loaded_config) is adapter
    loaded = adapter.model_cls().from_pretrained(tmp_path).eval()
    assert len(adapter.decoder_layers(loaded)) == 2
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    inputs = adapter.dummy_inputs(config, batch_size=1)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, loaded(**inputs).logits)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for attr, token_id in zip(adapter.vision_token_attrs, adapter.vision_token_ids(config)):
        token = tokenizer.convert_ids_to_tokens(token_id)
        assert token.startswith("<") and tokenizer.convert_tokens_to_ids(token) == token_id, attr
    assert tokenizer.pad_token_id == adapter.text_config(config).pad_token_id
    assert AutoImageProcessor.from_pretrained(tmp_path) is not None
    if (tmp_path / "processor_config.json").exists():
        processor = AutoProcessor.from_pretrained(tmp_path)
        assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == config.image_token_id


@pytest.mark.parametrize("bad", ["llama_config", {"model_type": "bert"}, {"no": "type"}])
def test_unsupported_architecture(bad):
    from transformers import LlamaConfig

    obj = LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2) \
        if bad == "llama_config" else bad
    with pytest.raises(UnsupportedArchitecture) as info:
        get_adapter(obj)
    message = str(info.value)
    for fam in supported_families():
        assert fam in message
    with pytest.raises(UnsupportedArchitecture, match="supported families"):
        adapter_by_family("bert")


def test_expected_families_registered():
    assert set(FAMILIES) >= {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3"}


@pytest.mark.parametrize("family", FAMILIES)
def test_projector_and_never_quantize_name_real_modules(family):
    model, _ = build_tiny_model(family)
    names = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()]
    adapter = adapter_by_family(family)
    assert adapter.projector and any(n.endswith(adapter.projector) for n in names)
    for part in adapter.never_quantize:
        if part != "pmod_router":  # routers exist only after add_routers
            assert any(part in n.split(".") or n.endswith(part) for n in names), part
