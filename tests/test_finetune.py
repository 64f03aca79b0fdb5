"""`pmod-convert finetune`: real transformers + peft + bitsandbytes + accelerate on a tiny LLaVA and PNG images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from pmod_convert import Recipe, ScheduleSettings, convert, layer_infos, load_pretrained
from pmod_convert.cli import app
from pmod_convert.data import (
    DataError,
    SampleEncoder,
    collate,
    model_inputs,
    read_samples,
)
from pmod_convert.errors import PmodError
from pmod_convert.sidecar import SIDECAR_DIR
from pmod_convert.tiny import save_tiny_checkpoint
from pmod_convert.training import REPORT_DIR, FinetuneSettings, finetune
from pmod_convert.training.loop import Scales, forward_backward
from pmod_convert.training.lora import load_base, prepare_for_training
from pmod_convert.training.losses import router_aux_loss
from pmod_convert.training.routing import (
    RouterTaps,
    TextRouting,
    mod_layers,
    routers_are_tied,
    tie_routers,
)

MOD_LAYERS = [1, 2, 3]
# Fast tiny runs: no warmup (step 1 would have lr 0), a high lr so a few steps visibly move things, one
# micro-batch per step, and the last step's weights as the output (these tests check training mechanics).
FAST = dict(warmup_ratio=0.0, lr=1e-2, save_steps=0, stats_samples=8, grad_accum=1, keep_best=False)


def _conversation(i: int, turns: int = 1, images: int = 1) -> list[dict]:
    conv = [{"from": "human", "value": "<image>\n" * images + f"w{40 + i} w41 w42 w43"}, {"from": "gpt", "value": f"w{100 + i} w101 w102"}]
    for t in range(1, turns):
        conv += [{"from": "human", "value": f"w{60 + t} w61"}, {"from": "gpt", "value": f"w{200 + t} w201"}]
    return conv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A converted tiny LLaVA (MoD layers 1-3 at ratio 0.5), 4 PNGs and a 7-row LLaVA-style dataset."""
    root = tmp_path_factory.mktemp("finetune")
    save_tiny_checkpoint("llava", root / "dense")
    convert(root / "dense", root / "mod", Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5, layers=MOD_LAYERS)))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    rows = [{"id": f"s{i}", "image": f"img{i % 4}.png", "conversations": _conversation(i, turns=1 + i % 2)}
            for i in range(5)]
    rows.append({"id": "two-images", "image": ["img0.png", "img1.png"], "conversations": _conversation(7, images=2)})
    rows.append({"id": "text-only", "conversations": [{"from": "human", "value": "w33 w34 w35"},
                                                      {"from": "gpt", "value": "w36 w37"}]})
    (root / "train.json").write_text(json.dumps(rows))
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = load_file(str(folder / SIDECAR_DIR / "routers.safetensors"))
    adapter = folder / SIDECAR_DIR / "adapter_model.safetensors"
    if adapter.is_file():
        out.update(load_file(str(adapter)))
    return out


def _base_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and "pmod_router" not in n}


