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
    assert len(matched) == adapter.lora_per_layer * n_layers
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
        assert token != tokenizer.unk_token and tokenizer.convert_tokens_to_ids(token) == token_id, attr
    assert tokenizer.pad_token_id == adapter.text_config(config).pad_token_id
    assert AutoImageProcessor.from_pretrained(tmp_path) is not None
    if (tmp_path / "processor_config.json").exists():
        processor = AutoProcessor.from_pretrained(tmp_path)
        # the processor's placeholder: its image_token_id (Aya: <|IMG_PATCH|>) or the tokenizer's image token
        # (Gemma 3's processor names <start_of_image> its image token and expands it into <image_soft_token>)
        named = getattr(processor.tokenizer, "image_token", None) or processor.image_token
        ids = {getattr(processor, "image_token_id", None), processor.tokenizer.convert_tokens_to_ids(named)}
        assert config.image_token_id in ids


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
    assert set(FAMILIES) >= {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm",
                             "qwen3_vl", "qwen3_vl_moe", "gemma3", "internvl", "mistral3", "llava_next_video",
                             "aya_vision", "glm4v", "paligemma"}
    assert len(FAMILIES) >= 14


@pytest.mark.parametrize("family", FAMILIES)
def test_projector_and_never_quantize_name_real_modules(family):
    model, _ = build_tiny_model(family)
    names = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()]
    adapter = adapter_by_family(family)
    assert adapter.projector and any(n.endswith(adapter.projector) for n in names)
    for part in adapter.never_quantize:
        if part != "pmod_router":  # routers exist only after add_routers
            assert any(part in n.split(".") or n.endswith(part) for n in names), part


# ---- the rest of the shared contract, per family ---------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_pretrained_reproduces_logits_and_transformers_loads_dense(family, tmp_path):
    """save_pretrained -> load_pretrained gives the same MoD logits; plain transformers loads the dense model."""
    import copy

    from conftest import constant, randomize_routers

    from pmod_convert import add_routers, load_pretrained, save_pretrained

    adapter = adapter_by_family(family)
    dense, config = tiny(family)
    mod = add_routers(copy.deepcopy(dense), constant(0.5, layers=[1, 3]))
    randomize_routers(mod)
    save_pretrained(mod, tmp_path / "mod")
    inputs = adapter.dummy_inputs(config, batch_size=2, seed=5, **VARIED[family])
    ok = inputs["attention_mask"].bool()
    loaded = load_pretrained(tmp_path / "mod")
    plain = adapter.model_cls().from_pretrained(tmp_path / "mod").eval()
    with torch.no_grad():
        ref, out = mod(**inputs).logits, loaded(**inputs).logits
        fallback, dense_logits = plain(**inputs).logits, dense(**inputs).logits
    torch.testing.assert_close(out[ok], ref[ok], rtol=0, atol=1e-6)
    torch.testing.assert_close(fallback[ok], dense_logits[ok], rtol=0, atol=1e-6)
    assert not torch.allclose(ref[ok], dense_logits[ok])  # the routers did something


def _contract(family, model, config, inputs, layers, ratio=0.5, new_tokens=6, **gen):
    """ratio 1.0 fresh routers == dense; with random routers cached greedy generation == uncached."""
    import copy

    from conftest import constant, randomize_routers

    from pmod_convert import add_routers

    ok = inputs["attention_mask"].bool()
    one = add_routers(copy.deepcopy(model), constant(1.0))
    with torch.no_grad():
        torch.testing.assert_close(one(**inputs).logits[ok], model(**inputs).logits[ok], rtol=0, atol=1e-6)
    mod = add_routers(copy.deepcopy(model), constant(ratio, layers=layers))
    randomize_routers(mod)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, suppress_tokens=list(range(RESERVED)), **gen)
    with torch.no_grad():
        cached = mod.generate(**inputs, **kw)
        uncached = mod.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    return mod


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma3_sliding_window_and_bidirectional_images(attn):
    """A window (12) shorter than the prompt: sliding layers drop MoD cache entries outside it in prefill and in
    cached decode; image tokens attend to each other bidirectionally, among the kept ones too."""
    adapter = adapter_by_family("gemma3")
    model, config = build_tiny_model("gemma3", attn_implementation=attn, text_sliding_window=12)
    inputs = adapter.dummy_inputs(config, batch_size=2, seed=1, images_per_row=[1, 2])
    assert inputs["input_ids"].shape[1] > 3 * 12
    mod = _contract("gemma3", model, config, inputs, layers=[0, 1, 2, 3])
    # bidirectional inside an image: the first image token's output changes when the image block is made causal
    # (token_type_ids all 0), in the dense and in the MoD model
    row = adapter.dummy_inputs(config, batch_size=1, seed=2, images_per_row=[1])
    first = int((row["input_ids"][0] == config.image_token_id).nonzero()[0])
    causal = {**row, "token_type_ids": torch.zeros_like(row["token_type_ids"])}
    for m in (model, mod):
        with torch.no_grad():
            assert not torch.allclose(m(**row).logits[0, first], m(**causal).logits[0, first])
    with torch.no_grad():
        cache = mod(**adapter.dummy_inputs(config, batch_size=1, seed=3), use_cache=True).cache
    sliding = [i for i, t in enumerate(config.text_config.layer_types) if t == "sliding_attention"]
    assert all(int(cache.layers[i].kept_lengths().max()) <= 12 for i in sliding)


