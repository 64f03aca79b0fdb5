"""The finetune sidecar (real peft LoRA + routers) round-trips through load_pretrained."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from pmod_convert import (
    CheckpointError,
    Recipe,
    ScheduleSettings,
    add_routers,
    layer_infos,
    load_pretrained,
    save_pretrained,
)
from pmod_convert.adapters import adapter_by_family
from pmod_convert.api import load_dense
from pmod_convert.sidecar import SIDECAR_DIR, save_sidecar
from pmod_convert.tiny import save_tiny_checkpoint


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_lora_and_routers_sidecar_round_trip(family, tmp_path):
    src = tmp_path / "dense"
    save_tiny_checkpoint(family, src)
    model = load_dense(src)
    add_routers(model, Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5, layers=[1, 3])))
    ckpt = save_pretrained(model, tmp_path / "mod", source=src)
    adapter = adapter_by_family(family)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=adapter.lora_target_regex))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "pmod_router" in name:
                p.normal_(std=0.2)
    inputs = adapter.dummy_inputs(model.config, batch_size=2)
    ok = inputs["attention_mask"].bool()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    save_sidecar(peft_model, ckpt, summary={"steps": 0})
    assert (ckpt / SIDECAR_DIR / "adapter_model.safetensors").is_file()

    loaded = load_pretrained(ckpt)
    assert isinstance(loaded, PeftModel)
    assert [i.ratio for i in layer_infos(loaded)] == [None, 0.5, None, 0.5]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits[ok], expected[ok], rtol=0, atol=1e-6)
        base_only = load_pretrained(ckpt, adapter=False)
        assert not isinstance(base_only, PeftModel)
        assert not torch.allclose(base_only(**inputs).logits[ok], expected[ok])


def test_corrupt_sidecar_is_reported(tmp_path):
    src = tmp_path / "dense"
    save_tiny_checkpoint("llava", src)
    model = add_routers(load_dense(src), Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5)))
    ckpt = save_pretrained(model, tmp_path / "mod", source=src)
    save_sidecar(model, ckpt)  # routers only, no LoRA
    assert not isinstance(load_pretrained(ckpt), PeftModel)
    routers = ckpt / SIDECAR_DIR / "routers.safetensors"
    routers.write_bytes(routers.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="routers.safetensors cannot be read"):
        load_pretrained(ckpt)
