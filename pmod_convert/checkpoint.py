"""Checkpoint folders: reading configs, copying processor files, atomic writes, router weights."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .mod.router import ROUTER_NAME

log = logging.getLogger("pmod_convert")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WRITTEN_BY_SAVE = ("config.json", "generation_config.json", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json", "recipe.yaml")
# Files that describe one particular output (its manifest, reports, plots): never carried into a new one.
OUTPUT_MARKER = ".pmod-convert"
MARKER_TEXT = "written by pmod-convert; --overwrite may replace this folder\n"
DERIVED = ("pmod_manifest.json", "export_report.json", "export_report.png", "export_settings.yaml",
           "calibration_report.json", "calibration_layers.png", "calibration_budget.png")


def read_config(path: str | Path) -> dict:
    """``config.json`` of a checkpoint folder as a dict, with one-line errors for the usual mistakes."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a local Hugging Face checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the checkpoint folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint saved with save_pretrained?")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")
    return data


def link_stays_inside(item: Path, root: Path) -> bool:
    """Whether ``item`` (a file in folder ``root``) is a regular file, or a symlink whose target stays inside
    ``root`` or is a blob of the Hugging Face cache repository that ``root`` is a snapshot of
    (``models--org--name/snapshots/<rev>/file -> ../../blobs/<sha>``)."""
    if not item.is_symlink():
        return True
    try:
        target, base = item.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling or looping link
        return False
    if target.is_relative_to(base):
        return True
    return base.parent.name == "snapshots" and target.parent == base.parent.parent / "blobs"


def copy_processor_files(source: str | Path, dest: str | Path) -> list[str]:
    """Copy tokenizer / processor / chat-template files (every top-level non-weight file we do not write).

    Never copied, each with a warning on the ``pmod_convert`` logger: Python files (a checkpoint's custom
    code) and symlinks pointing outside ``source`` (the Hugging Face cache's snapshot -> blob links are
    followed). ``auto_map`` entries (references to custom code) are removed from the JSON files of ``dest``.
    """
    source, dest = Path(source), Path(dest)
    copied, skipped = [], []
    for item in sorted(source.iterdir()):
        if item.name in WRITTEN_BY_SAVE + DERIVED + (OUTPUT_MARKER,) or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        if item.name.endswith((".py", ".pyc")) or not link_stays_inside(item, source):
            skipped.append(item.name)
            continue
        if not item.is_file():
            continue
        if (dest / item.name).exists():
            continue
        shutil.copy2(item, dest / item.name)
        copied.append(item.name)
    if skipped:
        log.warning("not copied from %s: %s (custom code, or links that point outside the folder)",
                    source, ", ".join(skipped))
    drop_remote_code(dest)
    return copied


def drop_remote_code(folder: str | Path) -> list[str]:
    """Remove ``auto_map`` (pointers to a checkpoint's own Python code) from the top-level JSON files of
    ``folder``; returns the names of the files changed (a warning on the ``pmod_convert`` logger names them)."""
    changed = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            del data["auto_map"]
            path.write_text(json.dumps(data, indent=2, sort_keys=path.name == "config.json") + "\n")
            changed.append(path.name)
    if changed:
        log.warning("removed auto_map (custom code references) from %s", ", ".join(changed))
    return changed


