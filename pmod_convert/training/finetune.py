"""``pmod-convert finetune``: recover accuracy of a converted checkpoint with LoRA + fully trained routers.

Reads LLaVA-style conversations, trains on one process or many (``accelerate launch``), and writes the LoRA
adapter and routers as the checkpoint's finetune sidecar (``pmod_adapter/``, applied by ``load_pretrained``)
plus a report folder beside it (``pmod_finetune/``: finetune.yaml, log.jsonl, summary.json, finetune.png).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters import get_adapter
from ..api import check_trainable
from ..checkpoint import (
    atomic_folder,
    check_replaceable,
    check_writable,
    copy_checkpoint_tree,
    read_config,
    require_safetensors,
)
from ..errors import CheckpointError, DataError, RecipeError
from ..sidecar import SIDECAR_DIR, has_sidecar, save_sidecar
from .checkpoints import list_checkpoints
from .data import load_training_data, split_validation
from .distill import Teacher
from .loop import LOG_FILE, VALIDATION_LOG, TrainingLoop, check_resumable, load_best
from .lora import (
    count_parameters,
    load_base,
    load_trainable_state,
    lora_targets,
    prepare_for_training,
    text_hidden_size,
)
from .report import plot_run, router_statistics
from .routing import routers, untie_routers
from .settings import FinetuneSettings
from .validation import ValidationResult, Validator, saturated

REPORT_DIR = "pmod_finetune"


def default_run_dir(target: Path) -> Path:
    """Where resumable checkpoints and the live log go: a sibling of the output, ``<name>-finetune-run``."""
    return target.parent / f"{target.name}-finetune-run"


def finetune(checkpoint: str | Path, data: str | Path, image_folder: str | Path | None = None, *,
             out: str | Path | None = None, settings: FinetuneSettings | None = None,
             run_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
             val_data: str | Path | None = None, val_image_folder: str | Path | None = None,
             callbacks: Sequence[Callable[[dict, Any], None]] = (), show_progress: bool = True,
             allow_pickle: bool = False, allow_outside_images: bool = False) -> dict[str, Any]:
    """Finetune a pmod checkpoint on LLaVA-style conversations; returns the run summary.

    The objective is distillation from the dense model by default (``settings.loss``); the model is validated
    before the first step and every ``eval_steps`` steps, and the output holds the best validated weights:
    the input's own when no step beat them (``summary["validation"]["kept"] == "input"``; ``settings.strict``
    makes the CLI exit non-zero then). See docs/finetuning.md.

    checkpoint:   a folder written by ``pmod-convert add-routers`` (its routers are the starting point).
    data:         LLaVA-style ``.json`` / ``.jsonl``; ``image_folder``: where its image paths point (default:
                  the data file's folder).
    val_data:     held-out rows to validate on (default: a ``settings.val_fraction`` share of ``data``);
                  ``val_image_folder``: their images (default: ``image_folder``).
    out:          write a copy of the checkpoint with the sidecar there; default: add the sidecar in place.
    run_dir:      resumable checkpoints + live log (default ``<out or checkpoint>-finetune-run``).
    resume:       continue from the newest checkpoint in ``run_dir`` (same settings and data required).
    overwrite:    replace an existing sidecar / ``out`` / earlier run's checkpoints.
    allow_pickle: accept ``pytorch_model.bin`` weights (safetensors only by default); ``allow_outside_images``:
                  accept image paths of ``data`` / ``val_data`` that lead outside their image folder (refused by
                  default). Neither changes the trained weights, so neither is part of ``settings`` (nor of resume).
    callbacks:    ``callback(record, model)`` after each optimizer step (and its checkpoint) on every process:
                  the step's log record and the model being trained (peft-wrapped, outside DDP).
    Works unchanged under ``accelerate launch`` (every process calls it; the main one writes the outputs).
    """
    from accelerate.utils import broadcast_object_list, set_seed

    wall = time.perf_counter()
    settings = (settings or FinetuneSettings()).validate()
    checkpoint = Path(checkpoint)
    check_trainable(checkpoint)  # reads config.json; refuses a fastv / pdrop baseline
    require_safetensors(checkpoint, allow_pickle)  # before any data is read or encoded
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.resolve() == checkpoint.resolve():
        out_path = None
    target = out_path or checkpoint
    run_path = Path(run_dir) if run_dir is not None else default_run_dir(target)
    _check_outputs(checkpoint, out_path, run_path, resume, overwrite)
    if resume:
        check_resumable(list_checkpoints(run_path)[-1], settings)

    accelerator = _accelerator(settings.mixed_precision)
    main = accelerator.is_main_process
    set_seed(settings.seed)
    dataset = load_training_data(data, image_folder, checkpoint, settings, show_progress=show_progress and main,
                                 allow_outside_images=allow_outside_images)
    if val_data is not None:
        val_settings = settings.replace(limit=settings.val_max, max_length=None)
        held = load_training_data(val_data, val_image_folder if val_image_folder is not None else image_folder,
                                  checkpoint, val_settings, show_progress=False,
                                  allow_outside_images=allow_outside_images)
        val_how = f"{len(held)} rows of {val_data}" + (f" ({held.skipped} bad rows skipped)" if held.skipped else "")
    else:
        dataset, held, val_how = split_validation(dataset, settings)
    if not any(sample.images for sample in dataset.samples):
        raise DataError(f"{data}: no training row has an image; routing only skips vision tokens, so a finetune "
                        "on text alone has nothing to learn: give rows with images")
    model = load_base(checkpoint, settings, device=accelerator.device, allow_pickle=allow_pickle)
    model = prepare_for_training(model, settings)
    params = count_parameters(model)
    vision_ids = sorted(dataset.encoder.vision_ids)
    needs_teacher = settings.loss != "ce" or settings.router_rank_coef > 0
    teacher = Teacher(model, vision_ids, attention=settings.router_rank_coef > 0) if needs_teacher else None
    if teacher is not None and not teacher.layers:
        teacher.attention = False  # no trained router ranks by content: no attention targets to capture
    validator = None
    if main:
        validator = Validator(held, Teacher(model, vision_ids), accelerator.device, batch_size=8,
                              max_new_tokens=settings.val_max_new_tokens, source=val_how)
        run_path.mkdir(parents=True, exist_ok=True)
        if not resume:  # only the training checkpoints an earlier run wrote (step-N folders with state.json)
            for folder in list_checkpoints(run_path):
                shutil.rmtree(folder, ignore_errors=True)
        settings.save(run_path / "finetune.yaml")
    accelerator.wait_for_everyone()

    set_seed(settings.seed, device_specific=True)  # dropout differs per process; the data order does not
    routers_before = {i: r.weight.detach().float().clone() for i, r in routers(model)}
    loop = TrainingLoop(accelerator, model, dataset, settings, run_path, callbacks=callbacks,
                        show_progress=show_progress, teacher=teacher, validator=validator, vision_ids=vision_ids)
    result = loop.run(resume=resume)

    summary: dict[str, Any] | None = None
    bare = accelerator.unwrap_model(loop.model)
    if main:
        kept = _keep_best(bare, result, run_path, settings)
        layers = router_statistics(bare, dataset, samples=settings.stats_samples, batch_size=settings.batch_size,
                                   device=accelerator.device)
        for layer in layers:
            before = routers_before.get(layer["layer"])
            after = dict(routers(bare)).get(layer["layer"])
            layer["router_moved"] = float((after.weight.detach().float().cpu() - before.cpu()).norm()) \
                if before is not None and after is not None else None
            layer["router_norm"] = float(after.weight.detach().float().norm()) if after is not None else None
        summary = _summary(result, dataset, settings, params, layers, accelerator.num_processes, checkpoint,
                           target, run_path, wall)
        summary["grad_accum"] = result.grad_accum
        summary["epochs"] = result.epochs
        summary["learning_rates"] = dict(zip(("lora", "routers"), settings.learning_rates(text_hidden_size(bare))))
        summary["effective_batch_size"] = result.grad_accum * settings.batch_size * accelerator.num_processes
        summary["validation"] = _validation_summary(result, validator, val_how, kept)
        if settings.shared_router:
            untie_routers(bare)  # per-layer router tensors in the sidecar, as load_pretrained expects
        _write_outputs(bare, checkpoint, out_path, run_path, settings, result.records, summary, overwrite)
        summary["wall_seconds"] = time.perf_counter() - wall
    accelerator.wait_for_everyone()
    holder = [summary]
    broadcast_object_list(holder)
    return holder[0]


def _keep_best(model, result, run_dir: Path, settings: FinetuneSettings) -> str:
    """Load the best validated trainable state into ``model``; returns ``"input"``, ``"step N"`` or ``"last"``."""
    if not settings.keep_best or result.best is None:
        return "last"
    load_trainable_state(model, load_best(run_dir), where=str(run_dir / "best.safetensors"))
    return "input" if result.best["step"] == 0 else f"step {result.best['step']}"


def _validation_summary(result, validator, how: str, kept: str) -> dict[str, Any]:
    records = result.validations
    first = next((r for r in records if r["step"] == 0), records[0] if records else None)
    output = result.best if kept != "last" else (records[-1] if records else None)
    return {
        "on": how, "samples": len(validator.data) if validator is not None else 0,
        "dense_accuracy": validator.dense_accuracy if validator is not None else None,
        "skipped_rows": validator.data.skipped if validator is not None else 0,
        "skipped_reasons": validator.data.skipped_reasons[:20] if validator is not None else [],
        "input": first, "output": output, "last": records[-1] if records else None, "kept": kept,
        "improved": kept not in ("input",), "curve": records,
        # the input already agreed with dense on every validation answer token: see validation.saturated
        "saturated": bool(first) and saturated(ValidationResult.from_dict(first)),
    }


def final_line(summary: dict[str, Any]) -> str:
    """One line: validation accuracy and agreement with dense, before -> after, and which weights were kept."""
    v = summary.get("validation") or {}
    a, b = v.get("input"), v.get("output")
    if not a or not b:
        return "no validation was run"
    dense = v.get("dense_accuracy")
    kept = v.get("kept")
    note = {"input": "no step beat the input: the input's weights were kept",
            "last": "the last step's weights were kept (--no-keep-best)"}.get(kept, f"kept {kept}")
    if v.get("saturated") and kept not in ("input", "last"):
        note = (f"kept {kept}: the input already agreed with dense on every validation answer, so validation "
                "cannot rank it; the trained step agrees as well (--val-data with rows the dense model never "
                "trained on measures more)")
    return (f"validation ({v['on']}): accuracy {a['accuracy']:.1%} -> {b['accuracy']:.1%} "
            f"(dense {dense:.1%}), agreement with dense {a['agreement']:.3f} -> {b['agreement']:.3f}, "
            f"KL {a['kl']:.4f} -> {b['kl']:.4f}; {note}")


def _accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    # Several processes started by torchrun (``accelerate launch --multi_gpu``) on a machine without a GPU:
    # accelerate only forms a CPU process group (gloo) when told to use the CPU; otherwise every process
    # would silently train alone and write the same outputs.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = world > 1 and not torch.cuda.is_available()
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as exc:
        if "already been initialized" in str(exc) and PartialState().num_processes == 1:
            # A second run in the same single process with another precision: accelerate keeps one global
            # state per process; resetting it is safe when nothing is distributed.
            AcceleratorState._reset_state()
            return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
        raise RecipeError(f"mixed_precision {mixed_precision!r} is not available here: {exc}") from None


def _check_outputs(checkpoint: Path, out: Path | None, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse before any training time is spent, not after."""
    if out is not None and out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    if out is not None:  # writable, not inside the source; an existing one only with --overwrite and if ours
        check_replaceable(out, protect=(checkpoint,))
    check_writable(run_dir)
    if out is None:
        check_writable(checkpoint / SIDECAR_DIR)  # the sidecar goes into the checkpoint folder
    if out is None and has_sidecar(checkpoint) and not overwrite:
        raise CheckpointError(f"{checkpoint} already has a finetune sidecar ({SIDECAR_DIR}/); pass --out to write "
                              "a finetuned copy elsewhere or --overwrite to replace it")
    found = list_checkpoints(run_dir)
    if not resume and found and not overwrite:
        raise CheckpointError(f"{run_dir} holds training checkpoints of an earlier run; pass --resume to continue "
                              "it, --overwrite to start over, or --run-dir to use another folder")
    if resume and not found:
        raise CheckpointError(f"--resume: {run_dir} holds no training checkpoint; run without --resume "
                              "(checkpoints are written every --save-steps steps)")


def _summary(result, dataset, settings: FinetuneSettings, params: dict, layers: list[dict], processes: int,
             checkpoint: Path, target: Path, run_dir: Path, wall: float) -> dict[str, Any]:
    losses = [r["loss"] for r in result.records]
    tail = losses[-10:]
    return {
        "steps": result.records[-1]["step"] if result.records else 0,
        "total_steps": result.total_steps,
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": losses[-1] if losses else float("nan"),
        "final_loss_mean10": sum(tail) / len(tail) if tail else float("nan"),
        "train_seconds": result.train_seconds,
        "input_tokens": result.input_tokens,
        "tokens_per_s": result.input_tokens / result.train_seconds if result.train_seconds > 0 else 0.0,
        "samples": len(dataset),
        "skipped_rows": dataset.skipped,
        "skipped_reasons": dataset.skipped_reasons[:20],
        "num_processes": processes,
        "resumed_from_step": result.resumed_from,
        "parameters": params,
        "lora_targets": lora_targets(settings, get_adapter(read_config(checkpoint))) if settings.lora_r else None,
        "layers": layers,
        "checkpoint": str(checkpoint),
        "output": str(target),
        "run_dir": str(run_dir),
        "wall_seconds": time.perf_counter() - wall,
    }


def _write_outputs(model, checkpoint: Path, out: Path | None, run_dir: Path, settings: FinetuneSettings,
                   records: list[dict], summary: dict, overwrite: bool) -> None:
    def write_into(folder: Path) -> None:
        save_sidecar(model, folder, summary=summary, overwrite=True)
        with atomic_folder(folder / REPORT_DIR, overwrite=True) as tmp:
            settings.save(tmp / "finetune.yaml")
            (tmp / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
            curve = (summary.get("validation") or {}).get("curve") or []
            (tmp / VALIDATION_LOG).write_text("".join(json.dumps(r) + "\n" for r in curve))
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
            plot_run(records, summary["layers"], tmp / "finetune.png", validations=curve,
                     dense_accuracy=(summary.get("validation") or {}).get("dense_accuracy"))

    if out is None:
        write_into(checkpoint)
        return
    with atomic_folder(out, overwrite=overwrite, protect=(checkpoint,)) as tmp:
        copy_checkpoint_tree(checkpoint, tmp, ignore=(SIDECAR_DIR, REPORT_DIR))
        write_into(tmp)

