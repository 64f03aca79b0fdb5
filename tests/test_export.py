"""Export: real peft merge, real bitsandbytes layers, real safetensors files, loaded back and generating."""

import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from pmod_convert import (
    CheckpointError,
    Recipe,
    RecipeError,
    ScheduleSettings,
    add_routers,
    layer_infos,
    load_pretrained,
    save_pretrained,
)
from pmod_convert.adapters import adapter_by_family
from pmod_convert.api import load_dense
from pmod_convert.checkpoint import OUTPUT_MARKER, router_key
from pmod_convert.cli import app
from pmod_convert.export import (
    MANIFEST_NAME,
    REPORT_JSON,
    REPORT_PNG,
    SETTINGS_FILE,
    ExportSettings,
    export,
    pipeline,
)
from pmod_convert.export.compare import check_batches, logit_deviation, model_logits
from pmod_convert.export.report import part_of
from pmod_convert.sidecar import ROUTERS_FILE, SIDECAR_DIR, save_sidecar
from pmod_convert.tiny import save_tiny_checkpoint

MODES = ["none", "int8", "nf4", "fp4"]
RATIOS = [None, 0.5, None, 0.25]
UNTOUCHED = ("vision tower", "projector", "lm_head", "embeddings")  # parts the export must copy bit for bit


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny LLaVA MoD checkpoint (hidden 64) with a finetune sidecar: random LoRA + random routers."""
    root = tmp_path_factory.mktemp("export_src")
    save_tiny_checkpoint("llava", root / "dense")
    model = add_routers(load_dense(root / "dense"), Recipe(schedule=ScheduleSettings(kind="explicit", ratios=RATIOS)))
    ckpt = save_pretrained(model, root / "mod", source=root / "dense")
    adapter = adapter_by_family("llava")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=adapter.lora_target_regex))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "pmod_router" in name:
                p.normal_(std=0.2)
    save_sidecar(peft_model.eval(), ckpt)
    inputs = adapter.dummy_inputs(model.config, batch_size=2, images_per_row=[1, 2])
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    return ckpt, inputs, expected


@pytest.fixture(scope="module")
def report_reference(source):
    """The export's default check inputs and the finetuned (unmerged, unquantized) model's logits on them."""
    model = load_pretrained(source[0])
    batches = check_batches(None, adapter_by_family("llava"), model.config)
    return batches, model_logits(model, batches)


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory):
    ckpt, _, _ = source
    root = tmp_path_factory.mktemp("exports")
    return {mode: (root / mode, export(ckpt, root / mode, quantize=mode, progress=False)) for mode in MODES}


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _valid(logits, inputs):
    return logits[inputs["attention_mask"].bool()]


@pytest.mark.parametrize("mode", MODES)
def test_export_loads_back_as_mod_model_and_generates(mode, exports, source, report_reference):
    out, report = exports[mode]
    _, inputs, expected = source
    model = load_pretrained(out)
    assert not isinstance(model, PeftModel)
    assert [i.ratio for i in layer_infos(model)] == RATIOS
    q_proj = model.model.language_model.layers[1].self_attn.q_proj
    kind = {"none": torch.nn.Linear, "int8": bnb.nn.Linear8bitLt}.get(mode, bnb.nn.Linear4bit)
    assert type(q_proj) is kind
    assert type(model.model.vision_tower.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear
    router = model.model.language_model.layers[3].pmod_router
    assert router.weight.dtype == torch.float32 and router.weight.abs().sum() > 0
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 4)
    diff = (_valid(logits, inputs) - _valid(expected, inputs)).abs()
    # the report's numbers are what the loaded export gives against the unquantized finetuned model
    batches, reference = report_reference
    again = logit_deviation(reference, model_logits(model, batches)).to_dict()
    saved = json.loads((out / REPORT_JSON).read_text())
    assert saved["logits"] == report.logits
    assert again["positions"] == report.logits["positions"] == 140
    assert report.logits["text_positions"]["positions"] == 140 - 3 * 36  # three images of 36 tokens
    assert again["top1_agreement"] == report.logits["top1_agreement"]
    assert again["max_abs_diff"] == pytest.approx(report.logits["max_abs_diff"], abs=1e-6)
    assert saved["settings"]["quantize"] == mode and saved["lora_merged"] is True
    assert (out / REPORT_PNG).stat().st_size > 1000
    if mode == "none":
        assert report.logits["max_abs_diff"] < 1e-4 and diff.max() < 1e-4
        assert report.linears["quantized"] == 0
    else:
        assert report.logits["max_abs_diff"] > 1e-3 and report.linears["quantized"] == 4 * 7  # q k v o gate up down
        assert 1e-4 < float(diff.mean()) < 0.2


@pytest.mark.parametrize("mode", MODES)
def test_files_hold_quantized_tensors_and_are_smaller(mode, exports, source):
    out, report = exports[mode]
    ckpt = source[0]
    stored, original = _tensors(out), _tensors(ckpt)
    key = next(k for k in original if "layers.2.self_attn.q_proj.weight" in k)
    shape = tuple(original[key].shape)
    config = json.loads((out / "config.json").read_text())
    assert config["pmod"]["layer_ratios"] == RATIOS
    if mode == "none":
        assert "quantization_config" not in config
        assert stored[key].dtype == torch.float32 and tuple(stored[key].shape) == shape
        assert report.size_ratio == pytest.approx(1.0, abs=1e-3)
        return
    quant = config["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes"
    if mode == "int8":
        assert quant["load_in_8bit"] is True
        assert stored[key].dtype == torch.int8 and tuple(stored[key].shape) == shape
        assert stored[key.replace(".weight", ".SCB")].shape == (shape[0],)
    else:
        assert quant["load_in_4bit"] is True and quant["bnb_4bit_quant_type"] == mode
        assert stored[key].dtype == torch.uint8 and tuple(stored[key].shape) == (shape[0] * shape[1] // 2, 1)
        assert f"{key}.quant_state.bitsandbytes__{mode}" in stored and f"{key}.absmax" in stored
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert on_disk == report.weight_bytes < report.unquantized_weight_bytes
    decoder = report.parts["decoder"]
    assert decoder["exported"] < decoder["unquantized"] * (0.3 if mode == "int8" else 0.2)


@pytest.mark.parametrize("mode", MODES)
def test_routers_and_skipped_modules_are_bit_identical(mode, exports, source):
    out, _ = exports[mode]
    ckpt = source[0]
    stored, original = _tensors(out), _tensors(ckpt)
    untouched = [k for k in original if part_of(k) in UNTOUCHED]
    assert len(untouched) > 20
    for k in untouched:
        assert stored[k].dtype == original[k].dtype and torch.equal(stored[k], original[k]), k
    trained = {router_key(k): v for k, v in load_file(str(ckpt / SIDECAR_DIR / ROUTERS_FILE)).items()}
    exported = {router_key(k): v for k, v in stored.items() if router_key(k) is not None}
    assert set(exported) == {(1, "weight"), (1, "bias"), (3, "weight"), (3, "bias")} == set(trained)
    for k, v in trained.items():
        assert torch.equal(exported[k], v), k


def test_lora_sidecar_is_merged(exports, source):
    ckpt, inputs, expected = source
    out, _ = exports["none"]
    assert not (out / SIDECAR_DIR).exists()
    with torch.no_grad():
        merged = load_pretrained(out)(**inputs).logits
        base_only = load_pretrained(ckpt, adapter=False)(**inputs).logits
    torch.testing.assert_close(_valid(merged, inputs), _valid(expected, inputs), rtol=0, atol=2e-5)
    assert not torch.allclose(_valid(base_only, inputs), _valid(expected, inputs), atol=1e-3)
    settings = (out / SETTINGS_FILE).read_text()
    assert "lora_merged: true" in settings and "quantize: none" in settings


def test_manifest_catches_flipped_byte_and_truncation(exports, tmp_path):
    src, _ = exports["nf4"]
    manifest = json.loads((src / MANIFEST_NAME).read_text())
    assert {"model.safetensors", "config.json", REPORT_JSON, "tokenizer.json"} <= {f["name"] for f in manifest["files"]}
    flipped = tmp_path / "flipped"
    shutil.copytree(src, flipped)
    weights = flipped / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupted"):
        load_pretrained(flipped)
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    tokenizer = truncated / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is truncated"):
        load_pretrained(truncated)


@pytest.mark.parametrize("where", ["quantize_folder", "write_manifest"])
def test_interrupted_export_leaves_no_out(where, source, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, where, boom)
    with pytest.raises(KeyboardInterrupt):
        export(source[0], tmp_path / "out", quantize="nf4", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temporary / staging folders
    if where != "quantize_folder":
        return
    # an existing OUT survives a failed --overwrite untouched (an earlier output of ours: others are refused)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="not written by pmod-convert"):
        export(source[0], tmp_path / "out", quantize="nf4", overwrite=True, progress=False)
    (tmp_path / "out" / OUTPUT_MARKER).write_text("")
    with pytest.raises(KeyboardInterrupt):
        export(source[0], tmp_path / "out", quantize="nf4", overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "keep.txt").read_text() == "old"


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_plain_transformers_loads_a_dense_quantized_model(mode, exports, source):
    from transformers import LlavaForConditionalGeneration

    out, _ = exports[mode]
    inputs = source[1]
    model = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    layer = model.model.language_model.layers[1]
    assert not hasattr(layer, "pmod_router")  # routers are ignored: every vision token runs every layer
    assert isinstance(layer.mlp.down_proj, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
        assert model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0).shape[1] == inputs["input_ids"].shape[1] + 2


def test_export_settings_are_checked_before_loading(source, tmp_path):
    ckpt = source[0]
    for kwargs, message in [({"quantize": "nf5"}, "unknown quantization"),
                            ({"quantize": "int8", "double_quant": True}, "double quantization only applies"),
                            ({"quantize": "none", "compute_dtype": "float16"}, "compute dtype only applies"),
                            ({"quantize": "fp4", "compute_dtype": "float64"}, "compute dtype must be one of"),
                            ({"quantize": "nf4", "skip_modules": ["vison_tower"]}, "matches no module")]:
        with pytest.raises(RecipeError, match=message):
            export(ckpt, tmp_path / "out", progress=False, **kwargs)
    with pytest.raises(CheckpointError, match="already exists"):
        export(ckpt, ckpt.parent, quantize="nf4", progress=False)
    with pytest.raises(CheckpointError, match="not a pmod-convert checkpoint"):
        export(ckpt.parent / "dense", tmp_path / "out", quantize="nf4", progress=False)
    assert not (tmp_path / "out").exists()


def test_skip_modules_override_and_4bit_options(source, exports, tmp_path):
    out = tmp_path / "custom"
    report = export(source[0], out, quantize="fp4", double_quant=True, compute_dtype="bfloat16",
                    skip_modules=["vision_tower", "multi_modal_projector", "lm_head", "mlp.down_proj"], progress=False)
    assert "model.language_model.layers.0.mlp.down_proj" in report.skip_modules
    stored = _tensors(out)
    down = next(k for k in stored if k.endswith("layers.2.mlp.down_proj.weight"))
    up = down.replace("down_proj", "up_proj")
    assert stored[down].dtype == torch.float32 and stored[up].dtype == torch.uint8
    assert f"{up}.nested_absmax" in stored  # double quantization stores the scales' own scales
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["bnb_4bit_use_double_quant"] is True and quant["bnb_4bit_compute_dtype"] == "bfloat16"
    assert report.weight_bytes > exports["fp4"][1].weight_bytes  # down_proj kept in float32
    model = load_pretrained(out)
    assert type(model.model.language_model.layers[2].mlp.down_proj) is torch.nn.Linear
    assert model.model.language_model.layers[2].mlp.up_proj.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("family,mode,skipped", [("qwen2_vl", "nf4", "model.visual"), ("idefics3", "int8", "model.connector")])
def test_other_families_export_and_generate(family, mode, skipped, tmp_path):
    save_tiny_checkpoint(family, tmp_path / "dense")
    model = add_routers(load_dense(tmp_path / "dense"), Recipe(schedule=ScheduleSettings(kind="explicit", ratios=RATIOS)))
    save_pretrained(model, tmp_path / "mod", source=tmp_path / "dense")
    report = export(tmp_path / "mod", tmp_path / mode, quantize=mode, progress=False)
    assert skipped in report.skip_modules and report.linears["quantized"] == 4 * 7 and report.size_ratio < 0.6
    loaded = load_pretrained(tmp_path / mode)
    assert [i.ratio for i in layer_infos(loaded)] == RATIOS
    inputs = adapter_by_family(family).dummy_inputs(loaded.config, batch_size=1)
    with torch.no_grad():
        out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


# ---- CLI --------------------------------------------------------------------------------------------
runner = CliRunner()


def _error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_cli_bad_input_is_one_line_and_creates_nothing(source, tmp_path):
    out = tmp_path / "out"
    cases = [(["export", str(tmp_path / "missing"), "--out", str(out), "--quantize", "nf4"], "does not exist"),
             (["export", str(source[0]), "--out", str(out), "--quantize", "int3"], "unknown quantization 'int3'"),
             (["export", str(source[0]), "--out", str(out), "--quantize", "nf4", "--skip-modules", ","], "at least one"),
             (["generate", str(source[0]), "--prompt", "w40", "--image", str(tmp_path / "no.png")], "does not exist"),
             (["generate", str(source[0]), "--prompt", "w40", "--device", "tpu"], "unknown device 'tpu'"),
             (["generate", str(source[0]), "--prompt", "w40", "--dtype", "int4"], "dtype must be one of")]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code != 0
        assert message in _error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_then_generate_verbose(source, tmp_path):
    out = tmp_path / "nf4"
    result = runner.invoke(app, ["export", str(source[0]), "--out", str(out), "--quantize", "nf4", "--double-quant"])
    assert result.exit_code == 0, result.output
    assert "decoder" in result.output and f"wrote {out}" in result.output
    Image.new("RGB", (48, 48), (200, 40, 90)).save(tmp_path / "img.png")
    result = runner.invoke(app, ["generate", str(out), "--image", str(tmp_path / "img.png"), "--prompt", "w40 w41",
                                 "--max-new-tokens", "3", "--verbose"])
    assert result.exit_code == 0, result.output
    answer = result.stdout.splitlines()
    assert len(answer) == 1 and 1 <= len(answer[0].split()) <= 3 and all(w.startswith("w") for w in answer[0].split())
    # 36 image tokens: layer 1 keeps floor(0.5 * 36), layer 3 floor(0.25 * 36)
    rows = {line.split()[1]: line.split() for line in result.stderr.splitlines() if line.startswith("│")}
    assert rows["1"][5:8] == ["36", "│", "18"] and rows["3"][5:8] == ["36", "│", "9"]
    result = runner.invoke(app, ["export", str(source[0]), "--out", str(out), "--quantize", "int8"])
    assert result.exit_code != 0 and "already exists" in _error_line(result)


def test_generate_answers_for_dense_checkpoints_like_transformers(source, tmp_path):
    """``generate`` takes the dense source too, so dense and MoD answers are one command each."""
    from pmod_convert.data import SampleEncoder
    from pmod_convert.export import generate_answer

    dense = source[0].parent / "dense"
    Image.new("RGB", (48, 48), (20, 140, 200)).save(tmp_path / "img.png")
    result = generate_answer(dense, "w40 w41", tmp_path / "img.png", max_new_tokens=4, device="cpu", dtype="float32")
    encoder = SampleEncoder.from_pretrained(dense)
    inputs = encoder.encode_prompt(images=[tmp_path / "img.png"], prompt="w40 w41")
    with torch.no_grad():
        reference = load_dense(dense).generate(**inputs, max_new_tokens=4, do_sample=False,
                                               pad_token_id=encoder.pad_token_id)
    assert result.text == encoder.decode(reference[0, inputs["input_ids"].shape[1]:])
    assert result.prompt_tokens == inputs["input_ids"].shape[1] and result.retention == []


def test_settings_dataclass_defaults():
    assert ExportSettings("nf4").validate().to_dict()["compute_dtype"] == "float32"
    assert ExportSettings("int8").validate().to_dict()["compute_dtype"] is None


def test_an_export_can_be_exported_again_and_recalibrated(exports, tmp_path):
    """Files that describe one export (manifest, reports) are not carried into the next output."""
    from pmod_convert.api import convert
    from pmod_convert.checkpoint import DERIVED

    first, _ = exports["none"]
    export(first, tmp_path / "again", quantize="int8", progress=False)
    load_pretrained(tmp_path / "again")  # its own manifest checks out
    # add-routers on the exported folder copies its processor files but none of its derived files
    out = convert(first, tmp_path / "reconverted", Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5)))
    assert not {p.name for p in out.iterdir()} & set(DERIVED)
    assert (out / "tokenizer.json").is_file()
    load_pretrained(out)


def test_4bit_on_cpu_with_a_width_bitsandbytes_cannot_run_is_one_line_and_writes_nothing(tmp_path):
    # a user's model with hidden size 96 (as the accuracy benchmark's zoo models): bitsandbytes' CPU 4-bit matmul
    # needs input widths that are multiples of its blocksize 64; the export must say so, not raise a traceback
    save_tiny_checkpoint("llava", tmp_path / "dense", hidden_size=96, intermediate_size=192)
    model = add_routers(load_dense(tmp_path / "dense"), Recipe(schedule=ScheduleSettings(kind="explicit", ratios=RATIOS)))
    save_pretrained(model, tmp_path / "mod", source=tmp_path / "dense")
    with pytest.raises(CheckpointError, match=r"multiple of 64.*\(e\.g\. .*: 96\).*--quantize int8.*nothing was written") as err:
        export(tmp_path / "mod", tmp_path / "nf4", quantize="nf4", progress=False)
    advice = str(err.value).split("--skip-modules ")[1].split(";")[0]  # the value the line tells the user to pass
    assert not (tmp_path / "nf4").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dense", "mod"]
    result = runner.invoke(app, ["export", str(tmp_path / "mod"), "--out", str(tmp_path / "nf4"), "--quantize", "nf4"])
    assert result.exit_code != 0 and "multiple of 64" in _error_line(result) and not (tmp_path / "nf4").exists()
    report = export(tmp_path / "mod", tmp_path / "int8", quantize="int8", progress=False)  # the advice works
    assert report.linears["quantized"] > 0
    report = export(tmp_path / "mod", tmp_path / "nf4", quantize="nf4", skip_modules=advice.split(","), progress=False)
    assert report.linears["quantized"] > 0 and (tmp_path / "nf4").exists()  # so does the --skip-modules value
