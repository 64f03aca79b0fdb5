"""``pmod-convert finetune``: LoRA + router training of a converted checkpoint (one process or ``accelerate launch``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import AllowOutsideImagesOpt, AllowPickleOpt, app, console, one_line_errors, out_console


@app.command("finetune")
@one_line_errors
def finetune_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A pmod checkpoint folder (from `pmod-convert add-routers`).")],
    data: Annotated[Path, typer.Option("--data", help="LLaVA-style conversations, .json or .jsonl.")],
    image_folder: Annotated[Path | None, typer.Option("--image-folder", help="Folder the rows' image paths are relative to (default: the data file's folder).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write a finetuned copy of the checkpoint here (default: add the sidecar to CHECKPOINT).")] = None,
    settings_file: Annotated[Path | None, typer.Option("--settings", help="finetune.yaml to start from; the options below override it.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Resumable checkpoints and live log (default: <out or checkpoint>-finetune-run).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing sidecar / --out / earlier run checkpoints.")] = False,
    val_data: Annotated[Path | None, typer.Option("--val-data", help="Held-out LLaVA-style rows to validate on (default: --val-fraction of --data).")] = None,
    val_image_folder: Annotated[Path | None, typer.Option("--val-image-folder", help="Images of --val-data (default: --image-folder).")] = None,
    val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="Share of the training rows held out for validation (0.1; at least --val-min rows).")] = None,
    val_min: Annotated[int | None, typer.Option("--val-min", help="Held-out rows at least (32).")] = None,
    eval_steps: Annotated[int | None, typer.Option("--eval-steps", help="Validate every N optimizer steps (default: about 8 times a run).")] = None,
    select_by: Annotated[str | None, typer.Option("--select-by", help="kl (default): lowest KL to the dense model | accuracy: greedy accuracy, ties by agreement then KL.")] = None,
    keep_best: Annotated[bool | None, typer.Option("--keep-best/--no-keep-best", help="Output the best validated weights, the input's if no step beat them (on).")] = None,
    strict: Annotated[bool | None, typer.Option("--strict/--no-strict", help="Exit 3 when no step beat the input on validation.")] = None,
    loss: Annotated[str | None, typer.Option("--loss", help="mix: distil the dense model plus --ce-weight x label cross-entropy (default) | kl: distillation only | ce: label cross-entropy only.")] = None,
    ce_weight: Annotated[float | None, typer.Option("--ce-weight", help="Weight of the label cross-entropy in --loss mix (0.5).")] = None,
    distill_temperature: Annotated[float | None, typer.Option("--distill-temperature", help="Softmax temperature of teacher and student in the distillation (2.0).")] = None,
    distill_positions: Annotated[str | None, typer.Option("--distill-positions", help="answer: labelled positions (default) | text: every text position after the image.")] = None,
    router_rank_coef: Annotated[float | None, typer.Option("--router-rank-coef", help="Weight of the routers' ranking loss against the dense model's text-to-vision attention (1.0; 0 = off).")] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help="LoRA rank (8); 0 trains the routers only.")] = None,
    lora_alpha: Annotated[float | None, typer.Option("--lora-alpha", help="LoRA alpha (16).")] = None,
    lora_dropout: Annotated[float | None, typer.Option("--lora-dropout", help="LoRA dropout (0.05).")] = None,
    lora_targets: Annotated[str | None, typer.Option("--lora-targets", help="peft target_modules regex (default: the family's language-model linears).")] = None,
    train_projector: Annotated[bool | None, typer.Option("--train-projector/--no-train-projector", help="Train the vision-language projector fully.")] = None,
    qlora: Annotated[bool | None, typer.Option("--qlora/--no-qlora", help="Quantize the base to 4-bit nf4 (bitsandbytes) under the LoRA.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="auto | float32 | float16 | bfloat16: dtype of the base weights (QLoRA: compute dtype).")] = None,
    router_aux_coef: Annotated[float | None, typer.Option("--router-aux-coef", help="Weight of the router BCE loss against the top-k selection (gamma-MoD: 0.01; 0 = off).")] = None,
    route_text: Annotated[bool | None, typer.Option("--route-text/--no-route-text", help="Route answer text too; instruction tokens are never skipped (gamma-MoD masked routing).")] = None,
    shared_router: Annotated[bool | None, typer.Option("--shared-router/--no-shared-router", help="One router shared by all MoD layers.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate of LoRA / projector (default: 2e-4 * sqrt(4096 / hidden size); 0 changes nothing).")] = None,
    router_lr: Annotated[float | None, typer.Option("--router-lr", help="Learning rate of the routers (default: half the LoRA lr, for zero routers only: calibrated routers "
                                                      "stay as calibrate chose them; giving a value trains every router).")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="AdamW weight decay of LoRA / projector (0).")] = None,
    warmup_ratio: Annotated[float | None, typer.Option("--warmup-ratio", help="Linear warmup share of the steps before the cosine decay (0.1).")] = None,
    max_grad_norm: Annotated[float | None, typer.Option("--max-grad-norm", help="Gradient clipping norm (1.0; 0 = off).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the data (default: enough for about 360 optimizer steps, at most 6).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps; overrides --epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Samples per micro-batch per process (1).")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per optimizer step (default: sized from the data for an effective batch of up to 16).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of data order, LoRA init and dropout (0).")] = None,
    mixed_precision: Annotated[str | None, typer.Option("--mixed-precision", help="no | bf16 | fp16 (fp16: CUDA only).")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute decoder layers in backward (non-reentrant).")] = None,
    skip_bad_rows: Annotated[bool | None, typer.Option("--skip-bad-rows/--no-skip-bad-rows", help="Skip (and count) bad rows instead of stopping.")] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Samples with more tokens are bad rows.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Use the first N usable samples only.")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="DataLoader worker processes (0).")] = None,
    save_steps: Annotated[int | None, typer.Option("--save-steps", help="Resumable checkpoint every N steps (200; 0 = none).")] = None,
    keep_checkpoints: Annotated[int | None, typer.Option("--keep-checkpoints", help="Newest checkpoints kept (2).")] = None,
    stats_samples: Annotated[int | None, typer.Option("--stats-samples", help="Training samples the final router statistics use (64).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    allow_pickle: AllowPickleOpt = False,
    allow_outside_images: AllowOutsideImagesOpt = False,
) -> None:
    """Distil the dense model into LoRA adapters (and the zero routers; calibrated routers stay as chosen unless
    --router-lr is given), validated while training; save the result as the checkpoint's sidecar."""
    from accelerate.state import PartialState

    from ..training import FinetuneSettings, finetune
    from ..training.finetune import final_line
    from ..training.report import format_summary

    base = FinetuneSettings.load(settings_file) if settings_file is not None else FinetuneSettings()
    given = dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
                 train_projector=train_projector, qlora=qlora, dtype=dtype, router_aux_coef=router_aux_coef,
                 route_text=route_text, shared_router=shared_router, lr=lr, router_lr=router_lr,
                 weight_decay=weight_decay, warmup_ratio=warmup_ratio, epochs=epochs, max_steps=max_steps,
                 batch_size=batch_size, grad_accum=grad_accum, seed=seed, mixed_precision=mixed_precision,
                 gradient_checkpointing=gradient_checkpointing, skip_bad_rows=skip_bad_rows, max_length=max_length,
                 limit=limit, num_workers=num_workers, save_steps=save_steps, keep_checkpoints=keep_checkpoints,
                 stats_samples=stats_samples, val_fraction=val_fraction, val_min=val_min, eval_steps=eval_steps,
                 select_by=select_by, keep_best=keep_best, strict=strict, loss=loss, ce_weight=ce_weight,
                 distill_temperature=distill_temperature, distill_positions=distill_positions,
                 router_rank_coef=router_rank_coef)
    changes = {k: v for k, v in given.items() if v is not None}
    if max_grad_norm is not None:
        changes["max_grad_norm"] = max_grad_norm if max_grad_norm > 0 else None
    settings = base.replace(**changes)
    try:
        summary = finetune(checkpoint, data, image_folder, out=out, settings=settings, run_dir=run_dir,
                           resume=resume, overwrite=overwrite, val_data=val_data, val_image_folder=val_image_folder,
                           allow_pickle=allow_pickle, allow_outside_images=allow_outside_images)
    except KeyboardInterrupt:  # Ctrl-C: nothing was written to the output; say what can be resumed
        from ..training.checkpoints import list_checkpoints
        from ..training.finetune import default_run_dir

        target = out if out is not None and out.resolve() != checkpoint.resolve() else checkpoint
        run_path = run_dir if run_dir is not None else default_run_dir(target)
        found = list_checkpoints(run_path)
        console.print("interrupted: " + (f"{found[-1]} can be resumed (run the same command with --resume)" if found
                      else f"no resumable checkpoint was written yet in {run_path}; run the command again"),
                      highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if not PartialState().is_main_process:
        return
    if summary["skipped_rows"]:
        console.print(f"skipped {summary['skipped_rows']} bad rows (see summary.json)", highlight=False)
    if as_json:
        out_console.print_json(json.dumps(summary))
    else:
        typer.echo(format_summary(summary, with_validation=False))
        typer.echo(f"wrote {summary['output']}/pmod_adapter (LoRA + routers) and {summary['output']}/pmod_finetune "
                   "(finetune.yaml, log.jsonl, validation.jsonl, summary.json, finetune.png)")
        typer.echo(final_line(summary))
    if settings.strict and (summary.get("validation") or {}).get("kept") == "input":
        console.print("--strict: no finetuning step beat the input model on validation; the output holds the "
                      "input's weights", highlight=False)
        raise typer.Exit(3)
