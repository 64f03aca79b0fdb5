"""Security and data safety (issue 13): no pickle, no remote code, no links out of a source, never delete
what we did not write. Each case checks the one-line error, the exit code and what is on disk afterwards."""

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pmod_convert import convert, load_pretrained
from pmod_convert.checkpoint import OUTPUT_MARKER, read_config
from pmod_convert.data import SampleEncoder, read_samples
from pmod_convert.errors import CheckpointError, DataError, UnsupportedArchitecture
from pmod_convert.training import checkpoints as ckpts

from conftest import CONSTANT, copy_tree, one_error_line, run, snapshot


class Payload:
    """Unpickling this creates ``path``: proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def write_images(root: Path, n: int = 4) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        rows.append({"id": f"s{i}", "image": f"img{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nw40 w41"}, {"from": "gpt", "value": f"w{100 + i} w101"}]})
    data = root / "data.json"
    data.write_text(json.dumps(rows))
    return data, images


# ---- 1. finetune --resume never unpickles ------------------------------------------------------------------------
def _real_checkpoint(folder: Path) -> tuple[torch.optim.Optimizer, object]:
    from transformers import get_cosine_schedule_with_warmup

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}], lr=1e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "trainable.safetensors"))
    ckpts.write_state(optimizer.state_dict(), folder, ckpts.OPTIMIZER)
    ckpts.write_state(scheduler.state_dict(), folder, ckpts.SCHEDULER)
    ckpts.write_state(ckpts.rng_state(), folder, "rng-0")
    (folder / ckpts.STATE_FILE).write_text(json.dumps({"step": 2, "num_processes": 1}))
    return optimizer, scheduler


def test_checkpoint_state_round_trips_exactly_without_pickle(tmp_path):
    folder = tmp_path / "step-000002"
    optimizer, scheduler = _real_checkpoint(folder)
    random.random(), np.random.rand(), torch.rand(1)  # move every generator past the saved state
    assert not list(folder.glob("*.pt"))
    ckpt = ckpts.read_checkpoint(folder, 0, 1)
    saved = optimizer.state_dict()
    assert ckpt["optimizer"]["param_groups"] == saved["param_groups"]
    assert sorted(ckpt["optimizer"]["state"]) == sorted(saved["state"]) == [0, 1]
    for i, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(ckpt["optimizer"]["state"][i][key], value), key
    assert ckpt["scheduler"] == scheduler.state_dict()
    ckpts.set_rng_state(ckpt["rng"])
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpts.set_rng_state(ckpts.read_checkpoint(folder, 0, 1)["rng"])
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])
    fresh = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(3, 2))]},
                               {"params": [torch.nn.Parameter(torch.zeros(4))]}])
    fresh.load_state_dict(ckpt["optimizer"])


def test_planted_pickles_are_never_executed(tmp_path):
    folder = tmp_path / "step-000002"
    _real_checkpoint(folder)
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt"):
        plant(folder / name, marker)
    ckpts.read_checkpoint(folder, 0, 1)  # the JSON + safetensors state is read, the .pt files are ignored
    assert not marker.exists()


def test_old_pickle_checkpoint_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "step-000004"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt"):
        plant(folder / name, marker)
    save_file({"w": torch.zeros(2)}, str(folder / "trainable.safetensors"))
    (folder / ckpts.STATE_FILE).write_text(json.dumps({"step": 4, "num_processes": 1}))
    with pytest.raises(CheckpointError, match="old pickle format") as info:
        ckpts.read_checkpoint(folder, 0, 1)
    assert "\n" not in str(info.value) and "without --resume" in str(info.value)
    assert not marker.exists()


def test_damaged_json_state_is_a_one_line_error(tmp_path):
    folder = tmp_path / "step-000002"
    _real_checkpoint(folder)
    (folder / "optimizer.json").write_text('{"tensors": true, "value": {"__tensor__": "missing"}}')
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpts.read_checkpoint(folder, 0, 1)
    with pytest.raises(CheckpointError, match="without pickle"):
        ckpts.write_state({"x": object()}, tmp_path, "bad")


def test_cli_resume_refuses_an_old_pickle_run(mod, tmp_path):
    data, images = write_images(tmp_path)
    run_dir = tmp_path / "run"
    common = ["finetune", mod, "--data", data, "--image-folder", images, "--run-dir", run_dir, "--max-steps", "2",
              "--save-steps", "1", "--lora-r", "0", "--stats-samples", "2"]
    code, output = run(*common, "--out", tmp_path / "a")
    assert code == 0, output
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert not list(newest.glob("*.pt")) and (newest / "optimizer.json").is_file()
    # turn the newest checkpoint into the old format, with payloads
    marker = tmp_path / "pwned"
    for f in list(newest.iterdir()):
        if f.name.startswith(("optimizer", "scheduler", "rng-")):
            f.unlink()
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt"):
        plant(newest / name, marker)
    code, output = run(*common, "--out", tmp_path / "b", "--resume")
    assert code != 0
    assert "old pickle format" in one_error_line(output)
    assert not marker.exists() and not (tmp_path / "b").exists()


# ---- 2. no remote code -------------------------------------------------------------------------------------------
EVIL = "import pathlib\npathlib.Path({path!r}).write_text('ran')\n"


def _with_remote_code(dense: Path, dest: Path, marker: Path, model_type: str) -> Path:
    folder = copy_tree(dense, dest)
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                "AutoModelForImageTextToText": "evil.EvilModel", "AutoProcessor": "evil.EvilProcessor"}
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map=auto_map)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer_config.json", "processor_config.json"):
        data = json.loads((folder / name).read_text())
        data["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None], "AutoProcessor": "evil.EvilProcessor"}
        (folder / name).write_text(json.dumps(data))
    (folder / "evil.py").write_text(EVIL.format(path=str(marker)))
    return folder


def test_unknown_family_with_auto_map_is_refused_before_transformers(dense, tmp_path):
    marker = tmp_path / "ran"
    evil = _with_remote_code(dense, tmp_path / "evil", marker, "evil_vlm")
    before = snapshot(evil)
    data, images = write_images(tmp_path / "data")
    for args in (["add-routers", evil, "--out", tmp_path / "out"],
                 ["calibrate", evil, "--data", data, "--image-folder", images, "--out", tmp_path / "out",
                  "--target-flops", "0.8"],
                 ["generate", evil, "--prompt", "hi"],
                 ["export", evil, "--out", tmp_path / "out", "--quantize", "none"]):
        code, output = run(*args)
        assert code != 0, args
        line = one_error_line(output)
        assert "not a supported multimodal model" in line or "not a pmod-convert checkpoint" in line, line
        assert "[y/N]" not in output
    with pytest.raises(UnsupportedArchitecture):
        SampleEncoder.from_pretrained(evil)
    assert not marker.exists() and not (tmp_path / "out").exists() and snapshot(evil) == before


def test_supported_family_with_auto_map_loads_builtin_code_and_drops_it_from_outputs(dense, tmp_path, caplog):
    marker = tmp_path / "ran"
    source = _with_remote_code(dense, tmp_path / "src", marker, "llava")
    SampleEncoder.from_pretrained(source)
    code, output = run("add-routers", source, "--out", tmp_path / "out", "--ratio", "0.5")
    assert code == 0, output
    out = tmp_path / "out"
    assert not (out / "evil.py").exists()
    for f in out.glob("*.json"):
        assert "auto_map" not in json.loads(f.read_text()), f.name
    load_pretrained(out)
    assert not marker.exists()


# ---- 3. safetensors only -----------------------------------------------------------------------------------------
def test_pickle_only_checkpoint_needs_allow_pickle(dense, tmp_path):
    source = copy_tree(dense, tmp_path / "bin")
    torch.save(load_file(str(source / "model.safetensors")), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    code, output = run("add-routers", source, "--out", tmp_path / "out")
    assert code != 0 and "pickle weights (pytorch_model.bin)" in one_error_line(output)
    assert "--allow-pickle" in output and not (tmp_path / "out").exists()
    code, output = run("add-routers", source, "--out", tmp_path / "out", "--allow-pickle")
    assert code == 0, output
    assert list((tmp_path / "out").glob("*.safetensors")) and not list((tmp_path / "out").glob("*.bin"))


def _sidecar_with_lora(mod: Path, dest: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from pmod_convert.sidecar import save_sidecar

    folder = copy_tree(mod, dest)
    model = get_peft_model(load_pretrained(folder), LoraConfig(r=2, target_modules=["q_proj"]))
    save_sidecar(model, folder)
    return folder


def test_pickle_or_missing_lora_adapter_is_refused_without_a_download(mod, tmp_path, monkeypatch):
    import peft.utils.save_and_load as peft_io

    def no_network(*args, **kwargs):
        raise AssertionError("peft tried the Hub")

    monkeypatch.setattr(peft_io, "hf_hub_download", no_network)
    monkeypatch.setattr(peft_io, "file_exists", no_network)
    folder = _sidecar_with_lora(mod, tmp_path / "ft")
    adapter = folder / "pmod_adapter"
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only as pickle weights"):
        load_pretrained(folder)
    code, output = run("generate", folder, "--prompt", "w40", "--max-new-tokens", "1", "--device", "cpu")
    assert code != 0 and "--allow-pickle" in one_error_line(output)
    load_pretrained(folder, allow_pickle=True)
    (adapter / "adapter_model.bin").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing"):
        load_pretrained(folder)


# ---- 4. links out of a source, images out of the image folder --------------------------------------------------
def test_links_out_of_the_source_are_not_copied(dense, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    source = copy_tree(dense, tmp_path / "src")
    (source / "notes.txt").symlink_to(secret)
    (source / "inside.txt").write_text("fine")
    (source / "alias.txt").symlink_to(source / "inside.txt")
    out = convert(source, tmp_path / "out", CONSTANT)
    assert not (out / "notes.txt").exists()
    assert (out / "alias.txt").read_text() == "fine" and not (out / "alias.txt").is_symlink()


def test_hugging_face_cache_blob_links_are_followed(dense, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot_dir, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot_dir.mkdir(parents=True)
    blobs.mkdir()
    for f in dense.iterdir():
        (blobs / f"sha-{f.name}").write_bytes(f.read_bytes())
        (snapshot_dir / f.name).symlink_to(Path("../../blobs") / f"sha-{f.name}")
    out = convert(snapshot_dir, tmp_path / "out", CONSTANT)
    assert (out / "tokenizer.json").read_bytes() == (dense / "tokenizer.json").read_bytes()


def test_image_paths_must_stay_inside_the_image_folder(tmp_path):
    data, images = write_images(tmp_path / "d")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (images / "link.png").symlink_to(outside)
    rows = json.loads(data.read_text())
    good = rows[0]
    for bad in ("../../outside.png", str(outside), "link.png"):
        data.write_text(json.dumps([good, {**good, "id": "bad", "image": bad}]))
        with pytest.raises(DataError, match="outside the image folder") as info:
            read_samples(data, images)
        assert "--allow-outside-images" in str(info.value) and "\n" not in str(info.value)
        assert len(read_samples(data, images, skip_bad_rows=True)) == 1
        assert len(read_samples(data, images, allow_outside_images=True)) == 2


# ---- 5. calibrate in place ---------------------------------------------------------------------------------------
def test_calibrate_in_place_keeps_what_it_does_not_write(mod, dense, tmp_path):
    data, images = write_images(tmp_path / "d", n=8)
    folder = copy_tree(mod, tmp_path / "ckpt")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.md").write_text("my notes")
    (folder / "extra.bin").write_bytes(b"\0" * 10)
    keep = {k: v for k, v in snapshot(folder).items() if k in (".git/HEAD", "notes.md", "extra.bin")}
    code, output = run("calibrate", folder, "--data", data, "--image-folder", images, "--target-kv", "0.8",
                       "--samples", "8", "--no-warm-start", "--holdout", "0")
    assert code == 0, output
    after = snapshot(folder)
    assert all(after[k] == v for k, v in keep.items())
    assert (folder / "calibration_report.json").is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".pmod-update-")]
    assert read_config(folder)["pmod"]["layer_ratios"] != read_config(mod)["pmod"]["layer_ratios"]
    load_pretrained(folder)

    plain = copy_tree(dense, tmp_path / "plain")
    before = snapshot(plain)
    code, output = run("calibrate", plain, "--data", data, "--image-folder", images, "--target-kv", "0.8")
    assert code != 0 and "--out" in one_error_line(output) and "dense" in output
    assert snapshot(plain) == before


# ---- 6. --overwrite replaces only our own outputs ----------------------------------------------------------------
def test_overwrite_never_replaces_a_source_its_parent_cwd_or_a_foreign_folder(dense, mod, tmp_path, monkeypatch):
    parent = tmp_path / "models"
    source = copy_tree(dense, parent / "src")
    before = snapshot(parent)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep me")
    work = tmp_path / "work"
    work.mkdir()
    (work / "file.txt").write_text("keep me too")
    monkeypatch.chdir(work)
    cases = [(["add-routers", source, "--out", parent, "--overwrite"], "source"),
             (["add-routers", source, "--out", source, "--overwrite"], "source"),
             (["add-routers", source, "--out", work, "--overwrite"], "current directory"),
             (["add-routers", source, "--out", ".", "--overwrite"], "current directory"),
             (["add-routers", source, "--out", foreign, "--overwrite"], "not written by pmod-convert"),
             (["export", mod, "--out", mod.parent, "--quantize", "none", "--overwrite"], "source"),
             (["export", mod, "--out", foreign, "--quantize", "none", "--overwrite"], "not written by pmod-convert"),
             # inside a source: e.g. a finetune sidecar folder (it carries our marker) or a new subfolder
             (["add-routers", source, "--out", source / "pmod_adapter", "--overwrite"], "inside the source"),
             (["add-routers", source, "--out", source / "sub"], "inside the source")]
    (source / "pmod_adapter").mkdir()
    (source / "pmod_adapter" / OUTPUT_MARKER).write_text("")
    before = snapshot(parent)
    for args, message in cases:
        code, output = run(*args)
        assert code != 0, args
        assert message in one_error_line(output), (args, output)
    assert snapshot(parent) == before
    assert (foreign / "data.txt").read_text() == "keep me" and (work / "file.txt").read_text() == "keep me too"
    # an earlier output of ours is replaced, and carries the marker
    out = tmp_path / "out"
    assert run("add-routers", source, "--out", out)[0] == 0
    assert (out / OUTPUT_MARKER).is_file()
    code, output = run("add-routers", source, "--out", out, "--ratio", "0.5", "--overwrite")
    assert code == 0, output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("add-routers", source, "--out", empty, "--overwrite")[0] == 0
    assert os.listdir(tmp_path / "work") == ["file.txt"]


# ---- 7. --allow-pickle / --allow-outside-images on every command that loads weights or data -------------------------
def _pickle_only(folder: Path, dest: Path) -> Path:
    """A copy of ``folder`` whose weights are only ``pytorch_model.bin``."""
    source = copy_tree(folder, dest)
    torch.save(load_file(str(source / "model.safetensors")), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    return source


@pytest.fixture(scope="module")
def flagged(dense, mod, tmp_path_factory):
    """Pickle-only dense and pmod checkpoints, a good dataset and one whose second row's image lies outside."""
    root = tmp_path_factory.mktemp("flags")
    data, images = write_images(root / "d", n=6)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "d" / "outside.png")
    rows = json.loads(data.read_text())
    outside = root / "d" / "outside.json"
    outside.write_text(json.dumps([rows[0], {**rows[1], "image": "../outside.png"}, *rows[2:]]))
    return {"dense": _pickle_only(dense, root / "dense-bin"), "mod": _pickle_only(mod, root / "mod-bin"),
            "data": data, "outside": outside, "images": images, "root": root}


