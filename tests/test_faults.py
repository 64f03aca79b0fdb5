"""Fault injection (issue 13, items 7, 8, 10, 11-14): non-finite and out-of-range numbers, bounds, concurrent
writers, interrupted runs, umask, Ctrl-C, export manifests. Each case checks the one-line message, the exit
code and what is on disk afterwards."""

import json
import os
from pathlib import Path

import pytest

from pmod_convert import Recipe, convert, load_pretrained
from pmod_convert import checkpoint as ck
from pmod_convert.checkpoint import OUTPUT_MARKER, atomic_folder, clean_stale, rename_no_replace, scratch_folder
from pmod_convert.errors import CheckpointError, RecipeError
from pmod_convert.export.manifest import MANIFEST_NAME, write_manifest
from pmod_convert.training import FinetuneSettings

from conftest import CONSTANT, copy_tree, one_error_line, run, snapshot


def _edit_config(folder: Path, edit) -> Path:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---- 10. non-finite / out-of-range numbers, refused before any work ----------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--tanh-beta", "nan"], "router.tanh_beta must be a finite number, got nan"),
    (["--tanh-beta", "inf"], "router.tanh_beta must be a finite number, got inf"),
    (["--tanh-alpha", "inf"], "router.tanh_alpha must be a finite number, got inf"),
    (["--tanh-alpha", "-inf"], "router.tanh_alpha must be a finite number, got -inf"),
    (["--layers", "3-1"], "--layers range '3-1' is empty"),
    (["--layers", "0-999999999"], "--layers range '0-999999999' goes past layer 4095"),
    (["--layers", ","], "names no layer"),
])
def test_bad_numbers_on_the_command_line_are_refused_before_loading(dense, tmp_path, args, message):
    before = snapshot(dense)
    code, output = run("add-routers", dense, "--out", tmp_path / "out", *args)
    assert code == 2
    assert message in one_error_line(output)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert snapshot(dense) == before


@pytest.mark.parametrize("text, message", [
    ("router:\n  tanh_beta: .nan\n", "recipe.yaml.router.tanh_beta must be a finite number, got nan"),
    ("router:\n  tanh_alpha: .inf\n", "recipe.yaml.router.tanh_alpha must be a finite number, got inf"),
    ("version: 99\n", "recipe version 99 is not supported"),
    ("version: 0\n", "recipe version 0 is not supported"),
    ("schedule:\n  kind: constant\n  ratio: 0.5\n  layers: []\n", "schedule.layers is empty"),
    ("schedule:\n  kind: constant\n  ratio: 0.5\n  layers: [999999999]\n", "schedule.layers [999999999] are outside"),
    ("schedule:\n  kind: constant\n  ratio: .nan\n", "ratio must be a finite number"),
])
def test_bad_numbers_in_a_recipe_are_refused(dense, tmp_path, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    code, output = run("add-routers", dense, "--out", tmp_path / "out", "--recipe", recipe)
    assert code == 2
    assert message in one_error_line(output)
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError):
        Recipe.load(recipe)


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--lr", "nan"), ("--router-lr", "inf"),
                                            ("--lora-dropout", "nan"), ("--warmup-ratio", "nan"),
                                            ("--distill-temperature", "inf")])
def test_finetune_refuses_non_finite_settings_before_any_work(mod, tmp_path, option, value):
    before = snapshot(mod)
    code, output = run("finetune", mod, "--data", tmp_path / "data.json", "--out", tmp_path / "out", option, value)
    assert code == 2
    assert f"{option[2:].replace('-', '_')} must be a finite number, got {value}" in one_error_line(output)
    assert list(tmp_path.iterdir()) == []  # no output, no run folder
    assert snapshot(mod) == before


def test_finetune_settings_validate_every_float_field():
    floats = [f.name for f in FinetuneSettings.__dataclass_fields__.values() if "float" in str(f.type)]
    assert {"lr", "router_lr", "lora_alpha", "max_grad_norm", "val_fraction"} <= set(floats)
    for name in floats:
        for bad in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(RecipeError, match=f"{name} must be a finite number"):
                FinetuneSettings(**{name: bad}).validate()


