"""``calibrate``: fit the schedule to a FLOPs / KV budget on calibration data and warm-start the routers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import AllowOutsideImagesOpt, AllowPickleOpt, MaxOpt, MinOpt, app, console, one_line_errors


@app.command("calibrate")
@one_line_errors
def calibrate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Dense checkpoint folder, or a pmod checkpoint from add-routers.")],
    data: Annotated[Path, typer.Option("--data", help="LLaVA-style calibration data (.json or .jsonl).")],
    image_folder: Annotated[Optional[Path], typer.Option(
        "--image-folder", help="Folder the rows' image paths are relative to (default: the data file's folder).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write the calibrated checkpoint here (default: update a pmod CHECKPOINT in place, replacing "
                            "only the files calibrate writes; a dense CHECKPOINT needs --out).")] = None,
    target_flops: Annotated[Optional[float], typer.Option(
        "--target-flops", help="Budget: decoder FLOPs of the MoD model / dense model, e.g. 0.6.")] = None,
    target_kv: Annotated[Optional[float], typer.Option(
        "--target-kv", help="Budget: KV-cache size of the MoD model / dense model, e.g. 0.55.")] = None,
    schedule: Annotated[str, typer.Option("--schedule", help=(
        "auto (try several schedule shapes, keep the one closest to dense on the held-out rows) | shiftedcos | "
        "shiftedlinear | constant."))] = "auto",
    scorer: Annotated[str, typer.Option("--scorer", help=(
        "How MoD layers rank vision tokens: auto (chosen with the schedule on the held-out rows) | router "
        "(linear routers) | attention "
        "(each layer's own text-to-vision attention; its FLOPs are counted in the budget)."))] = "auto",
    layer_selection: Annotated[str, typer.Option(
        "--layer-selection", help="prd: the schedule's depth rule; arank: the lowest-ARank layers become MoD.")] = "prd",
    shape: Annotated[str, typer.Option(
        "--shape", help="cosine: the family's curve; measured: a monotone curve fitted to --profile.")] = "cosine",
    profile: Annotated[str, typer.Option(
        "--profile", help="Signal for --shape measured: arank | vision_change | text_to_vision.")] = "arank",
    warm_start: Annotated[bool, typer.Option(
        "--warm-start/--no-warm-start", help="Fit the routers on the data (else zero-initialised routers).")] = True,
    samples: Annotated[int, typer.Option("--samples", help="Calibration samples drawn from the data.")] = 128,
    holdout: Annotated[float, typer.Option(
        "--holdout", help=("Share of the samples held out: the search's candidates are compared on them, and the "
                           "report compares the result with zero routers."))] = 0.25,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling and splitting (same seed, same report).")] = 0,
    include_vision_tower: Annotated[bool, typer.Option(
        "--include-vision-tower", help="Count the vision tower (identical in both models) in the FLOPs budget.")] = False,
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="Skip unreadable rows instead of failing.")] = False,
    max_ratio: MaxOpt = None,
    min_ratio: MinOpt = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Run the model here, e.g. cuda:0 (default: cpu).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="auto | float32 | float16 | bfloat16")] = None,
    method: Annotated[str, typer.Option(
        "--method", help="pmod: MoD routers (default); fastv: FastV-style pruning after layer K (Chen et al. 2024); "
                         "pdrop: PyramidDrop-style stages (Xing et al. 2024). The solver fits R / lambda to the budget.")] = "pmod",
    fastv_k: Annotated[Optional[int], typer.Option(
        "--fastv-k", help="FastV: prune after this many layers (default: the paper's 2, lowered if the budget needs it).")] = None,
    pdrop_stages: Annotated[Optional[int], typer.Option(
        "--pdrop-stages", help="PyramidDrop: number of stages (default: the paper's 4, at most the layer count).")] = None,
    convention: Annotated[str, typer.Option(
        "--convention", help="How the budget counts: exact (every decoder linear + causal attention scores, KV of "
                             "all tokens) | paper (the p-MoD paper's TFLOPs: linears only, lm_head on every prompt "
                             "position, KV of vision tokens), so --target-flops 0.556 means the paper's 55.6%.")] = "exact",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace --out if it is an earlier pmod-convert output (never CHECKPOINT).")] = False,
    allow_pickle: AllowPickleOpt = False,
    allow_outside_images: AllowOutsideImagesOpt = False,
) -> None:
    """Fit the PRD schedule to a FLOPs or KV-cache budget on calibration data, choose MoD layers from measured
    redundancy, warm-start the routers; write the checkpoint, calibration_report.json and plots."""
    from ..calibration import calibrate

    result = calibrate(
        checkpoint, data, image_folder, out=out, target_flops=target_flops, target_kv=target_kv, schedule=schedule,
        scorer=scorer,
        layer_selection=layer_selection, shape=shape, profile=profile, warm_start=warm_start, samples=samples,
        holdout=holdout, seed=seed, include_vision_tower=include_vision_tower, skip_bad_rows=skip_bad_rows,
        max_ratio=max_ratio, min_ratio=min_ratio, device=device, dtype=dtype, overwrite=overwrite, method=method,
        fastv_k=fastv_k, pdrop_stages=pdrop_stages, allow_pickle=allow_pickle,
        allow_outside_images=allow_outside_images, convention=convention)
    report = result.report
    if method != "pmod":
        budget, est = report["budget"], report["estimate"]
        pruned = [(i, r) for i, r in enumerate(result.ratios) if r is not None]
        setting = (f"K={budget['fastv_k']}, R={budget['fastv_drop_rate']:.3f}" if method == "fastv"
                   else f"stages from layers {budget['pdrop_boundaries']}, lambda={budget['value']:.3f}")
        console.print(f"wrote {result.path}: {method} ({setting}); scoring layers {report['score_layers']}; kept share "
                      f"per layer {', '.join(f'{i}:{r:.2f}' for i, r in pruned)}", highlight=False, soft_wrap=True)
        for note in budget["notes"]:
            console.print(note, highlight=False, soft_wrap=True)
        console.print(f"estimated FLOPs ratio {est['flops_ratio']:.3f}, KV-cache ratio {est['kv_ratio']:.3f} "
                      f"(budget {budget['metric']} {budget['target']:g}, reachable {budget['reachable'][0]:.3f}-"
                      f"{budget['reachable'][1]:.3f}; {_counted(report)})", highlight=False, soft_wrap=True)
        return
    budget, est = report["budget"], report["estimate"]
    mod = [(i, r) for i, r in enumerate(result.ratios) if r is not None]
    console.print(f"wrote {result.path}: {len(mod)} of {len(result.ratios)} decoder layers are MoD layers "
                  f"({', '.join(f'{i}:{r:.2f}' for i, r in mod)})", highlight=False, soft_wrap=True)
    console.print(f"estimated FLOPs ratio {est['flops_ratio']:.3f}, KV-cache ratio {est['kv_ratio']:.3f} "
                  f"(budget {budget['metric']} {budget['target']:g}, reachable {budget['reachable'][0]:.3f}-"
                  f"{budget['reachable'][1]:.3f}; {_counted(report)})", highlight=False, soft_wrap=True)
    search = report.get("search") or {}
    chosen = next((c for c in search.get("candidates", []) if c["chosen"]), None)
    if chosen is not None:
        measured = sum(c["validation_kl"] is not None for c in search["candidates"])
        first = f", layers 0-{chosen['dense_first'] - 1} dense" if chosen["dense_first"] else ""
        console.print(f"chosen: {chosen['schedule']} (min ratio {chosen['min_ratio']:g}{first}), ranked by "
                      f"{'each layer’s own attention' if chosen['scorer'] == 'attention' else 'routers'}; "
                      f"{search['chosen_by'] if measured else 'nothing measured (no held-out or validation rows)'}"
                      f" [{measured} of {len(search['candidates'])} candidates measured]", highlight=False,
                      soft_wrap=True)
    warm = report["warm_start"]
    if warm["zero_routers"] is not None:
        line = f"held-out agreement with the dense model: zero routers top-1 {warm['zero_routers']['top1']:.3f}, " \
               f"KL {warm['zero_routers']['kl']:.4f}"
        if warm["warm_start"] is not None:
            label = "attention scorer" if chosen is not None and chosen["scorer"] == "attention" else "warm start"
            line += f"; {label} top-1 {warm['warm_start']['top1']:.3f}, KL {warm['warm_start']['kl']:.4f}"
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"report: {result.path / 'calibration_report.json'} (+ calibration_layers.png, "
                  "calibration_budget.png)", highlight=False, soft_wrap=True)


def _counted(report: dict) -> str:
    """What a calibration figure assumes: the convention and the calibration samples' mean token counts."""
    tokens, convention = report["tokens"], report["budget"].get("convention", "exact")
    return (f"{convention} convention, on the calibration samples' {tokens['vision_per_sample']:.0f} vision + "
            f"{tokens['text_per_sample']:.0f} text tokens per sample")
