"""No silent dense fallback: the routing switch, the did-not-route guard and every way into the model (issue 12)."""

import copy

import pytest
import torch
from conftest import FAMILIES, batch_inputs, tiny_model

from pmod_convert import Recipe, ScheduleSettings, add_routers
from pmod_convert.mod.context import routing_disabled
from pmod_convert.mod.router import ROUTER_NAME


def constant(ratio, layers=None):
    return Recipe(schedule=ScheduleSettings(kind="constant", ratio=ratio, layers=layers))


def randomize_routers(model, seed=1, std=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ROUTER_NAME in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


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