@pytest.mark.parametrize("ratio", [-1, 0, 7, "NaN", "0.5"])
def test_stored_layer_ratios_are_validated_on_load(mod, tmp_path, ratio):
    bad = copy_tree(mod, tmp_path / "bad")
    text = (bad / "config.json").read_text()
    config = json.loads(text)
    config["pmod"]["layer_ratios"][1] = ratio
    (bad / "config.json").write_text(json.dumps(config).replace('"NaN"', "NaN"))
    before = snapshot(bad)
    shown = "nan" if ratio == "NaN" else repr(ratio)
    for args in (("inspect", bad), ("add-routers", bad, "--out", tmp_path / "out"),
                 ("export", bad, "--out", tmp_path / "out", "--quantize", "none")):
        code, output = run(*args)
        assert code == 2, args
        assert f"pmod.layer_ratios[1] is {shown}, not a retention ratio in (0, 1]" in one_error_line(output)
    with pytest.raises(CheckpointError, match="the checkpoint is corrupt"):
        load_pretrained(bad)
    assert snapshot(bad) == before and not (tmp_path / "out").exists()


def test_stored_non_finite_router_settings_are_refused(mod, tmp_path):
    bad = _edit_config(copy_tree(mod, tmp_path / "bad"), lambda c: c["pmod"]["router"].update(tanh_beta=float("inf")))
    code, output = run("inspect", bad)
    assert code == 2
    assert "pmod.router.tanh_beta is inf, not a finite number" in one_error_line(output)