PICKLE_REFUSED = "holds only pickle weights"
OUTSIDE_REFUSED = "outside the image folder"


def _refused(args, message, flag, *paths_absent):
    code, output = run(*args)
    assert code != 0, (args, output)
    line = one_error_line(output)
    assert message in line and flag in line, line
    for path in paths_absent:
        assert not Path(path).exists(), path


def test_pickle_only_pmod_checkpoint_loads_with_allow_pickle(flagged, mod):
    with pytest.raises(CheckpointError, match=PICKLE_REFUSED):
        load_pretrained(flagged["mod"])
    model, reference = load_pretrained(flagged["mod"], allow_pickle=True), load_pretrained(mod)
    routers = {k: v for k, v in reference.state_dict().items() if "pmod_router" in k}
    assert routers and all(torch.equal(model.state_dict()[k], v) for k, v in routers.items())


def test_finetune_flags(flagged, mod, tmp_path):
    f = flagged
    common = ["--image-folder", f["images"], "--max-steps", "1", "--lora-r", "0", "--stats-samples", "2",
              "--save-steps", "0", "--val-min", "2"]
    before = snapshot(f["mod"])
    _refused(["finetune", f["mod"], "--data", f["data"], "--out", tmp_path / "a", *common], PICKLE_REFUSED,
             "--allow-pickle", tmp_path / "a", tmp_path / "a-finetune-run")
    _refused(["finetune", mod, "--data", f["outside"], "--out", tmp_path / "b", *common], OUTSIDE_REFUSED,
             "--allow-outside-images", tmp_path / "b")
    _refused(["finetune", mod, "--data", f["data"], "--val-data", f["outside"], "--out", tmp_path / "b", *common],
             OUTSIDE_REFUSED, "--allow-outside-images", tmp_path / "b")
    code, output = run("finetune", f["mod"], "--data", f["outside"], "--val-data", f["outside"],
                       "--out", tmp_path / "c", *common, "--allow-pickle", "--allow-outside-images")
    assert code == 0, output
    assert (tmp_path / "c" / "pmod_adapter").is_dir() and snapshot(f["mod"]) == before
    load_pretrained(tmp_path / "c", allow_pickle=True)


