"""import-pmod: the authors' p-MoD checkpoints (original LLaVA layout) run through load_pretrained (issue 14 item 3).

The test writes tiny checkpoints in the original layout itself (key names, config fields and schedule strings of
github.com/MCG-NJU/p-MoD; no download), imports them, and checks every decoder layer's output and the logits of
``load_pretrained``'s model against a small independent implementation of the original layout's math written
below from the paper's / repository's formulas: CLIP vision tower, ``mlp2x_gelu`` projector, LLaVA-NeXT anyres
packing with ``image_newline``, Llama decoder layers, and the MoD layer (top-k by TanhNorm weight, STRing).
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import one_error_line, run, snapshot
from safetensors.torch import load_file, save_file

from pmod_convert import load_pretrained
from pmod_convert.api import mod_layers
from pmod_convert.interop import import_pmod
from pmod_convert.interop.pmod_original import parse_weight_norm, schedule_ratios

HIDDEN, HEADS, FFN, LAYERS, VOCAB = 32, 4, 64, 12, 60
V_HIDDEN, V_HEADS, V_FFN, V_LAYERS, IMAGE, PATCH = 16, 2, 32, 3, 56, 14
SIDE = IMAGE // PATCH  # 4x4 = 16 patches per crop
SETTINGS = {  # one schedule grammar and TanhNorm setting per family
    "llava": dict(mod_target_layers="shiftedcos_decay_0.85_0.15", mod_router_factor=0.5, mod_weight_norm="tanh_0.2_1"),
    "llava_next": dict(mod_target_layers="shiftedlinear_decay_0.6_0.2", mod_router_factor=0.3,
                       mod_weight_norm="tanh_0.3_1"),
}
PINPOINTS = [[56, 112], [112, 56], [112, 112]]
ROPE_THETA = 5000.0  # not the library default, so a lost rope_theta shows


# ---- writing a checkpoint in the original layout --------------------------------------------------------
def _vision_tower_folder(root):
    """A local folder named by mm_vision_tower, holding the CLIP config (as the original code reads it)."""
    folder = root / "clip-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "clip_vision_model", "hidden_size": V_HIDDEN, "intermediate_size": V_FFN,
        "num_hidden_layers": V_LAYERS, "num_attention_heads": V_HEADS, "image_size": IMAGE, "patch_size": PATCH,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}))
    return folder


def write_original(root, family, *, seed=0, **changes):
    """Config + random weights in the original layout; returns (folder, original state dict, config)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1):
        return torch.randn(*shape, generator=gen) * std

    settings = SETTINGS[family]
    ratios = schedule_ratios(settings["mod_target_layers"], LAYERS, settings["mod_router_factor"])
    mod_layers = [i for i, r in enumerate(ratios) if r is not None]
    config = {
        "architectures": ["PmodLlavaLlamaForCausalLM"], "model_type": "pmod_llava_llama",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": ROPE_THETA, "rope_scaling": None, "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "tie_word_embeddings": False, "torch_dtype": "float32", "pretraining_tp": 1,
        "mm_vision_tower": str(_vision_tower_folder(root)), "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": V_HIDDEN, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tokenizer_padding_side": "right",
        "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
        "mod_target_token_type": "vision_all", "mod_bias_enabled": True, "mod_special_init": True,
        "mod_target_layer_indices": mod_layers, **settings,
    }
    if family == "llava_next":
        config.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=PINPOINTS,
                      max_num_patches=None)
    config.update(changes)
    sd = {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN, std=0.5), "model.norm.weight": 1 + rnd(HIDDEN),
          "lm_head.weight": rnd(VOCAB, HIDDEN, std=0.3)}
    for i in range(LAYERS):
        p = f"model.layers.{i}.decoder_layer." if i in mod_layers else f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{p}self_attn.{name}.weight"] = rnd(HIDDEN, HIDDEN, std=0.15)
        sd[f"{p}mlp.gate_proj.weight"] = rnd(FFN, HIDDEN, std=0.15)
        sd[f"{p}mlp.up_proj.weight"] = rnd(FFN, HIDDEN, std=0.15)
        sd[f"{p}mlp.down_proj.weight"] = rnd(HIDDEN, FFN, std=0.15)
        sd[f"{p}input_layernorm.weight"] = 1 + rnd(HIDDEN)
        sd[f"{p}post_attention_layernorm.weight"] = 1 + rnd(HIDDEN)
        if i in mod_layers:  # trained routers: random, so selection and weights depend on the tokens
            sd[f"model.layers.{i}.router.router.weight"] = rnd(1, HIDDEN, std=0.05)
            sd[f"model.layers.{i}.router.router.bias"] = rnd(1, std=0.1)
    v = "model.vision_tower.vision_tower.vision_model."
    sd[v + "embeddings.class_embedding"] = rnd(V_HIDDEN, std=0.5)
    sd[v + "embeddings.patch_embedding.weight"] = rnd(V_HIDDEN, 3, PATCH, PATCH, std=0.05)
    sd[v + "embeddings.position_embedding.weight"] = rnd(SIDE * SIDE + 1, V_HIDDEN, std=0.5)
    sd[v + "embeddings.position_ids"] = torch.arange(SIDE * SIDE + 1)[None]  # a buffer old checkpoints carry
    for ln in ("pre_layrnorm", "post_layernorm"):
        sd[f"{v}{ln}.weight"], sd[f"{v}{ln}.bias"] = 1 + rnd(V_HIDDEN), rnd(V_HIDDEN)
    for i in range(V_LAYERS):
        p = f"{v}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{p}self_attn.{name}.weight"], sd[f"{p}self_attn.{name}.bias"] = rnd(V_HIDDEN, V_HIDDEN, std=0.3), rnd(V_HIDDEN)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = 1 + rnd(V_HIDDEN), rnd(V_HIDDEN)
        sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc1.bias"] = rnd(V_FFN, V_HIDDEN, std=0.3), rnd(V_FFN)
        sd[f"{p}mlp.fc2.weight"], sd[f"{p}mlp.fc2.bias"] = rnd(V_HIDDEN, V_FFN, std=0.3), rnd(V_HIDDEN)
    sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"] = rnd(HIDDEN, V_HIDDEN, std=0.3), rnd(HIDDEN)
    sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"] = rnd(HIDDEN, HIDDEN, std=0.3), rnd(HIDDEN)
    if family == "llava_next":
        sd["model.image_newline"] = rnd(HIDDEN, std=0.5)
    folder = root / f"orig-{family}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # Two shards with an index, as the published checkpoints have.
    keys = sorted(sd)
    half = {k: sd[k] for k in keys[: len(keys) // 2]}, {k: sd[k] for k in keys[len(keys) // 2:]}
    weight_map = {}
    for n, part in enumerate(half, start=1):
        name = f"model-{n:05d}-of-00002.safetensors"
        save_file({k: t.contiguous() for k, t in part.items()}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, sd, config


# ---- the original layout's math, independently ----------------------------------------------------------
def layer_norm(x, sd, p, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def clip_features(sd, crops, select_layer=-2):
    """CLIP vision tower on crops [n, 3, IMAGE, IMAGE] -> hidden_states[select_layer] without CLS (``patch``)."""
    v = "model.vision_tower.vision_tower.vision_model."
    x = F.conv2d(crops, sd[v + "embeddings.patch_embedding.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd[v + "embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd[v + "embeddings.position_embedding.weight"]
    states = [layer_norm(x, sd, v + "pre_layrnorm")]
    x = states[0]
    d = V_HIDDEN // V_HEADS
    for i in range(V_LAYERS):
        p = f"{v}encoder.layers.{i}."
        h = layer_norm(x, sd, p + "layer_norm1")

        def proj(name, t=h):
            return (t @ sd[f"{p}self_attn.{name}.weight"].T + sd[f"{p}self_attn.{name}.bias"])

        q, k, val = (proj(n).view(*h.shape[:2], V_HEADS, d).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ val
        x = x + proj("out_proj", att.transpose(1, 2).reshape(h.shape))
        h = layer_norm(x, sd, p + "layer_norm2")
        h = h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        states.append(x)
    feats = states[select_layer][:, 1:]
    h = F.gelu(feats @ sd["model.mm_projector.0.weight"].T + sd["model.mm_projector.0.bias"])
    return h @ sd["model.mm_projector.2.weight"].T + sd["model.mm_projector.2.bias"]


def anyres_features(sd, crops, grid, original_size):
    """LLaVA-NeXT packing of the original code: base features, then the grid's feature map merged back,
    unpadded to the image's aspect ratio (``int`` rounding as the original), one image_newline per row."""
    feats = clip_features(sd, crops)
    base, rows, cols = feats[0], grid[0], grid[1]
    fmap = feats[1:].view(rows, cols, SIDE, SIDE, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    width, height = original_size
    cur_h, cur_w = fmap.shape[1:]
    if width / height > cur_w / cur_h:
        pad = (cur_h - int(height * (cur_w / width))) // 2
        fmap = fmap[:, pad:cur_h - pad, :]
    else:
        pad = (cur_w - int(width * (cur_h / height))) // 2
        fmap = fmap[:, :, pad:cur_w - pad]
    newline = sd["model.image_newline"][:, None, None].expand(*fmap.shape[:-1], 1)
    hr = torch.cat([fmap, newline], dim=-1).permute(1, 2, 0).flatten(0, 1)
    return torch.cat([base, hr], dim=0)


def rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, pos, theta=ROPE_THETA):
    d = x.shape[-1]
    freqs = pos[:, None].float() / theta ** (torch.arange(0, d, 2).float() / d)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def decoder_layer(sd, p, x, pos):
    """Llama layer on tokens x [n, hidden] at positions pos (causal in the given order): (h, mlp(norm(h)))."""
    d = HIDDEN // HEADS
    h = rms_norm(x, sd[p + "input_layernorm.weight"])
    q, k, v = (h @ sd[f"{p}self_attn.{n}.weight"].T for n in ("q_proj", "k_proj", "v_proj"))
    q, k, v = (t.view(-1, HEADS, d).transpose(0, 1) for t in (q, k, v))
    q, k = rotate(q, pos), rotate(k, pos)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    att = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(-1, HIDDEN)
    h = x + att @ sd[p + "self_attn.o_proj.weight"].T
    m = rms_norm(h, sd[p + "post_attention_layernorm.weight"])
    m = (F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    return h, m


def mod_layer(sd, i, x, pos, target, ratio, scale, bias):
    """The original MoD layer: targets ranked by scale * tanh(router(x)) + bias, trunc(ratio * n) kept; kept
    targets h + w * m, other kept tokens h + m, skipped targets w * x."""
    logits = x @ sd[f"model.layers.{i}.router.router.weight"].T.squeeze(-1) + sd[f"model.layers.{i}.router.router.bias"]
    weights = scale * torch.tanh(logits.masked_fill(~target, float("-inf"))) + bias
    k = int(torch.trunc(torch.tensor([int(target.sum())], dtype=torch.int32) * ratio).int())
    kept = ~target
    kept[torch.topk(weights, k, sorted=True).indices] = True
    h, m = decoder_layer(sd, f"model.layers.{i}.decoder_layer.", x[kept], pos[kept])
    out = x.clone()
    out[kept] = m
    out[target] = out[target] * weights[target, None]
    out[kept] = out[kept] + h
    return out


def reference(sd, config, embeds, target):
    """Per-layer outputs [LAYERS] and logits of the original model on one sequence of input embeddings."""
    ratios = schedule_ratios(config["mod_target_layers"], LAYERS, config["mod_router_factor"])
    router = parse_weight_norm(config["mod_weight_norm"])
    pos, x, outs = torch.arange(embeds.shape[0]), embeds, []
    for i, r in enumerate(ratios):
        if r is None:
            h, m = decoder_layer(sd, f"model.layers.{i}.", x, pos)
            x = h + m
        else:
            x = mod_layer(sd, i, x, pos, target, r, router.tanh_alpha, router.tanh_beta)
        outs.append(x)
    logits = rms_norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T
    return outs, logits


# ---- tests --------------------------------------------------------------------------------------------
def test_schedule_strings_follow_the_reference_code():
    # shiftedcos with the hard-coded divisor 31: on 32 layers the published 24 MoD layers from layer 8.
    ratios = schedule_ratios("shiftedcos_decay_0.85_0.15", 32, 0.5)
    assert [i for i, r in enumerate(ratios) if r is not None] == list(range(8, 32))
    assert ratios[8] == pytest.approx(math.cos(8 * math.pi / 31) / 2 + 0.5) and ratios[31] == 0.15
    # The divisor stays 31 on other depths (the original code's behaviour, reproduced on purpose).
    assert schedule_ratios("shiftedlinear_decay_0.6_0.2", 12, 0.3)[7] == pytest.approx(0.8 - 7 / 31)
    assert schedule_ratios("deep_all", 6, 0.4) == [None, None, 0.4, 0.4, 0.4, None]
    assert schedule_ratios("interleave", 4, 0.5) == [None, 0.5, None, 0.5]
    tanh = parse_weight_norm("tanh_0.2_1")
    assert (tanh.tanh_alpha, tanh.tanh_beta) == (0.2, 1.0)
    assert (parse_weight_norm("tanh").tanh_alpha, parse_weight_norm("tanh_0.5_-1").tanh_beta) == (1.0, -1.0)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_imported_model_matches_the_original_math(family, tmp_path):
    source, sd, config = write_original(tmp_path, family)
    result = import_pmod(source, tmp_path / "imported")
    assert result.family == family and result.image_token_id == VOCAB and result.vocab_size == 64
    model = load_pretrained(tmp_path / "imported")
    stored = json.loads((tmp_path / "imported" / "config.json").read_text())
    assert stored["pmod"]["layer_ratios"] == schedule_ratios(config["mod_target_layers"], LAYERS,
                                                             config["mod_router_factor"])
    assert stored["pmod"]["router"]["tanh_alpha"] == parse_weight_norm(config["mod_weight_norm"]).tanh_alpha
    _check_against_reference(model, sd, config, family)


def _check_against_reference(model, sd, config, family):
    """Every decoder layer's output and the logits of ``model`` equal the reference on one or two images."""
    gen = torch.Generator().manual_seed(1)
    samples = []
    if family == "llava":
        crops = torch.randn(1, 3, IMAGE, IMAGE, generator=gen)
        samples.append(({"pixel_values": crops}, clip_features(sd, crops)[0]))
    else:  # a square image (2x2 grid, no unpadding) and a narrow one (unpadded to 6 of 8 feature columns)
        for height, width in ((112, 112), (112, 80)):
            crops = torch.randn(5, 3, IMAGE, IMAGE, generator=gen)  # base view + the 2x2 grid of the 112x112 pinpoint
            feats = anyres_features(sd, crops, (2, 2), (width, height))
            samples.append(({"pixel_values": crops[None], "image_sizes": torch.tensor([[height, width]])}, feats))
    for extra, vision in samples:
        before, after = torch.randint(3, VOCAB, (5,), generator=gen), torch.randint(3, VOCAB, (7,), generator=gen)
        before[0] = 1
        ids = torch.cat([before, torch.full((vision.shape[0],), VOCAB), after])[None]
        embeds = torch.cat([sd["model.embed_tokens.weight"][before], vision, sd["model.embed_tokens.weight"][after]])
        target = ids[0] == VOCAB
        want_layers, want_logits = reference(sd, config, embeds, target)
        with torch.no_grad():
            got = model(input_ids=ids, **extra, output_hidden_states=True)
        for i in range(LAYERS - 1):  # hidden_states[i + 1] is layer i's output (the last one is normed)
            torch.testing.assert_close(got.hidden_states[i + 1][0], want_layers[i], rtol=1e-4, atol=1e-4,
                                       msg=f"layer {i}")
        torch.testing.assert_close(got.logits[0, :, :VOCAB], want_logits, rtol=1e-4, atol=1e-4)
        # The routed layers really dropped tokens (the comparison is not of a dense run).
        kept = [layer.pmod_last_kept for _, layer in mod_layers(model)]
        assert all(int((k >= 0).sum()) < ids.shape[1] for k in kept)


def test_import_cli_and_refusals(tmp_path):
    source, _, _ = write_original(tmp_path, "llava")
    before = snapshot(source)
    code, output = run("import-pmod", source, "--out", tmp_path / "out")
    assert code == 0, output
    assert "4 of 12 decoder layers are MoD layers" in output and "no processor written" in output
    code, output = run("inspect", tmp_path / "out")
    assert code == 0 and "imported from p-MoD original LLaVA layout" in output
    assert snapshot(source) == before
    # OUT exists: refused, nothing changed.
    code, output = run("import-pmod", source, "--out", tmp_path / "out")
    assert code != 0 and "already exists" in one_error_line(output)
    # Settings the transformers classes cannot reproduce are refused with one line.
    cases = {"softmax": ({"mod_weight_norm": "softmax"}, "only tanh checkpoints"),
             "hr": ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                     "image_grid_pinpoints": PINPOINTS, "mod_target_token_type": "vision_hr"}, "routes every image token"),
             "sched": ({"mod_target_layers": "zigzag_0.5"}, "not a p-MoD schedule"),
             "layers": ({"mod_target_layer_indices": [1, 2]}, "inconsistent"),
             "type": ({"model_type": "llava_llama"}, "not 'pmod_llava_llama'")}
    for name, (change, message) in cases.items():
        bad = tmp_path / f"bad-{name}"
        bad.mkdir()
        for f in source.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((bad / "config.json").read_text())
        cfg.update(change)
        (bad / "config.json").write_text(json.dumps(cfg))
        code, output = run("import-pmod", bad, "--out", tmp_path / f"out-{name}")
        assert code != 0 and message in one_error_line(output), (name, output)
        assert not (tmp_path / f"out-{name}").exists()
    # A vision config that does not fit the stored tower, and a pickle-only folder.
    wrong = tmp_path / "wrong-clip.json"
    wrong.write_text(json.dumps({"hidden_size": 24, "intermediate_size": V_FFN, "num_hidden_layers": V_LAYERS,
                                 "num_attention_heads": 2, "image_size": IMAGE, "patch_size": PATCH}))
    code, output = run("import-pmod", source, "--out", tmp_path / "o2", "--vision-config", wrong)
    assert code != 0 and "hidden_size 24" in one_error_line(output)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((source / "config.json").read_bytes())
    torch.save({"lm_head.weight": torch.zeros(1)}, pickled / "pytorch_model.bin")
    code, output = run("import-pmod", pickled, "--out", tmp_path / "o3")
    assert code != 0 and "--allow-pickle" in one_error_line(output)


def _processor_folder(folder, image_id):
    """A transformers LlavaProcessor whose word-level tokenizer puts <image> at ``image_id`` (the llava-hf layout
    puts it right after the original vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab.update({"<image>": image_id, "<pad>": image_id + 1 if image_id == VOCAB else VOCAB})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="<pad>", bos_token="w1",
                                        eos_token="w2", extra_special_tokens={"image_token": "<image>"})
    image = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, image_token="<image>").save_pretrained(folder)
    return folder


def test_import_with_a_processor(tmp_path):
    """--processor copies a processor for the same tokenizer; the imported checkpoint then runs from text + image
    like any transformers LLaVA checkpoint (the processor expands <image> to the 16 feature positions)."""
    from PIL import Image
    from transformers import AutoProcessor

    source, _, _ = write_original(tmp_path, "llava")
    wrong = _processor_folder(tmp_path / "proc-wrong", VOCAB + 1)
    code, output = run("import-pmod", source, "--out", tmp_path / "o1", "--processor", wrong)
    assert code != 0 and "puts <image> at id 61" in one_error_line(output)
    assert not (tmp_path / "o1").exists()
    proc = _processor_folder(tmp_path / "proc", VOCAB)
    code, output = run("import-pmod", source, "--out", tmp_path / "out", "--processor", proc)
    assert code == 0, output
    assert "no processor written" not in output
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    inputs = processor(images=Image.new("RGB", (40, 30), (200, 10, 10)), text="w1 w5 <image> w7 w9",
                       return_tensors="pt")
    assert int((inputs["input_ids"] == VOCAB).sum()) == SIDE * SIDE
    model = load_pretrained(tmp_path / "out")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert int(out[0, -3:].max()) < VOCAB  # the ids added for <image> / <pad> are never generated


def test_import_with_a_separate_vision_tower(tmp_path):
    """A checkpoint saved without its CLIP tower (the original code loads it from mm_vision_tower) imports with
    --vision-tower pointing at a transformers CLIP checkpoint, and still matches the original math."""
    source, sd, config = write_original(tmp_path, "llava")
    tower = tmp_path / "clip-checkpoint"
    tower.mkdir()
    prefix = "model.vision_tower.vision_tower.vision_model."
    save_file({"vision_model." + k[len(prefix):]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)},
              str(tower / "model.safetensors"), metadata={"format": "pt"})
    (tower / "config.json").write_text((Path(config["mm_vision_tower"]) / "config.json").read_text())
    for shard in source.glob("*.safetensors"):  # the checkpoint without its tower
        kept = {k: v for k, v in load_file(str(shard)).items() if not k.startswith(prefix)}
        save_file(kept, str(shard), metadata={"format": "pt"})
    code, output = run("import-pmod", source, "--out", tmp_path / "no-tower")
    assert code != 0 and "pass --vision-tower" in one_error_line(output)
    code, output = run("import-pmod", source, "--out", tmp_path / "out", "--vision-tower", tower)
    assert code == 0, output
    _check_against_reference(load_pretrained(tmp_path / "out"), sd, config, "llava")

