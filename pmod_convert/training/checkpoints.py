"""Resumable training checkpoints: trainable weights, optimizer, scheduler, RNG of every process, position.

Layout (``RUN_DIR/checkpoints/step-000200/``)::

    trainable.safetensors   LoRA (+ projector) and router parameters, by name
    optimizer.pt, scheduler.pt
    rng-<rank>.pt           python / numpy / torch (+ CUDA) generator states of each process
    state.json              step, epoch, next micro-batch, settings, data fingerprint, counters

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


def save_checkpoint(accelerator, run_dir: Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer,
                    scheduler, state: dict[str, Any], keep: int) -> Path:
    """Collective: every process calls it (each writes its RNG state); returns the final folder."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
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
    """Everything a process needs to resume from ``folder``."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("num_processes") != num_processes:
            raise CheckpointError(f"{folder} was written by {state.get('num_processes')} processes but this run has "
                                  f"{num_processes}; resume with the same number of processes")
        return {
            "state": state,
            "trainable": load_file(str(folder / "trainable.safetensors")),
            "optimizer": torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False),
            "scheduler": torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=False),
            "rng": torch.load(folder / f"rng-{process_index}.pt", map_location="cpu", weights_only=False),
        }
    except CheckpointError:
        raise
    except Exception as exc:  # torch / safetensors / json raise many kinds of errors on damaged files
        raise CheckpointError(f"training checkpoint {folder} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it to resume from an "
                              "earlier one") from None