def test_finetune_flags_do_not_block_resume(flagged, tmp_path):
    f = flagged
    common = ["finetune", f["mod"], "--data", f["outside"], "--image-folder", f["images"], "--run-dir",
              tmp_path / "run", "--max-steps", "2", "--save-steps", "1", "--lora-r", "0", "--stats-samples", "2",
              "--val-min", "2", "--allow-pickle", "--allow-outside-images"]
    assert run(*common, "--out", tmp_path / "a")[0] == 0
    code, output = run(*common, "--out", tmp_path / "b", "--resume")
    assert code == 0, output


def test_eval_flags(flagged, mod, tmp_path):
    f = flagged
    common = ["--image-folder", f["images"], "--limit", "2", "--batch-size", "2", "--max-new-tokens", "1",
              "--device", "cpu"]
    _refused(["eval", f["mod"], "--data", f["data"], "--out", tmp_path / "a", *common], PICKLE_REFUSED,
             "--allow-pickle", tmp_path / "a")
    _refused(["eval", f["dense"], "--data", f["data"], "--out", tmp_path / "a", *common], PICKLE_REFUSED,
             "--allow-pickle", tmp_path / "a")
    _refused(["eval", mod, "--data", f["outside"], "--out", tmp_path / "a", *common], OUTSIDE_REFUSED,
             "--allow-outside-images", tmp_path / "a")
    for name, checkpoint in (("mod", f["mod"]), ("dense", f["dense"])):
        code, output = run("eval", checkpoint, "--data", f["outside"], "--out", tmp_path / name, *common,
                           "--allow-pickle", "--allow-outside-images")
        assert code == 0, output
        assert json.loads((tmp_path / name / "summary.json").read_text())["samples"] == 2


