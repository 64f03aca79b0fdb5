"""Checkpoint folders: reading configs, copying processor files, atomic writes, router weights."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .mod.router import ROUTER_NAME

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WRITTEN_BY_SAVE = ("config.json", "generation_config.json", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json", "recipe.yaml")
# Files that describe one particular output (its manifest, reports, plots): never carried into a new one.
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


def copy_processor_files(source: str | Path, dest: str | Path) -> list[str]:
    """Copy tokenizer / processor / chat-template files (every top-level non-weight file we do not write)."""
    copied = []
    for item in sorted(Path(source).iterdir()):
        if not item.is_file() or item.name in WRITTEN_BY_SAVE + DERIVED or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        if (Path(dest) / item.name).exists():
            continue
        shutil.copy2(item, Path(dest) / item.name)
        copied.append(item.name)
    return copied


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; move it to ``out`` only if the block completes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def read_router_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every ``*.pmod_router.*`` tensor stored in the checkpoint's safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    marker = f".{ROUTER_NAME}."
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if marker in key:
                        tensors[key] = handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(f"{file} cannot be read ({exc}); the checkpoint is corrupt") from None
    return tensors
