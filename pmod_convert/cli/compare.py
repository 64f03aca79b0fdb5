"""``compare``: a Pareto table and plot of dense, MoD and the FastV / PyramidDrop baselines at equal FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import AllowOutsideImagesOpt, AllowPickleOpt, app, console, one_line_errors, out_console


@app.command("compare")
@one_line_errors
def compare_cmd(
    dense: Annotated[Path, typer.Argument(help="The dense checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="LLaVA-style test questions (.json / .jsonl).")],
    calib: Annotated[Path, typer.Option("--calib", help="LLaVA-style calibration rows (budget solver, warm start).")],
    image_folder: Annotated[Optional[Path], typer.Option(
        "--image-folder", help="Folder the rows' image paths are relative to (default: the data file's folder).")] = None,
    budgets: Annotated[str, typer.Option("--budgets", help="Decoder FLOPs ratios, comma-separated.")] = "0.55,0.40",
    finetuned: Annotated[Optional[list[Path]], typer.Option(
        "--finetuned", help="A finetuned pmod checkpoint to add (repeatable).")] = None,
    methods: Annotated[str, typer.Option("--methods", help="Which conversions: pmod,fastv,pdrop.")] = "pmod,fastv,pdrop",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for compare.json, compare.png and the converted "
                                                           "checkpoints.")] = Path("pmod-compare"),
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N usable test rows.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions generated together.")] = 16,
    samples: Annotated[int, typer.Option("--samples", help="Calibration samples drawn from --calib.")] = 64,
    bench_batch: Annotated[int, typer.Option("--bench-batch", help="Prompts per batch when timing prefill.")] = 16,
    bench_repeats: Annotated[int, typer.Option("--bench-repeats", help="Timed prefill runs per model.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Calibration sampling seed.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Reuse a non-empty --out.")] = False,
    allow_pickle: AllowPickleOpt = False,
    allow_outside_images: AllowOutsideImagesOpt = False,
) -> None:
    """Evaluate dense, MoD calibrated (and finetuned), FastV and PyramidDrop at each FLOPs budget on one question
    set; print one table, write compare.json and compare.png (accuracy vs decoder FLOPs and vs prefill time)."""
    from ..calibration.pareto import COMPARE_PLOT, compare, table_lines
    from ..errors import RecipeError

    try:
        values = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise RecipeError(f"--budgets must be comma-separated ratios like 0.55,0.40, got {budgets!r}") from None
    doc = compare(dense, data, image_folder, calib, budgets=values, out=out, finetuned=finetuned or [],
                  methods=tuple(m.strip() for m in methods.split(",") if m.strip()), limit=limit,
                  batch_size=batch_size, samples=samples, seed=seed, bench_batch=bench_batch,
                  bench_repeats=bench_repeats, overwrite=overwrite, allow_pickle=allow_pickle,
                  allow_outside_images=allow_outside_images)
    for line in table_lines(doc):
        out_console.print(line, highlight=False, soft_wrap=True, markup=False)
    console.print(f"wrote {out}/compare.json and {out}/{COMPARE_PLOT}", highlight=False)