def test_calibrate_flags(flagged, mod, tmp_path):
    f = flagged
    common = ["--image-folder", f["images"], "--target-kv", "0.8", "--samples", "4", "--no-warm-start",
              "--holdout", "0"]
    before = snapshot(f["dense"])
    _refused(["calibrate", f["dense"], "--data", f["data"], "--out", tmp_path / "a", *common], PICKLE_REFUSED,
             "--allow-pickle", tmp_path / "a")
    _refused(["calibrate", mod, "--data", f["outside"], "--out", tmp_path / "a", *common], OUTSIDE_REFUSED,
             "--allow-outside-images", tmp_path / "a")
    _refused(["calibrate", f["dense"], "--data", f["outside"], "--out", tmp_path / "a", *common, "--method", "fastv",
              "--allow-pickle"], OUTSIDE_REFUSED, "--allow-outside-images", tmp_path / "a")
    code, output = run("calibrate", f["dense"], "--data", f["outside"], "--out", tmp_path / "b", *common,
                       "--allow-pickle", "--allow-outside-images")
    assert code == 0, output
    assert snapshot(f["dense"]) == before
    assert list((tmp_path / "b").glob("*.safetensors")) and not list((tmp_path / "b").glob("*.bin"))
    load_pretrained(tmp_path / "b")