def test_finetune_lowers_loss_changes_only_lora_and_routers(workspace, tmp_path):
    out = tmp_path / "ft"
    seen = {}

    def kind(name):
        return next((k for k in ("lora_A", "lora_B", "pmod_router") if k in name), name)

    def capture(record, model):
        seen["after"] = _base_state(model)
        seen["lora_trainable"] = sorted({kind(n) for n, p in model.named_parameters() if p.requires_grad})

    settings = FinetuneSettings(max_steps=12, batch_size=2, router_aux_coef=0.01, loss="ce", router_rank_coef=0.0,
                                **FAST)
    summary = finetune(workspace / "mod", workspace / "train.json", workspace / "images", out=out, settings=settings,
                       callbacks=[capture], show_progress=False)
    log = [json.loads(line) for line in (out / REPORT_DIR / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert summary["final_loss_mean10"] < summary["first_loss"] - 0.3
    assert sum(r["loss"] for r in log[-3:]) / 3 < log[0]["loss"] - 0.5
    assert all(r["router_aux_loss"] is not None and r["tokens_per_s"] > 0 for r in log)

    # Only LoRA A/B and router parameters are trainable, and every other weight is bit-identical.
    assert seen["lora_trainable"] == ["lora_A", "lora_B", "pmod_router"]
    original = _base_state(load_pretrained(workspace / "mod"))
    after = seen["after"]
    assert len(after) == len(original) > 50
    for name, value in after.items():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value, original[key]), name

    # The sidecar holds the trained LoRA and routers; routers moved away from their zero init.
    weights = _weights(out)
    routers = {k: v for k, v in weights.items() if "pmod_router" in k}
    assert sorted(routers) == sorted(f"layers.{i}.pmod_router.{w}" for i in MOD_LAYERS for w in ("weight", "bias"))
    assert all(v.abs().max() > 1e-3 for k, v in routers.items() if k.endswith("weight"))
    assert all(v.abs().max() > 1e-4 for k, v in weights.items() if "lora_B" in k)

    # Report: retained share equals the ratio (top-k), TanhNorm weights of kept/skipped tokens, files beside it.
    for layer in summary["layers"]:
        assert layer["retained"] == pytest.approx(0.5) and layer["total"] > 0
        assert layer["weight_kept"] > layer["weight_skipped"]  # the top-k by logit have the higher weights
    for name in ("finetune.yaml", "log.jsonl", "summary.json", "finetune.png"):
        assert (out / REPORT_DIR / name).is_file()
    assert FinetuneSettings.load(out / REPORT_DIR / "finetune.yaml") == settings
    assert not (workspace / "mod" / SIDECAR_DIR).exists()  # the source checkpoint is untouched with --out

    # load_pretrained applies the adapter: the finetuned model predicts the answers better than the base.
    loaded = load_pretrained(out)
    assert isinstance(loaded, PeftModel)
    assert [i.ratio for i in layer_infos(loaded)] == [None, 0.5, 0.5, 0.5]
    enc = SampleEncoder.from_pretrained(out)
    batch = collate([enc.encode(s) for s in read_samples(workspace / "train.json", workspace / "images").samples],
                    pad_token_id=enc.pad_token_id, padding_side="right")

    def answer_loss(model):
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    assert answer_loss(loaded) < answer_loss(load_pretrained(out, adapter=False)) - 0.5


class Interrupted(Exception):
    pass


def test_killed_and_resumed_run_matches_uninterrupted(workspace, tmp_path):
    # batch 1 x accumulation 2 over 7 samples: 4 steps per epoch, so 7 steps cross an epoch boundary;
    # dropout on, to check the RNG state is restored.
    settings = FinetuneSettings(max_steps=7, batch_size=1, router_aux_coef=0.01, lora_dropout=0.1,
                                **{**FAST, "grad_accum": 2, "save_steps": 2, "lr": 5e-3, "warmup_ratio": 0.2,
                                   "keep_best": True, "eval_steps": 3})
    data = (workspace / "mod", workspace / "train.json", workspace / "images")
    finetune(*data, out=tmp_path / "a", settings=settings, show_progress=False)

    def kill_after_step_3(record, model):  # mid-epoch: 4 steps per epoch, the checkpoint at step 2
        if record["step"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune(*data, out=tmp_path / "b", settings=settings, callbacks=[kill_after_step_3], show_progress=False)
    run_dir = tmp_path / "b-finetune-run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]
    assert not (tmp_path / "b").exists()  # nothing half-written

    with pytest.raises(PmodError, match="pass --resume"):  # a fresh start must not silently discard the run
        finetune(*data, out=tmp_path / "b", settings=settings, show_progress=False)
    with pytest.raises(PmodError, match="settings differ.*lr"):
        finetune(*data, out=tmp_path / "b", settings=settings.replace(lr=1e-3), resume=True, show_progress=False)

    summary = finetune(*data, out=tmp_path / "b", settings=settings, resume=True, show_progress=False)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 7
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log_a = (tmp_path / "a" / REPORT_DIR / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / REPORT_DIR / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in log_a] == [json.loads(x)["loss"] for x in log_b]
    val_a = json.loads((tmp_path / "a" / REPORT_DIR / "summary.json").read_text())["validation"]
    val_b = json.loads((tmp_path / "b" / REPORT_DIR / "summary.json").read_text())["validation"]
    def curve(v):  # everything but the seconds each validation took
        return [{k: x for k, x in r.items() if k != "seconds"} for r in v["curve"]]

    assert val_a["kept"] == val_b["kept"] and curve(val_a) == curve(val_b) and len(curve(val_a)) == 4


def test_two_process_accelerate_launch_matches_one_process(workspace, tmp_path):
    """2 CPU processes x batch 1 see the same samples per step as 1 process x batch 2, with the same loss."""
    common = ["--max-steps", "3", "--lr", "1e-2", "--warmup-ratio", "0", "--lora-dropout", "0", "--seed", "3",
              "--save-steps", "2", "--stats-samples", "4"]
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15's simple launcher needs an
    # mpirun hostfile for more); `--multi_gpu` starts them with torchrun, and ACCELERATE_USE_CPU makes them form a
    # CPU (gloo) process group (finetune also does that by itself when no GPU is present).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pmod_convert.cli", "finetune",
           str(workspace / "mod"), "--data", str(workspace / "train.json"), "--image-folder", str(workspace / "images"),
           "--out", str(tmp_path / "ddp"), "--batch-size", "1", "--json", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["num_processes"] == 2 and summary["steps"] == 3
    ckpt = tmp_path / "ddp-finetune-run" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("rng")) == [
        "rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors"]
    assert not list(ckpt.glob("*.pt"))  # nothing pickled

    single = CliRunner().invoke(app, ["finetune", str(workspace / "mod"), "--data", str(workspace / "train.json"),
                                      "--image-folder", str(workspace / "images"), "--out", str(tmp_path / "one"),
                                      "--batch-size", "2", *common])
    assert single.exit_code == 0, single.output
    two = [json.loads(x) for x in (tmp_path / "ddp" / REPORT_DIR / "log.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / REPORT_DIR / "log.jsonl").read_text().splitlines()]
    assert [r["ce"] for r in two] == pytest.approx([r["ce"] for r in one], rel=1e-4)
    # The default objective: distillation KL (~4e-4 per token here, so float32 noise is ~1e-4 of it) and the
    # routers' ranking loss, normalised over the whole window on both processes.
    assert all(r["kl"] > 0 and r["router_rank_loss"] > 0 for r in one)
    assert [r["kl"] for r in two] == pytest.approx([r["kl"] for r in one], rel=2e-3)
    assert [r["router_rank_loss"] for r in two] == pytest.approx([r["router_rank_loss"] for r in one], rel=2e-3)
    assert isinstance(load_pretrained(tmp_path / "ddp"), PeftModel)


def test_qlora_trains_lora_on_a_real_4bit_base(workspace, tmp_path):
    import bitsandbytes as bnb

    seen = {}

    def capture(record, model):
        seen["4bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        seen["router_dtype"] = {p.dtype for n, p in model.named_parameters() if "pmod_router" in n}

    summary = finetune(workspace / "mod", workspace / "train.json", workspace / "images", out=tmp_path / "q",
                       settings=FinetuneSettings(qlora=True, max_steps=4, batch_size=2, gradient_checkpointing=True,
                                                 loss="ce", **FAST),
                       callbacks=[capture], show_progress=False)
    assert seen["4bit"] == 4 * 7  # every q/k/v/o/gate/up/down of the 4 language-model layers
    assert seen["router_dtype"] == {torch.float32}
    assert summary["final_loss"] < summary["first_loss"]
    loaded = load_pretrained(tmp_path / "q")  # the adapter applies to the unquantized base too
    assert isinstance(loaded, PeftModel)
    assert any(v.abs().max() > 0 for k, v in _weights(tmp_path / "q").items() if "lora_B" in k)


def test_bad_rows_error_or_are_skipped(workspace, tmp_path):
    rows = json.loads((workspace / "train.json").read_text())
    rows.insert(3, {"id": "too-long", "image": "img0.png",
                    "conversations": [{"from": "human", "value": "<image>\n" + " ".join(["w50"] * 80)},
                                      {"from": "gpt", "value": "w51"}]})
    long = tmp_path / "long.json"
    long.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"row 4 \(id 'too-long'\): has 1\d\d tokens, more than max_length 100"):
        finetune(workspace / "mod", long, workspace / "images", out=tmp_path / "o",
                 settings=FinetuneSettings(max_length=100, max_steps=1), show_progress=False)
    rows.insert(2, {"id": "missing-image", "image": "nope.png", "conversations": _conversation(0)})
    empty = tmp_path / "empty.json"  # an empty answer would teach the model to answer nothing
    empty.write_text(json.dumps([{**rows[0], "id": "blank", "conversations": [
        rows[0]["conversations"][0], {"from": "gpt", "value": "  "}]}] + rows[4:]))
    with pytest.raises(DataError, match=r"row 1 \(id 'blank'\): has an empty answer.*--skip-bad-rows"):
        finetune(workspace / "mod", empty, workspace / "images", out=tmp_path / "o",
                 settings=FinetuneSettings(max_steps=1), show_progress=False)
    rows.insert(1, {**rows[0], "id": "blank", "conversations": [rows[0]["conversations"][0],
                                                                 {"from": "gpt", "value": ""}]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    args = ["finetune", str(workspace / "mod"), "--data", str(bad), "--image-folder", str(workspace / "images"),
            "--out", str(tmp_path / "o"), "--max-length", "100", "--max-steps", "1", "--stats-samples", "1"]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "row 4 (id 'missing-image')" in result.output and "--skip-bad-rows" in result.output
    assert not (tmp_path / "o").exists()

    result = runner.invoke(app, [*args, "--skip-bad-rows"])
    assert result.exit_code == 0, result.output
    assert "skipped 3 bad rows" in result.output
    summary = json.loads((tmp_path / "o" / REPORT_DIR / "summary.json").read_text())
    assert summary["skipped_rows"] == 3 and summary["samples"] == 7
    assert any("missing-image" in r for r in summary["skipped_reasons"])
    assert any("'blank'" in r and "empty answer" in r for r in summary["skipped_reasons"])


def _tiny_training_model(workspace, **settings):
    s = FinetuneSettings(**settings)
    model = prepare_for_training(load_base(workspace / "mod", s), s)
    enc = SampleEncoder.from_pretrained(workspace / "mod")
    samples = read_samples(workspace / "train.json", workspace / "images").samples
    batch = collate([enc.encode(x) for x in samples], pad_token_id=enc.pad_token_id, padding_side="right")
    return model, batch, s


def test_route_text_routes_answers_never_instructions(workspace):
    model, batch, _ = _tiny_training_model(workspace, lora_r=0)
    with torch.no_grad():
        for _, layer in mod_layers(model):  # non-zero routers, so the selection depends on the tokens
            layer.pmod_router.weight.normal_(std=1.0)
    inputs = model_inputs(batch)
    vision = batch["input_ids"] == model.config.image_token_id
    instruction, real = batch["instruction_mask"], batch["attention_mask"].bool()
    with RouterTaps(model) as taps, TextRouting(model) as text:
        text.set_batch(instruction, batch["attention_mask"])
        with taps.record():
            model(**inputs)
        assert torch.equal(model._pmod_context.is_target, (vision | ~instruction) & real)
        assert len(taps.records) == len(MOD_LAYERS)
        for rec in taps.records:
            assert not rec.targets[instruction].any() and not rec.targets[~real].any()
            assert rec.keep[instruction].all()  # instructions are never skipped
            answers = rec.targets & ~vision
            assert (~rec.keep & answers).any()  # answer text is routed, and some of it skipped
            n = rec.targets.sum(1)
            assert torch.equal((rec.keep & rec.targets).sum(1), torch.floor(n * 0.5 + 1e-6).long())
    # Without the override the engine routes vision tokens only (what inference does).
    with RouterTaps(model) as taps, taps.record():
        model(**inputs)
        assert len(taps.records) == len(MOD_LAYERS)
        assert all(torch.equal(rec.targets, vision) for rec in taps.records)


def test_shared_router_is_one_set_of_parameters_and_is_saved_per_layer(workspace, tmp_path):
    model, _, _ = _tiny_training_model(workspace, lora_r=0)
    assert not routers_are_tied(model)
    shared = tie_routers(model)
    assert routers_are_tied(model)
    assert all(layer.pmod_router.weight is shared.weight and layer.pmod_router.bias is shared.bias
               for _, layer in mod_layers(model))

    tied = {}

    def check(record, model):
        tied[record["step"]] = routers_are_tied(model)
        tied["n_router_params"] = sum(1 for n, p in model.named_parameters() if "pmod_router" in n)

    settings = FinetuneSettings(max_steps=3, shared_router=True, route_text=True, router_aux_coef=0.05,
                                gradient_checkpointing=True, train_projector=True, batch_size=2, **FAST)
    summary = finetune(workspace / "mod", workspace / "train.json", workspace / "images", out=tmp_path / "s",
                       settings=settings, callbacks=[check], show_progress=False)
    assert tied == {1: True, 2: True, 3: True, "n_router_params": 2}  # one weight + one bias in total
    routers = load_file(str(tmp_path / "s" / SIDECAR_DIR / "routers.safetensors"))
    assert len(routers) == 2 * len(MOD_LAYERS)
    for i in MOD_LAYERS[1:]:
        assert torch.equal(routers[f"layers.{i}.pmod_router.weight"], routers["layers.1.pmod_router.weight"])
    assert routers["layers.1.pmod_router.weight"].abs().max() > 1e-3
    assert summary["final_loss"] < summary["first_loss"]
    # --train-projector: the projector is trained fully and restored by load_pretrained (peft modules_to_save).
    loaded = load_pretrained(tmp_path / "s")
    assert isinstance(loaded, PeftModel)
    trained = loaded.base_model.model.model.multi_modal_projector.modules_to_save["default"].linear_1.weight
    original = load_pretrained(workspace / "mod").model.multi_modal_projector.linear_1.weight
    assert (trained - original).abs().max() > 1e-3


def test_router_aux_loss_and_checkpointed_gradients(workspace):
    """Taps see the logits the layers route with; checkpointed (non-reentrant) gradients equal plain ones."""
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, batch, s = _tiny_training_model(workspace, router_aux_coef=0.1, route_text=True, lora_dropout=0.0,
                                               gradient_checkpointing=checkpointing)
        with torch.no_grad():
            for _, layer in mod_layers(model):
                layer.pmod_router.weight.normal_(std=0.5)
        with RouterTaps(model) as taps, TextRouting(model) as text:
            if not checkpointing:  # the recorded logits are the router applied to the layer's input
                inputs_seen = {}

                def remember(module, args, kwargs, seen=inputs_seen):
                    seen[module.self_attn.layer_idx] = kwargs.get("hidden_states", args[0] if args else None)

                hooks = [layer.register_forward_pre_hook(remember, with_kwargs=True) for _, layer in mod_layers(model)]
                with torch.no_grad(), taps.record():
                    model(**model_inputs(batch))
                for h in hooks:
                    h.remove()
                for rec in taps.records:
                    layer = dict(mod_layers(model))[rec.layer]
                    expected = layer.pmod_router(inputs_seen[rec.layer]).squeeze(-1).float()
                    assert torch.allclose(rec.logits, expected, atol=1e-6)
                aux = router_aux_loss(taps.records)
                assert aux is not None and aux > 0
            forward_backward(model, [batch], s, device=torch.device("cpu"), scales=Scales(ce=1.0 / 40, kl=0.0),
                             taps=taps, text_routing=text)
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(g.abs().sum() > 0 for n, g in grads[checkpointing].items() if "pmod_router" in n)
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_settings_are_strict_and_validated(tmp_path):
    path = tmp_path / "finetune.yaml"
    FinetuneSettings(lora_r=4, route_text=True).save(path)
    assert FinetuneSettings.load(path) == FinetuneSettings(lora_r=4, route_text=True)
    path.write_text("lora_r: 4\nlearning_rate: 0.1\n")
    with pytest.raises(PmodError, match="unknown key.*learning_rate"):
        FinetuneSettings.load(path)
    with pytest.raises(PmodError, match="mixed_precision"):
        FinetuneSettings(mixed_precision="fp8").validate()
    with pytest.raises(PmodError, match="lora_targets is not a valid regular expression"):
        FinetuneSettings(lora_targets="(").validate()


def test_resume_with_changed_settings_names_both_values(tmp_path):
    """A run made under other settings (e.g. an older default) is refused with what differs, both values, and
    how to resume."""
    from pmod_convert.errors import RecipeError
    from pmod_convert.training.checkpoints import STATE_FILE
    from pmod_convert.training.loop import check_resumable

    (tmp_path / STATE_FILE).write_text(json.dumps({"settings": {**FinetuneSettings().to_dict(), "loss": "kl"}}))
    with pytest.raises(RecipeError, match=r"loss \(run: 'kl', now: 'mix'\).*pass it explicitly"):
        check_resumable(tmp_path, FinetuneSettings())
    check_resumable(tmp_path, FinetuneSettings(loss="kl"))  # the run's value: accepted
