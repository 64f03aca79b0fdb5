"""No silent dense fallback: the routing switch, the did-not-route guard and every way into the model (issue 12)."""

import copy
import types

import pytest
import torch
from conftest import batch_inputs, constant, randomize_routers, tiny_model

from pmod_convert import add_routers
from pmod_convert.errors import PmodError
from pmod_convert.mod.context import routing_disabled
from pmod_convert.mod.router import ROUTER_NAME
from pmod_convert.tiny import RESERVED


def logits_of(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def ok(inputs):
    return inputs["attention_mask"].bool()


# ---- routing_disabled: the same model, dense ------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_routing_disabled_equals_dense_and_restores_routing(family):
    dense, config = tiny_model(family)
    mod = add_routers(copy.deepcopy(dense), constant(0.5, layers=[0, 2, 3]))
    randomize_routers(mod)
    inputs = batch_inputs(family, config)
    routed = logits_of(mod, inputs)
    ref = logits_of(dense, inputs)
    with routing_disabled(mod) as same:
        assert same is mod
        with routing_disabled(mod):  # nests
            pass
        teacher = logits_of(mod, inputs)
        teacher_cached = logits_of(mod, inputs, use_cache=True)
    torch.testing.assert_close(teacher[ok(inputs)], ref[ok(inputs)], rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher_cached[ok(inputs)], ref[ok(inputs)], rtol=0, atol=1e-6)
    assert not torch.allclose(routed[ok(inputs)], ref[ok(inputs)], atol=1e-4)
    torch.testing.assert_close(logits_of(mod, inputs), routed)  # routing back on after the block


def test_routing_disabled_keeps_student_routing_for_checkpoint_recompute():
    dense, config = tiny_model("llava")
    mod = add_routers(dense, constant(0.5, layers=[0, 2]))
    randomize_routers(mod, std=0.1)
    inputs = batch_inputs("llava", config)
    labels = inputs["input_ids"].masked_fill(~ok(inputs), -100)
    mod.train()
    mod.zero_grad()
    mod(**inputs, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in mod.named_parameters() if ROUTER_NAME in n}
    mod.zero_grad()
    mod.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss = mod(**inputs, labels=labels).loss
    other = batch_inputs("llava", config, seed=7)
    with routing_disabled(mod), torch.no_grad():  # a teacher forward between student forward and backward
        mod(**other)
    loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(mod.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_routing_disabled_refuses_a_dense_model():
    dense, _ = tiny_model("llava")
    with pytest.raises(ValueError, match="no MoD layers"):
        with routing_disabled(dense):
            pass


# ---- helpers for the ways in ----------------------------------------------------------------------
def dense_patched(model, index=1):
    """Make MoD layer ``index`` run its dense forward (what an accelerate hook captured before the fix did)."""
    from pmod_convert.adapters import get_adapter
    from pmod_convert.adapters.base import unwrap

    layer = get_adapter(unwrap(model)).decoder_layers(unwrap(model))[index]
    layer.forward = types.MethodType(type(layer).__mro__[2].forward, layer)
    return layer


def routed_layers(model):
    from pmod_convert.api import mod_layers
    from pmod_convert.adapters.base import unwrap

    return [i for i, layer in mod_layers(unwrap(model)) if layer.pmod_last_counts is not None]


def mod_model(family="llava", ratio=0.5, layers=(0, 1, 3), **overrides):
    dense, config = tiny_model(family, **overrides)
    mod = add_routers(dense, constant(ratio, layers=list(layers)))
    randomize_routers(mod)
    return mod, config


# ---- the guard ------------------------------------------------------------------------------------
def test_guard_raises_when_a_mod_layer_runs_dense_but_not_for_text_or_routing_disabled():
    mod, config = mod_model()
    inputs = batch_inputs("llava", config)
    dense_patched(mod, 1)
    with pytest.raises(PmodError, match=r"MoD layers \[1\] did not route"):
        logits_of(mod, inputs)
    text = {"input_ids": inputs["input_ids"][:, -4:], "attention_mask": inputs["attention_mask"][:, -4:]}
    logits_of(mod, text)  # text only: nothing to route, no error
    with routing_disabled(mod):
        logits_of(mod, inputs)  # explicitly dense: no error


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_routes_and_is_guarded(reentrant):
    mod, config = mod_model()
    inputs = batch_inputs("llava", config)
    labels = inputs["input_ids"].masked_fill(~ok(inputs), -100)
    mod.train()
    ref = mod(**inputs, labels=labels).loss
    mod.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    loss = mod(**inputs, labels=labels).loss
    assert routed_layers(mod) == [0, 1, 3]
    torch.testing.assert_close(loss, ref)
    loss.backward()
    dense_patched(mod, 3)
    with pytest.raises(PmodError, match="did not route"):
        mod(**inputs, labels=labels)


def test_peft_wrapper_routes_and_is_guarded():
    from peft import LoraConfig, get_peft_model

    from pmod_convert.adapters import adapter_by_family

    mod, config = mod_model()
    inputs = batch_inputs("llava", config)
    ref = logits_of(mod, inputs)
    peft_model = get_peft_model(mod, LoraConfig(r=4, target_modules=adapter_by_family("llava").lora_target_regex))
    torch.testing.assert_close(logits_of(peft_model, inputs), ref)  # LoRA B = 0: the same routed model
    assert routed_layers(peft_model) == [0, 1, 3]
    with routing_disabled(peft_model):
        dense_logits = logits_of(peft_model, inputs)
    assert not torch.allclose(dense_logits[ok(inputs)], ref[ok(inputs)], atol=1e-4)
    dense_patched(peft_model, 0)
    with pytest.raises(PmodError, match=r"\[0\] did not route"):
        logits_of(peft_model, inputs)


def test_torch_compile_routes_and_is_guarded():
    mod, config = mod_model()
    inputs = batch_inputs("llava", config)
    ref = logits_of(mod, inputs)
    compiled = torch.compile(mod, backend="eager")
    torch.testing.assert_close(logits_of(compiled, inputs), ref)
    assert routed_layers(mod) == [0, 1, 3]
    with routing_disabled(compiled):
        logits_of(compiled, inputs)
    dense_patched(mod, 1)
    torch._dynamo.reset()
    with pytest.raises(PmodError, match="did not route"):
        logits_of(torch.compile(mod, backend="eager"), inputs)


def test_accelerate_prepare_routes_and_is_guarded():
    from accelerate import Accelerator

    mod, config = mod_model()
    inputs = batch_inputs("llava", config)
    ref = logits_of(mod, inputs)
    prepared = Accelerator(cpu=True).prepare(mod)
    torch.testing.assert_close(logits_of(prepared, inputs), ref)
    assert routed_layers(prepared) == [0, 1, 3]
    dense_patched(prepared, 1)
    with pytest.raises(PmodError, match="did not route"):
        logits_of(prepared, inputs)


# ---- device maps with CPU / disk offload ----------------------------------------------------------
def test_device_map_with_cpu_and_disk_offload_routes_like_one_device(tmp_path):
    from pmod_convert import load_pretrained, save_pretrained
    from pmod_convert.tiny import save_tiny_checkpoint

    save_tiny_checkpoint("llava", tmp_path / "dense")
    mod, config = mod_model()
    save_pretrained(mod, tmp_path / "mod", source=tmp_path / "dense")
    one = load_pretrained(tmp_path / "mod")
    prefix = "model.language_model."
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", prefix + "embed_tokens": "cpu",
                  prefix + "layers.0": "cpu", prefix + "layers.1": "disk", prefix + "layers.2": "cpu",
                  prefix + "layers.3": "disk", prefix + "norm": "cpu", "lm_head": "cpu"}
    offloaded = load_pretrained(tmp_path / "mod", device_map=device_map)
    assert offloaded.hf_device_map[prefix + "layers.1"] == "disk"
    for name, p in offloaded.named_parameters():
        if ROUTER_NAME in name:
            assert p.device.type == "cpu", name  # never meta, even in a disk-offloaded layer
    inputs = batch_inputs("llava", config)
    ref = logits_of(one, inputs)
    torch.testing.assert_close(logits_of(offloaded, inputs), ref, rtol=0, atol=0)
    assert routed_layers(offloaded) == [0, 1, 3]
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=list(range(RESERVED)))
    with torch.no_grad():
        assert torch.equal(offloaded.generate(**inputs, **kw), one.generate(**inputs, **kw))