def test_bench_flag(flagged, mod):
    f = flagged
    common = ["--vision-tokens", "4", "--text-tokens", "4", "--new-tokens", "1", "--repeats", "1", "--warmup", "0",
              "--no-memory"]
    _refused(["bench", f["mod"], *common], PICKLE_REFUSED, "--allow-pickle")
    _refused(["bench", mod, "--dense", f["dense"], *common], PICKLE_REFUSED, "--allow-pickle")
    code, output = run("bench", f["mod"], "--dense", f["dense"], *common, "--allow-pickle")
    assert code == 0, output


def test_compare_flags(flagged, dense, tmp_path):
    f = flagged
    common = ["--image-folder", f["images"], "--budgets", "0.9", "--methods", "fastv", "--limit", "2",
              "--batch-size", "2", "--samples", "4", "--bench-batch", "1", "--bench-repeats", "1"]
    _refused(["compare", f["dense"], "--data", f["data"], "--calib", f["data"], "--out", tmp_path / "a", *common],
             PICKLE_REFUSED, "--allow-pickle")
    _refused(["compare", dense, "--data", f["outside"], "--calib", f["data"], "--out", tmp_path / "b", *common],
             OUTSIDE_REFUSED, "--allow-outside-images")
    code, output = run("compare", f["dense"], "--data", f["outside"], "--calib", f["outside"],
                       "--out", tmp_path / "c", *common, "--allow-pickle", "--allow-outside-images")
    assert code == 0, output
    rows = json.loads((tmp_path / "c" / "compare.json").read_text())["rows"]
    assert [r["error"] for r in rows] == [None, None], rows