def test_paligemma2_prefix_lm_mask():
    """PaliGemma 2 (Gemma 2 decoder, eager): the prefix attends bidirectionally (an early prefix token's output depends
    on a later prefix token), in the dense and in the MoD model; the contract holds."""
    adapter = adapter_by_family("paligemma")
    model, config = build_tiny_model("paligemma", attn_implementation="eager", text_model_type="gemma2")
    assert config.text_config.model_type == "gemma2"
    assert adapter.string_branch(config) == "post_feedforward_layernorm"
    inputs = adapter.dummy_inputs(config, batch_size=2, seed=1, images_per_row=[1, 2])
    mod = _contract("paligemma", model, config, inputs, layers=[0, 1, 3])
    row = adapter.dummy_inputs(config, batch_size=1, seed=4)
    first_text = int((row["input_ids"][0] == config.text_config.bos_token_id).nonzero()[0]) + 1
    later = {k: v.clone() for k, v in row.items()}
    later["input_ids"][0, -1] = RESERVED + (int(later["input_ids"][0, -1]) - RESERVED + 1) % 200
    for m in (model, mod):
        with torch.no_grad():
            a, b = m(**row).logits[0, first_text], m(**later).logits[0, first_text]
        assert not torch.allclose(a, b)  # a causal mask would make these equal
    causal = {**row, "token_type_ids": torch.ones_like(row["token_type_ids"])}
    causal_later = {**later, "token_type_ids": torch.ones_like(row["token_type_ids"])}
    with torch.no_grad():
        torch.testing.assert_close(model(**causal).logits[0, first_text], model(**causal_later).logits[0, first_text])


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_deepstack_layers_route(family):
    """DeepStack adds early vision features to the vision positions after decoder layers 0 and 1: MoD layers there
    (and in the sparse-MoE variant, whose MLP is a MoE block) keep the contract."""
    adapter = adapter_by_family(family)
    model, config = tiny(family)
    assert list(config.vision_config.deepstack_visual_indexes) == [0, 1]
    inputs = adapter.dummy_inputs(config, batch_size=2, seed=1)
    mod = _contract(family, model, config, inputs, layers=[0, 1])
    with torch.no_grad():
        mod(**inputs)
    for layer in adapter.decoder_layers(mod)[:2]:
        targets, kept = layer.pmod_last_counts
        assert torch.equal(kept, torch.floor(targets * 0.5).long())


def test_llava_next_video_routes_video_tokens():
    adapter = adapter_by_family("llava_next_video")
    model, config = tiny("llava_next_video")
    inputs = adapter.dummy_inputs(config, batch_size=2, seed=1, videos_per_row=[1, 0])
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == 16
    mod = _contract("llava_next_video", model, config, inputs, layers=[0, 2])
    with torch.no_grad():
        mod(**inputs)
    targets, _ = adapter.decoder_layers(mod)[0].pmod_last_counts
    assert targets.tolist() == vision_counts(adapter, config, inputs["input_ids"])


def test_refused_family_says_why():
    from pmod_convert.adapters import refused_families

    reasons = refused_families()
    assert "lfm2_vl" in reasons
    with pytest.raises(UnsupportedArchitecture, match="attention-only"):
        get_adapter({"model_type": "lfm2_vl"})
    assert "lfm2_vl" not in supported_families()


@pytest.mark.parametrize("family", FAMILIES)
def test_cost_model_and_bench_layout_come_from_the_adapter(family):
    """efficiency and bench hold no family tables: the adapter answers the typical image, the tower FLOPs (also from
    the config.json dict) and the bench image layout, whose token count the dummy inputs then really have."""
    from pmod_convert.bench import build_prompts
    from pmod_convert.efficiency import default_vision_tokens, vision_tower_flops, vision_tower_flops_for_tokens

    adapter = adapter_by_family(family)
    config = adapter.tiny_config()
    info = adapter.typical_image(config)
    assert default_vision_tokens(config) == info["vision_tokens"] > 0
    assert default_vision_tokens(config.to_dict()) == info["vision_tokens"]
    assert vision_tower_flops(config, 2) == 2 * vision_tower_flops(config, 1) > 0
    assert vision_tower_flops_for_tokens(config, [0]) == 0
    inputs = adapter.dummy_inputs(config, batch_size=1, seed=0, **adapter.tiny_rows[0])
    n = vision_counts(adapter, config, inputs["input_ids"])[0]
    _, plan = build_prompts(config, batch_size=2, vision_tokens=n, text_tokens=20)
    assert plan.vision_tokens == n
