"""Resumable training checkpoints: trainable weights, optimizer, scheduler, RNG of every process, position.

Layout (``RUN_DIR/checkpoints/step-000200/``)::

    trainable.safetensors                    LoRA (+ projector) and router parameters, by name
    optimizer.json + optimizer.safetensors   optimizer state: structure and numbers in JSON, tensors in safetensors
    scheduler.json                           learning-rate scheduler state
    rng-<rank>.json + rng-<rank>.safetensors python / numpy / torch (+ CUDA) generator states of each process
    state.json                               step, epoch, next micro-batch, settings, data fingerprint, counters

Nothing is ever unpickled: the JSON files hold plain values (tuples, non-string keys and numpy arrays are
tagged so they round-trip exactly) and refer to tensors by their name in the ``.safetensors`` file beside
them. Checkpoints of the old pickle format (``optimizer.pt``, ``scheduler.pt``, ``rng-*.pt``) are refused.

A checkpoint is written into a hidden temporary folder by all processes and moved into place by the main
process once every process has written its part, so an interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

STATE_FILE = "state.json"
PREFIX = "step-"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
PICKLE_FILES = ("optimizer.pt", "scheduler.pt")
_TAGS = ("__tensor__", "__tuple__", "__items__", "__ndarray__")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able form of ``obj``; tensors go to ``tensors`` and are referred to by name.

    Raises:
        CheckpointError: ``obj`` holds a value that cannot be stored without pickle.
    """
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a training checkpoint (only tensors, numbers, "
                          "strings, lists, tuples and dicts are stored, without pickle)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`. Raises ``KeyError`` / ``TypeError`` / ``ValueError`` on a damaged file."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise TypeError("a dict key must be a number, string or tuple")
    return key


def write_state(obj: Any, folder: Path, stem: str) -> None:
    """Write ``obj`` as ``folder/stem.json`` (+ ``folder/stem.safetensors`` when it holds tensors), no pickle.

    Raises:
        CheckpointError: ``obj`` holds a value that cannot be stored without pickle.
    """
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(obj, tensors)
    if tensors:
        save_file(tensors, str(folder / f"{stem}.safetensors"))
    (folder / f"{stem}.json").write_text(json.dumps({"tensors": bool(tensors), "value": encoded}))


def read_state(folder: Path, stem: str) -> Any:
    """Read what :func:`write_state` wrote. Raises ``OSError`` / ``ValueError`` / ``KeyError`` / ``TypeError``
    (and safetensors' own errors) on a missing or damaged file; nothing is ever unpickled."""
    data = json.loads((folder / f"{stem}.json").read_text())
    if not isinstance(data, dict) or "value" not in data:
        raise ValueError(f"{stem}.json has no 'value'")
    tensors = load_file(str(folder / f"{stem}.safetensors")) if data.get("tensors") else {}
    return _decode(data["value"], tensors)


def _refuse_pickle_format(folder: Path) -> None:
    """Raises CheckpointError when ``folder`` is a checkpoint of the old pickle format."""
    if (folder / f"{OPTIMIZER}.json").is_file():
        return
    old = [name for name in PICKLE_FILES if (folder / name).is_file()] + sorted(
        p.name for p in folder.glob("rng-*.pt"))
    if old:
        raise CheckpointError(f"training checkpoint {folder} is in the old pickle format ({old[0]}), which "
                              "pmod-convert no longer reads; delete its run folder and finetune again without "
                              "--resume")


def save_checkpoint(accelerator, run_dir: Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer,
                    scheduler, state: dict[str, Any], keep: int) -> Path:
    """Collective: every process calls it (each writes its RNG state); returns the final folder.

    Raises:
        CheckpointError: the optimizer or scheduler state holds a value that cannot be stored without pickle.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_state(rng_state(), tmp, f"rng-{accelerator.process_index}")
    if accelerator.is_main_process:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        write_state(optimizer.state_dict(), tmp, OPTIMIZER)
        write_state(scheduler.state_dict(), tmp, SCHEDULER)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(folder: Path, process_index: int, num_processes: int) -> dict[str, Any]:
    """Everything a process needs to resume from ``folder``: ``state``, ``trainable``, ``optimizer`` and
    ``scheduler`` (state dicts), ``rng`` (for :func:`set_rng_state`). Nothing is unpickled.

    Raises:
        CheckpointError: the checkpoint is of the old pickle format, was written by another number of
            processes, or a file is missing or damaged.
    """
    _refuse_pickle_format(folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("num_processes") != num_processes:
            raise CheckpointError(f"{folder} was written by {state.get('num_processes')} processes but this run has "
                                  f"{num_processes}; resume with the same number of processes")
        return {
            "state": state,
            "trainable": load_file(str(folder / "trainable.safetensors")),
            "optimizer": read_state(folder, OPTIMIZER),
            "scheduler": read_state(folder, SCHEDULER),
            "rng": read_state(folder, f"rng-{process_index}"),
        }
    except CheckpointError:
        raise
    except Exception as exc:  # torch / safetensors / json raise many kinds of errors on damaged files
        raise CheckpointError(f"training checkpoint {folder} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it to resume from an "
                              "earlier one") from None