def test_stored_non_finite_router_weights_are_refused_on_load(mod, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = copy_tree(mod, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    name = next(k for k in tensors if "pmod_router.weight" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        load_pretrained(bad)


# ---- 12. bounds up front ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", 10**9, "text_config.num_hidden_layers is 1000000000, outside 1..4096"),
    ("hidden_size", "big", "text_config.hidden_size must be an integer, got 'big'"),
    ("hidden_size", 0, "text_config.hidden_size is 0, outside"),
    ("vocab_size", 10**12, "text_config.vocab_size is 1000000000000, outside"),
])
def test_absurd_config_sizes_are_refused_before_allocating(dense, tmp_path, key, value, message):
    bad = _edit_config(copy_tree(dense, tmp_path / "bad"), lambda c: c["text_config"].update({key: value}))
    for args in (("add-routers", bad, "--out", tmp_path / "out"), ("estimate", "--config", bad)):
        code, output = run(*args)
        assert code == 2, args
        assert message in one_error_line(output)
    assert not (tmp_path / "out").exists()


# ---- 7. two writers to the same --out ----------------------------------------------------------------------------
def test_second_writer_to_the_same_out_fails_and_leaves_the_first(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="appeared while it was being written"):
        with atomic_folder(out) as first_tmp:
            (first_tmp / "who").write_text("first")
            with pytest.raises(CheckpointError, match="appeared while it was being written"):
                with atomic_folder(out) as second_tmp:
                    (second_tmp / "who").write_text("second")
                    with atomic_folder(out) as third_tmp:  # commits while the others are still writing
                        (third_tmp / "who").write_text("third")
            assert (out / "who").read_text() == "third"
    assert (out / "who").read_text() == "third"  # neither later commit replaced it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_first_writer_fails_when_the_second_commits_first(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="appeared while it was being written") as info:
        with atomic_folder(out) as a:
            (a / "who").write_text("a")
            with atomic_folder(out) as b:
                (b / "who").write_text("b")
    assert "\n" not in str(info.value)
    assert (out / "who").read_text() == "b" and (out / OUTPUT_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_rename_no_replace_never_replaces(tmp_path, monkeypatch):
    for fallback in (False, True):
        src, dst = tmp_path / f"src{fallback}", tmp_path / f"dst{fallback}"
        src.mkdir(), dst.mkdir()
        (src / "f").write_text("new")
        if fallback:  # no renameat2: the mkdir claim refuses an existing (even empty) folder
            monkeypatch.setattr(ck, "_renameat2", lambda *a: False)
        with pytest.raises(FileExistsError):
            rename_no_replace(src, dst)
        assert list(dst.iterdir()) == [] and (src / "f").read_text() == "new"
        os.rmdir(dst)
        rename_no_replace(src, dst)
        assert (dst / "f").read_text() == "new" and not src.exists()


def test_cli_out_appearing_mid_run_fails_in_one_line(dense, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = ck.copy_processor_files

    def other_writer_commits(source, dest):  # runs inside the atomic block
        out.mkdir()
        (out / "theirs").write_text("theirs")
        return real(source, dest)

    monkeypatch.setattr("pmod_convert.api.copy_processor_files", other_writer_commits)
    code, output = run("add-routers", dense, "--out", out, "--ratio", "0.5")
    assert code == 2
    assert "appeared while it was being written" in one_error_line(output)
    assert snapshot(out) == {"theirs": b"theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- 8. stale leftovers and interrupted replaces -----------------------------------------------------------------
def _leftover(parent: Path, name: str, marker: bool = True) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    if marker:
        (folder / OUTPUT_MARKER).write_text(ck.MARKER_TEXT)
    return folder


def test_stale_leftovers_of_our_own_are_cleaned_on_the_next_run(tmp_path):
    out = tmp_path / "out"
    ours = [_leftover(tmp_path, f".out.{kind}-abc123") for kind in ("tmp", "stage", "old")]
    foreign = _leftover(tmp_path, ".out.tmp-nomarker", marker=False)
    other_name = _leftover(tmp_path, ".other.tmp-abc123")
    odd_name = _leftover(tmp_path, ".out.tmp-abc.extra")
    with scratch_folder(out, "stage") as live:  # a live writer's folder is never touched
        with atomic_folder(out) as tmp:
            (tmp / "f").write_text("new")
        assert live.is_dir()
    assert (out / "f").read_text() == "new"
    assert not any(p.exists() for p in ours)
    assert foreign.is_dir() and other_name.is_dir() and odd_name.is_dir()


def test_killed_writer_leaves_a_folder_the_next_run_removes(tmp_path):
    """kill -9 in the middle of a write: the next run removes the half-written folder (its lock died with it)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    script = ("import os, signal, sys; from pmod_convert.checkpoint import scratch_folder\n"
              f"with scratch_folder({str(out)!r}) as d:\n"
              "    (d / 'model.safetensors').write_bytes(b'half'); os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".out.tmp-") and (left[0] / "model.safetensors").is_file()
    with scratch_folder(out, "stage") as live:
        assert clean_stale(out) == [left[0].name]
        assert live.is_dir() and not left[0].exists()
    assert list(tmp_path.iterdir()) == []


def test_crash_between_the_two_renames_of_a_replace_restores_out(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "f").write_text("old")
    # the state a kill between `OUT -> .OUT.old-*/OUT` and `.OUT.tmp-* -> OUT` leaves behind
    old = _leftover(tmp_path, ".out.old-abc123")
    os.rename(out, old / "out")
    _leftover(tmp_path, ".out.tmp-def456")
    assert not out.exists()
    code, output = run("inspect", out)  # a command that reads OUT: nothing restored, plain error
    assert code == 2
    with pytest.raises(CheckpointError, match="already exists"):  # the next write restores OUT first
        with atomic_folder(out):
            pass
    assert (out / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_second_rename_of_a_replace_puts_out_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "f").write_text("old")
    monkeypatch.setattr(ck, "_renameat2", lambda src, dst, flags: False)  # no atomic exchange on this filesystem
    real, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="No space left on device"):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_with_overwrite_is_an_atomic_exchange(tmp_path):
    out = tmp_path / "out"
    for text in ("old", "new"):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "f").write_text(text)
    assert (out / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- 13. umask and Ctrl-C ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_honour_the_umask(dense, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = convert(dense, tmp_path / "out", CONSTANT)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_ctrl_c_during_finetune_names_the_resumable_checkpoint(mod, tmp_path, monkeypatch):
    import pmod_convert.training as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "finetune", interrupted)
    run_dir = tmp_path / "run"
    code, output = run("finetune", mod, "--data", tmp_path / "d.json", "--out", tmp_path / "out", "--run-dir", run_dir)
    assert code == 130
    assert output.strip() == f"interrupted: no resumable checkpoint was written yet in {run_dir}; run the command again"
    step = run_dir / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    code, output = run("finetune", mod, "--data", tmp_path / "d.json", "--out", tmp_path / "out", "--run-dir", run_dir)
    assert code == 130
    assert output.strip() == f"interrupted: {step} can be resumed (run the same command with --resume)"
    assert not (tmp_path / "out").exists()


# ---- 14. inspect verifies an export's manifest -------------------------------------------------------------------
@pytest.fixture()
def exported(mod, tmp_path):
    folder = copy_tree(mod, tmp_path / "exported")
    (folder / "export_settings.yaml").write_text("quantize: none\n")
    write_manifest(folder)
    return folder


def test_inspect_checks_an_exports_manifest(exported):
    code, output = run("inspect", exported, "--json")
    assert code == 0, output
    weights = exported / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    code, output = run("inspect", exported)
    assert code == 2
    assert "model.safetensors is corrupted: its sha256 differs from pmod_manifest.json" in one_error_line(output)


def test_a_missing_manifest_in_an_export_is_an_error(exported):
    (exported / MANIFEST_NAME).unlink()
    before = snapshot(exported)
    code, output = run("inspect", exported)
    assert code == 2
    assert f"is an export (export_settings.yaml) but has no {MANIFEST_NAME}" in one_error_line(output)
    with pytest.raises(CheckpointError, match="has no pmod_manifest.json"):
        load_pretrained(exported)
    assert snapshot(exported) == before


def test_the_marker_is_not_part_of_the_manifest(exported):
    names = {f["name"] for f in json.loads((exported / MANIFEST_NAME).read_text())["files"]}
    assert OUTPUT_MARKER not in names and "config.json" in names


# ---- 11. read-only output folders, before the expensive work -----------------------------------------------------
def test_read_only_output_folder_is_refused_before_loading(dense, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):  # root ignores the mode: report the folder as read-only the same way
        real = os.access
        monkeypatch.setattr(ck.os, "access", lambda p, mode: False if Path(p) == parent else real(p, mode))
    loaded = []
    monkeypatch.setattr("pmod_convert.api.load_dense", lambda *a, **k: loaded.append(a))
    try:
        code, output = run("add-routers", dense, "--out", parent / "sub" / "out", "--ratio", "0.5")
    finally:
        parent.chmod(0o755)
    assert code == 2
    assert f"cannot write {parent / 'sub' / 'out'}: {parent} is read-only for this user" in one_error_line(output)
    assert loaded == [] and list(parent.iterdir()) == []


def test_full_disk_while_writing_is_one_line_and_leaves_nothing(dense, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pmod_convert.api.copy_processor_files", full)
    code, output = run("add-routers", dense, "--out", tmp_path / "out", "--ratio", "0.5")
    assert code == 2
    assert "No space left on device" in one_error_line(output)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_source_safetensors_are_one_line(dense, mod, tmp_path, damage):
    for source, args in ((dense, ("add-routers",)), (mod, ("inspect",))):
        bad = copy_tree(source, tmp_path / f"bad-{source.name}")
        weights = bad / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + b"garbage")
        extra = ("--out", tmp_path / "out", "--ratio", "0.5") if args == ("add-routers",) else ()
        code, output = run(*args, bad, *extra)
        assert code == 2
        line = one_error_line(output)
        assert "model.safetensors" in line and ("truncated or not a safetensors file" in line or "cannot be read" in line)
        assert not (tmp_path / "out").exists()


def _sidecar_with_lora(mod: Path, dest: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from pmod_convert.sidecar import save_sidecar

    folder = copy_tree(mod, dest)
    model = get_peft_model(load_pretrained(folder), LoraConfig(r=2, target_modules=["q_proj"]))
    save_sidecar(model, folder)
    return folder


def test_corrupt_sidecar_adapter_and_config_are_one_line(mod, tmp_path):
    folder = _sidecar_with_lora(mod, tmp_path / "ft")
    adapter = folder / "pmod_adapter"
    good = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(good[:-10])
    before = snapshot(folder)
    args = ("generate", folder, "--prompt", "w40", "--max-new-tokens", "1", "--device", "cpu")
    code, output = run(*args)
    assert code == 2
    assert "adapter_model.safetensors is truncated or not a safetensors file" in one_error_line(output)
    assert "the LoRA adapter is corrupt" in output
    (adapter / "adapter_model.safetensors").write_bytes(good)
    for text in ("{not json", "[1, 2]"):
        (adapter / "adapter_config.json").write_text(text)
        code, output = run(*args)
        assert code == 2
        assert "adapter_config.json" in one_error_line(output) and "the adapter sidecar is corrupt" in output
    assert snapshot(folder).keys() == before.keys()


def test_generate_without_a_processor_is_one_line(mod, tmp_path):
    bare = copy_tree(mod, tmp_path / "bare")
    for f in bare.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json", "recipe.yaml", OUTPUT_MARKER):
            f.unlink()
    code, output = run("generate", bare, "--prompt", "w40", "--max-new-tokens", "1", "--device", "cpu")
    assert code == 2
    assert f"{bare} has no usable processor" in one_error_line(output)


@pytest.mark.parametrize("args, message", [
    (["--text-tokens", "2000000"], "text tokens must be at most 1048576, got 2000000"),
    (["--vision-tokens", "99999999999"], "vision tokens must be at most 1048576"),
    (["--new-tokens", "100000"], "new tokens must be at most 65536"),
    (["--batch-size", "100000"], "batch size must be at most 4096"),
    (["--text-tokens", "1000000", "--vision-tokens", "48576", "--new-tokens", "1"], "longer than 1048576 tokens"),
])
def test_bench_workload_is_bounded_before_loading(mod, args, message, monkeypatch):
    monkeypatch.setattr("pmod_convert.bench.pair_from_checkpoint", lambda *a, **k: pytest.fail("loaded"))
    code, output = run("bench", mod, *args)
    assert code == 2
    assert message in one_error_line(output)


@pytest.mark.parametrize("args, message", [(["--max-new-tokens", "10000000"], "--max-new-tokens must be in 1..65536"),
                                           (["--batch-size", "0"], "--batch-size must be in 1..4096")])
def test_eval_lengths_are_bounded_before_loading(mod, tmp_path, args, message):
    code, output = run("eval", mod, "--data", tmp_path / "d.json", "--out", tmp_path / "out", *args)
    assert code == 2
    assert message in one_error_line(output)
    assert list(tmp_path.iterdir()) == []


# ---- 11. decompression bombs and over-long rows: row errors, skippable -------------------------------------------
def _rows(tmp_path: Path, rows: list[dict]) -> Path:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(images / "small.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(images / "big.png")
    (tmp_path / "data.json").write_text(json.dumps(rows))
    return tmp_path / "data.json"


def _row(i: int, image: str, question: str = "w40 w41") -> dict:
    return {"id": f"r{i}", "image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                            {"from": "gpt", "value": "w50"}]}


def test_a_decompression_bomb_is_a_row_error_that_skip_bad_rows_skips(mod, tmp_path, monkeypatch):
    from PIL import Image

    data = _rows(tmp_path, [_row(0, "small.png"), _row(1, "big.png")])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 pixels > 2 x 1000: a "bomb"
    code, output = run("eval", mod, "--data", data, "--image-folder", tmp_path / "images", "--out", tmp_path / "e")
    assert code == 2 and "row 2 (id 'r1')" in one_error_line(output) and "decompression bomb" in output.lower()
    assert not (tmp_path / "e").exists()
    code, output = run("eval", mod, "--data", data, "--image-folder", tmp_path / "images", "--out", tmp_path / "e",
                       "--skip-bad-rows")
    assert code == 0, output
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["skipped"] == 1


def test_a_row_longer_than_the_models_positions_is_refused(mod, tmp_path):
    long = " ".join(["w42"] * 1100)  # the tiny model has 1024 positions
    data = _rows(tmp_path, [_row(0, "small.png"), _row(1, "small.png", long)])
    code, output = run("eval", mod, "--data", data, "--image-folder", tmp_path / "images", "--out", tmp_path / "e")
    line = one_error_line(output)
    assert code == 2 and "id 'r1'" in line and "more than the 1024 positions" in line
    assert not (tmp_path / "e").exists()
    code, output = run("eval", mod, "--data", data, "--image-folder", tmp_path / "images", "--out", tmp_path / "e",
                       "--skip-bad-rows")
    assert code == 0, output


def test_a_disk_without_room_for_the_output_is_refused_before_any_work(dense, tmp_path, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda path: real(path)._replace(free=1024))
    code, output = run("add-routers", dense, "--out", tmp_path / "mod")
    line = one_error_line(output)
    assert code == 2 and "MiB free" in line and "choose another --out" in line
    assert not (tmp_path / "mod").exists() and not list(tmp_path.iterdir())


def test_an_in_place_update_cleans_what_a_killed_one_left_and_nothing_else(mod, tmp_path):
    folder = copy_tree(mod, tmp_path / "ckpt")
    dead = folder / ".pmod-update.tmp-dead1"  # a killed run's scratch folder: marker, no live lock
    dead.mkdir()
    (dead / OUTPUT_MARKER).write_text("pmod-convert\n")
    (dead / "model.safetensors").write_bytes(b"half")
    foreign = folder / ".pmod-update.tmp-notours"  # same name shape, no marker: not ours
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with ck.update_in_place(folder) as tmp:
        (tmp / "notes.md").write_text("new")
    assert not dead.exists() and (foreign / "keep.txt").is_file()
    assert (folder / "notes.md").read_text() == "new"
    assert sorted(p.name for p in folder.glob(".pmod-update*")) == [foreign.name]


def test_an_in_place_finetune_into_a_read_only_checkpoint_is_refused_before_training(mod, tmp_path, monkeypatch):
    folder = copy_tree(mod, tmp_path / "ckpt")
    real = os.access
    monkeypatch.setattr(ck.os, "access", lambda p, mode: not (Path(p) == folder and mode & os.W_OK) and real(p, mode))
    before = snapshot(folder)
    code, output = run("finetune", folder, "--data", tmp_path / "missing.json")  # refused before the data is read
    assert code == 2 and f"{folder} is read-only for this user" in one_error_line(output)
    assert snapshot(folder) == before