def test_device_map_auto_and_a_max_memory_map_route_like_one_device(tmp_path):
    """``device_map="auto"`` with and without a ``max_memory`` budget too small for the model (layers spill to
    "disk"), and the map accelerate infers under that budget passed as ``device_map``: routers on each layer's
    execution device, logits and greedy generation equal to the single-device run."""
    from accelerate import infer_auto_device_map, init_empty_weights

    from pmod_convert import load_pretrained, save_pretrained
    from pmod_convert.adapters import get_adapter
    from pmod_convert.api import mod_layers
    from pmod_convert.mod.inject import router_device
    from pmod_convert.tiny import save_tiny_checkpoint

    save_tiny_checkpoint("llava", tmp_path / "dense")
    mod, config = mod_model()
    save_pretrained(mod, tmp_path / "mod", source=tmp_path / "dense")
    one = load_pretrained(tmp_path / "mod")
    inputs = batch_inputs("llava", config)
    ref = logits_of(one, inputs)
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=list(range(RESERVED)))
    with torch.no_grad():
        ref_tokens = one.generate(**inputs, **kw)

    auto = load_pretrained(tmp_path / "mod", device_map="auto")
    # no accelerator here: "auto" places everything on CPU (transformers then records no map)
    assert set(getattr(auto, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    assert {p.device.type for p in auto.parameters()} == {"cpu"}

    with init_empty_weights():
        skeleton = get_adapter(config).model_cls()(config)
    layer_bytes = sum(p.numel() * p.element_size() for p in skeleton.model.language_model.layers[0].parameters())
    budget = {"cpu": int(sum(p.numel() * p.element_size() for p in skeleton.parameters()) - 2.5 * layer_bytes)}
    device_map = infer_auto_device_map(skeleton, max_memory=budget,
                                       no_split_module_classes=[type(skeleton.model.language_model.layers[0]).__name__])
    assert "disk" in device_map.values(), device_map  # the budget really forces offload
    spilled = load_pretrained(tmp_path / "mod", device_map=device_map)
    budgeted = load_pretrained(tmp_path / "mod", device_map="auto", max_memory=budget,
                               offload_folder=tmp_path / "offload")
    assert "disk" in budgeted.hf_device_map.values(), budgeted.hf_device_map

    for model in (auto, spilled, budgeted):
        for _, layer in mod_layers(model):
            router = getattr(layer, ROUTER_NAME)
            assert all(p.device == router_device(layer) and p.device.type == "cpu" for p in router.parameters())
        torch.testing.assert_close(logits_of(model, inputs), ref, rtol=0, atol=0)
        assert routed_layers(model) == [0, 1, 3]
        with torch.no_grad():
            assert torch.equal(model.generate(**inputs, **kw), ref_tokens)


# ---- inputs_embeds with merged image features ----------------------------------------------------
def merged_embeds(model, inputs):
    """The inputs_embeds the language model receives (image features already merged), captured from a forward."""
    seen = {}
    lm = getattr(model.model, "language_model", None) or model.model.text_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True)
    try:
        logits_of(model, inputs)
    finally:
        handle.remove()
    return seen["e"]


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_inputs_embeds_with_merged_features_needs_a_vision_mask(family):
    mod, config = mod_model(family)
    inputs = batch_inputs(family, config)
    embeds = merged_embeds(mod, inputs)
    vision = torch.isin(inputs["input_ids"], torch.tensor(mod._pmod_context.target_token_ids))
    ref = logits_of(mod, inputs)
    plain = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
    with pytest.raises(PmodError, match="pmod_vision_mask"):
        logits_of(mod, plain)
    torch.testing.assert_close(logits_of(mod, plain, pmod_vision_mask=vision), ref, rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=list(range(RESERVED)))
    with torch.no_grad():
        expected = mod.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1]:]
        got = mod.generate(**plain, pmod_vision_mask=vision, **kw)
        with pytest.raises(PmodError, match="pmod_vision_mask"):
            mod.generate(**plain, **kw)
    assert torch.equal(got[:, -expected.shape[1]:], expected)
    text = {"inputs_embeds": embeds[:, -3:], "attention_mask": inputs["attention_mask"][:, -3:]}
    logits_of(mod, text, pmod_vision_mask=torch.zeros(2, 3, dtype=torch.bool))  # text only, said so