def written_by_pmod(folder: str | Path) -> bool:
    """Whether ``folder`` is an output of this toolkit: it holds the ``.pmod-convert`` marker that every folder
    written through :func:`atomic_folder` carries, or (outputs of versions before the marker) a config.json
    with a ``pmod`` section, a finetune sidecar's ``sidecar.json``, a finetune report or an eval output."""
    folder = Path(folder)
    if (folder / OUTPUT_MARKER).is_file() or (folder / "sidecar.json").is_file():
        return True
    if (folder / "summary.json").is_file() and ((folder / "log.jsonl").is_file()
                                                 or (folder / "predictions.jsonl").is_file()):
        return True
    try:
        return isinstance(json.loads((folder / "config.json").read_text()).get("pmod"), dict)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def check_replaceable(out: str | Path, protect: Iterable[str | Path] = ()) -> None:
    """Check that an existing ``out`` may be replaced by ``--overwrite`` (nothing to check when it is absent).

    Raises:
        CheckpointError: ``out`` is not a folder, is the current directory or one of its parents, is one of
            ``protect`` (the command's sources) or a folder holding one, or is a non-empty folder that this
            toolkit did not write (see :func:`written_by_pmod`).
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder (a file or a link); choose another --out")
    target, cwd = out.resolve(), Path.cwd().resolve()
    if cwd == target or cwd.is_relative_to(target):
        raise CheckpointError(f"--out {out} is the current directory or holds it; --overwrite never replaces it, "
                              "choose another --out")
    for source in protect:
        source = Path(source).resolve()
        if source == target or source.is_relative_to(target):
            raise CheckpointError(f"--out {out} is the source {source} or a folder holding it; --overwrite never "
                                  "replaces a source, choose another --out")
    if any(target.iterdir()) and not written_by_pmod(target):
        raise CheckpointError(f"{out} exists and was not written by pmod-convert (no {OUTPUT_MARKER} file); "
                              "--overwrite only replaces pmod-convert's own outputs: choose another --out or "
                              "remove the folder yourself")


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; move it to ``out`` only if the block completes.

    The folder gets the ``.pmod-convert`` marker. An existing ``out`` is replaced only with ``overwrite``
    and only when :func:`check_replaceable` allows it (checked before the block runs and again before the
    move); ``protect``: source folders that must never be replaced.

    Raises:
        CheckpointError: ``out`` exists and ``overwrite`` is false, or it may not be replaced.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    check_replaceable(out, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(MARKER_TEXT)
        if out.exists():
            if not overwrite:
                raise CheckpointError(f"{out} appeared while it was being written; choose another --out or pass "
                                      "--overwrite")
            check_replaceable(out, protect)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def update_in_place(folder: str | Path, written: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder inside ``folder``; when the block completes, move the files written there into
    ``folder`` one by one (each replace is atomic; ``config.json`` goes last), leaving every other file and
    subfolder of ``folder`` (``.git/``, notes, unknown files) untouched. Files equal to the ones already there
    are not moved. ``written``: names of files an earlier save may have written that the new one no longer
    writes (for example other weight shards); those are removed after the move.

    Raises:
        CheckpointError: ``folder`` is not an existing folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass an existing checkpoint folder")
    tmp = Path(tempfile.mkdtemp(prefix=".pmod-update-", dir=folder))
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(MARKER_TEXT)
        new = sorted((p for p in tmp.iterdir() if p.is_file()), key=lambda p: (p.name == "config.json", p.name))
        for item in new:
            dest = folder / item.name
            if dest.is_file() and not dest.is_symlink() and _same_bytes(item, dest):
                continue
            if dest.is_dir() and not dest.is_symlink():
                raise CheckpointError(f"{dest} is a folder where a file is written; move it away and run again")
            os.replace(item, dest)
        names = {p.name for p in new}
        for name in written:
            stale = folder / name
            if name not in names and stale.is_file() and not stale.is_symlink():
                stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(1 << 20)
            if chunk != fb.read(1 << 20):
                return False
            if not chunk:
                return True


def copy_checkpoint_tree(source: str | Path, dest: str | Path, ignore: Iterable[str] = ()) -> None:
    """Copy a checkpoint folder's tree (``shutil.copytree``) without following links that point outside it
    (see :func:`link_stays_inside`), without Python files, and without the top-level names in ``ignore``."""
    root = Path(source)
    skip = set(ignore)

    def _ignored(directory: str, names: list[str]) -> set[str]:
        here = Path(directory)
        out = {n for n in names if n.endswith((".py", ".pyc")) or not link_stays_inside(here / n, root)}
        if here.resolve() == root.resolve():
            out |= skip & set(names)
        return out

    shutil.copytree(root, dest, dirs_exist_ok=True, ignore=_ignored)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(path: str | Path, allow_pickle: bool = False, what: str = "checkpoint",
                        flag: str = "--allow-pickle") -> bool:
    """Check that ``path`` holds its weights as safetensors; returns False when it holds pickle weights that
    ``allow_pickle`` lets through (the caller then loads them with ``weights_only`` pickling).

    Raises:
        CheckpointError: no weight file at all, or only pickle weights (``pytorch_model.bin``,
            ``adapter_model.bin``, ...) and ``allow_pickle`` is false.
    """
    path = Path(path)
    if any(path.glob("*.safetensors")):
        return True
    pickles = sorted(p.name for p in path.glob("*") if p.name.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise CheckpointError(f"{path} has no weights (*.safetensors); pass a complete {what} folder")
    if not allow_pickle:
        raise CheckpointError(f"{path} holds only pickle weights ({pickles[0]}), which pmod-convert does not load; "
                              f"convert the {what} to safetensors, or pass {flag} if you trust the file")
    return False


def weight_files(path: str | Path) -> list[Path]:
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors weights; save the model with safe_serialization")
    return files


_ROUTER_KEY = re.compile(rf"(?:^|\.)layers\.(\d+)\.{ROUTER_NAME}\.(weight|bias)$")


def router_key(key: str) -> tuple[int, str] | None:
    """``(layer index, "weight" | "bias")`` of a router parameter name, else None.

    Matching on the layer-relative suffix makes the name independent of where transformers puts the
    text model on disk (5.x saves LLaVA as ``language_model.model.layers.N`` while the module tree
    has ``model.language_model.layers.N``).
    """
    match = _ROUTER_KEY.search(key)
    return (int(match.group(1)), match.group(2)) if match else None


def read_routers(path: str | Path) -> dict[tuple[int, str], torch.Tensor]:
    """Router tensors of a checkpoint keyed by ``(layer index, "weight" | "bias")``."""
    out = {}
    for key, value in read_router_tensors(path).items():
        parsed = router_key(key)
        if parsed is not None:
            out[parsed] = value
    return out


def read_router_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every ``*.pmod_router.*`` tensor stored in the checkpoint's safetensors files (with ``allow_pickle``, in
    its ``pytorch_model*.bin`` files when it has no safetensors; read with ``weights_only`` unpickling)."""
    tensors: dict[str, torch.Tensor] = {}
    marker = f".{ROUTER_NAME}."
    if allow_pickle and not any(Path(path).glob("*.safetensors")):
        for file in sorted(Path(path).glob("pytorch_model*.bin")):
            try:
                state = torch.load(str(file), map_location="cpu", weights_only=True)
            except Exception as exc:  # a truncated file, or a pickle weights_only refuses
                raise CheckpointError(f"{file} cannot be read ({str(exc).splitlines()[0] if str(exc) else exc}); "
                                      "the checkpoint is corrupt") from None
            tensors.update({k: v for k, v in state.items() if marker in k})
        return tensors
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if marker in key:
                        tensors[key] = handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(f"{file} cannot be read ({exc}); the checkpoint is corrupt") from None
    return tensors
