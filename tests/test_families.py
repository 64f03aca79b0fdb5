"""Every supported family end to end on its tiny checkpoint: the real processor (or its documented fallback) encodes
LLaVA-style rows, and add-routers -> calibrate -> finetune -> export -> generate runs through the CLI. One compact
test per family (4 calibration samples, 1 optimizer step); the engine contract itself is in test_mod_engine.py and
test_adapters.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_error_line, run
from PIL import Image

from pmod_convert.adapters import all_adapters, get_adapter, refused_families
from pmod_convert.data import SampleEncoder, read_samples
from pmod_convert.tiny import save_tiny_checkpoint

FAMILIES = [a.family for a in all_adapters()]


def _dataset(root, n=6):
    (root / "img").mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (48, 48), ((40 * i) % 256, 200 - 20 * i, 30)).save(root / "img" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nw{40 + i} w41"}, {"from": "gpt", "value": f"w{50 + i % 3}"}]})
    (root / "train.json").write_text(json.dumps(rows))
    return root / "train.json", root / "img"


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_pipeline_on_the_tiny_checkpoint(family, tmp_path):
    dense = tmp_path / "dense"
    save_tiny_checkpoint(family, dense, num_hidden_layers=4)
    data, images = _dataset(tmp_path)

    # the data loader reads the family's processor (or its fallback) and puts the image where the marker is
    enc = SampleEncoder.from_pretrained(dense)
    sample = read_samples(data, images).samples[0]
    item = enc.encode(sample)
    config = enc.config
    ids = torch.tensor(get_adapter(config).vision_token_ids(config))
    assert int(torch.isin(item["input_ids"], ids).sum()) > 0
    assert (item["labels"] != -100).any()

    steps = [
        ("add-routers", dense, "--out", tmp_path / "mod", "--ratio", "0.5", "--layers", "1-3"),
        ("calibrate", tmp_path / "mod", "--data", data, "--image-folder", images, "--out", tmp_path / "cal",
         "--target-flops", "0.8", "--samples", "4"),
        ("finetune", tmp_path / "cal", "--data", data, "--image-folder", images, "--out", tmp_path / "ft",
         "--max-steps", "1", "--val-min", "2", "--eval-steps", "1", "--lora-r", "2", "--save-steps", "0"),
        ("export", tmp_path / "ft", "--out", tmp_path / "exp", "--quantize", "none"),
        ("generate", tmp_path / "exp", "--image", images / "0.png", "--prompt", "w40 w41", "--max-new-tokens", "2",
         "--device", "cpu"),
    ]
    for args in steps:
        code, output = run(*args)
        assert code == 0, f"{args[0]}: {output[-2000:]}"


@pytest.mark.parametrize("model_type", sorted(refused_families()))
def test_refused_family_is_one_line(model_type, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": model_type}))
    code, output = run("add-routers", tmp_path / "m", "--out", tmp_path / "out")
    assert code != 0
    line = one_error_line(output)
    assert "not supported" in line and "attention" in line
    assert not (tmp_path / "out").exists()