def test_inputs_embeds_with_placeholders_and_pixels_still_route():
    mod, config = mod_model()
    inputs = batch_inputs("llava", config)
    ref = logits_of(mod, inputs)
    ids = inputs.pop("input_ids")
    out = logits_of(mod, dict(inputs, inputs_embeds=mod.get_input_embeddings()(ids)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert routed_layers(mod) == [0, 1, 3]


# ---- generated tokens equal to a vision id are text ------------------------------------------------
class ForceFirst:
    """Logits processor forcing token ``token`` at the first generated position."""

    def __init__(self, token, prompt_len):
        self.token, self.prompt_len = token, prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_len:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token] = 0
        return scores


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_generated_vision_id_is_not_routed(family):
    from transformers import LogitsProcessorList

    mod, config = mod_model(family, layers=(0, 2))
    inputs = batch_inputs(family, config)
    vision_id = mod._pmod_context.target_token_ids[0]
    force = LogitsProcessorList([ForceFirst(vision_id, inputs["input_ids"].shape[1])])
    with torch.no_grad():
        out = mod.generate(**inputs, max_new_tokens=3, do_sample=False, logits_processor=force)
    assert (out[:, inputs["input_ids"].shape[1]] == vision_id).all()


def test_a_step_whose_every_token_is_a_skipped_target_still_works():
    mod, config = mod_model(layers=(0, 2))
    inputs = batch_inputs("llava", config)
    seq = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = mod(**inputs, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        vision = torch.ones(2, seq + 1, dtype=torch.bool)
        step = mod(input_ids=nxt, attention_mask=mask, past_key_values=out.cache, use_cache=True,
                   pmod_vision_mask=vision)
    assert torch.isfinite(step.logits).all()
    layer0 = step.cache.layers[0]
    assert layer0.get_seq_length() == seq + 1 and layer0.physical_length() < seq  # nothing stored for the step


# ---- padding-free packed rows -------------------------------------------------------------------
def test_packed_row_budgets_per_sample_like_samples_alone():
    from conftest import single_rows

    mod, config = mod_model()
    rows = single_rows("llava", config)
    alone = []
    for row in rows:
        n = row["input_ids"].shape[1]
        alone.append(logits_of(mod, {"input_ids": row["input_ids"], "pixel_values": row["pixel_values"],
                                     "position_ids": torch.arange(n)[None]}, use_cache=False)[0])
    packed = {
        "input_ids": torch.cat([r["input_ids"] for r in rows], 1),
        "pixel_values": torch.cat([r["pixel_values"] for r in rows], 0),
        "position_ids": torch.cat([torch.arange(r["input_ids"].shape[1]) for r in rows])[None],
    }
    out = logits_of(mod, packed, use_cache=False)[0]  # transformers builds per-sample masks without a cache
    start = 0
    for ref in alone:
        torch.testing.assert_close(out[start:start + ref.shape[0]], ref, rtol=1e-5, atol=1e-5)
        start += ref.shape[0]
