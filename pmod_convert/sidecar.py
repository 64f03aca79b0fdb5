"""The finetune sidecar: a LoRA adapter plus trained routers stored beside an untouched base.

Layout inside a pmod checkpoint folder (like a peft adapter next to its base model)::

    CHECKPOINT/pmod_adapter/
        adapter_config.json, adapter_model.safetensors   peft LoRA (absent when only routers were trained)
        routers.safetensors                              "layers.N.pmod_router.weight|bias"
        sidecar.json                                     format, whether LoRA is present, training summary

``load_pretrained`` applies it; ``export`` merges it.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import atomic_folder, check_safetensors_file, router_key
from .errors import CheckpointError

SIDECAR_DIR = "pmod_adapter"
ROUTERS_FILE = "routers.safetensors"
SIDECAR_FILE = "sidecar.json"
SIDECAR_FORMAT = 1


def router_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router parameters keyed ``layers.N.pmod_router.weight|bias`` (independent of wrappers like peft)."""
    out = {}
    for name, param in model.named_parameters():
        parsed = router_key(name)
        if parsed is not None:
            out[f"layers.{parsed[0]}.pmod_router.{parsed[1]}"] = param.detach().to("cpu").contiguous().clone()
    return out


def load_router_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "routers") -> None:
    params = {router_key(n): p for n, p in model.named_parameters() if router_key(n) is not None}
    stored = {router_key(k): v for k, v in state.items() if router_key(k) is not None}
    missing = sorted(set(params) - set(stored))
    if missing:
        layer, kind = missing[0]
        raise CheckpointError(f"{where} lacks the router {kind} of layer {layer} "
                              f"(and {len(missing) - 1} more router tensors); the checkpoint is incomplete")
    with torch.no_grad():
        for key, param in params.items():
            value = stored[key]
            if value.shape != param.shape:
                raise CheckpointError(f"{where}: router {key[1]} of layer {key[0]} has shape "
                                      f"{tuple(value.shape)}, expected {tuple(param.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{where}: router {key[1]} of layer {key[0]} holds NaN or infinite values; "
                                      "the checkpoint is corrupt (re-run calibrate or finetune)")
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def has_sidecar(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / SIDECAR_DIR / SIDECAR_FILE).is_file()


def save_sidecar(model: nn.Module, checkpoint: str | Path, *, summary: dict[str, Any] | None = None,
                 overwrite: bool = True) -> Path:
    """Write the LoRA adapter (if ``model`` is a peft model) and the routers into ``checkpoint/pmod_adapter``."""
    from peft import PeftModel

    dest = Path(checkpoint) / SIDECAR_DIR
    with atomic_folder(dest, overwrite=overwrite) as tmp:
        lora = isinstance(model, PeftModel)
        if lora:
            model.save_pretrained(str(tmp), safe_serialization=True)
        save_file(router_state(model), str(tmp / ROUTERS_FILE), metadata={"format": "pt"})
        info = {"format": SIDECAR_FORMAT, "lora": lora, "summary": summary or {}}
        (tmp / SIDECAR_FILE).write_text(json.dumps(info, indent=2))
    return dest


def load_sidecar(model: nn.Module, checkpoint: str | Path, *, is_trainable: bool = False,
                 allow_pickle: bool = False) -> nn.Module:
    """Apply ``checkpoint/pmod_adapter`` to an MoD model: routers loaded, LoRA wrapped with peft.

    The LoRA weights must be ``adapter_model.safetensors`` (``adapter_model.bin`` only with ``allow_pickle``);
    peft is only ever called on a local folder that holds them, so it never falls back to a Hub download.

    Raises:
        CheckpointError: sidecar.json, the routers or the adapter files are missing, corrupt or pickle-only.
    """
    folder = Path(checkpoint) / SIDECAR_DIR
    try:
        info = json.loads((folder / SIDECAR_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / SIDECAR_FILE} cannot be read ({exc}); the adapter sidecar is corrupt") from None
    if info.get("format", 0) > SIDECAR_FORMAT:
        raise CheckpointError(f"{folder} was written by a newer pmod-convert; upgrade pmod-convert")
    try:
        routers = load_file(str(folder / ROUTERS_FILE))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{folder / ROUTERS_FILE} cannot be read ({exc}); the adapter sidecar is corrupt") from None
    load_router_state(model, routers, where=str(folder / ROUTERS_FILE))
    if info.get("lora"):
        from peft import PeftModel

        if not (folder / "adapter_config.json").is_file():
            raise CheckpointError(f"{folder} says it holds a LoRA adapter but adapter_config.json is missing")
        try:
            adapter_config = json.loads((folder / "adapter_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{folder / 'adapter_config.json'} is not valid JSON ({exc}); the adapter sidecar "
                                  "is corrupt") from None
        if not isinstance(adapter_config, dict) or not isinstance(adapter_config.get("peft_type", "LORA"), str):
            raise CheckpointError(f"{folder / 'adapter_config.json'} must hold a peft adapter config (a JSON object); "
                                  "the adapter sidecar is corrupt")
        if (folder / "adapter_model.safetensors").is_file():
            check_safetensors_file(folder / "adapter_model.safetensors", "LoRA adapter")
        if not (folder / "adapter_model.safetensors").is_file():
            if not (folder / "adapter_model.bin").is_file():
                raise CheckpointError(f"{folder} says it holds a LoRA adapter but adapter_model.safetensors is "
                                      "missing; finetune again or restore the file")
            if not allow_pickle:
                raise CheckpointError(f"{folder} holds its LoRA adapter only as pickle weights (adapter_model.bin), "
                                      "which pmod-convert does not load; convert it to adapter_model.safetensors, "
                                      "or pass --allow-pickle if you trust the file")
        with peft_quietly():
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    return model


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Wrapping a model in peft without transformers' FutureWarning about a property peft reads (not ours to fix)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
