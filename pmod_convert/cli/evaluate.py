"""``eval``: answer and score a LLaVA-style question set with a dense or MoD checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import AllowOutsideImagesOpt, AllowPickleOpt, DeviceOpt, DtypeOpt, app, console, one_line_errors, out_console


@app.command("eval")
@one_line_errors
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A pmod checkpoint (routing applied) or a dense checkpoint.")],
    data: Annotated[Path, typer.Option("--data", help="LLaVA-style JSON/JSONL; the last gpt turn of each row is the reference.")],
    image_folder: Annotated[Optional[Path], typer.Option("--image-folder", help="Folder the rows' image paths are relative to (default: the data file's folder).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for predictions.jsonl and summary.json (default: none, the table is only printed).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions generated together (left-padded).")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer generated.")] = 16,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N usable rows.")] = None,
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="Skip (and count) rows with missing images or no answer instead of failing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    allow_pickle: AllowPickleOpt = False,
    allow_outside_images: AllowOutsideImagesOpt = False,
) -> None:
    """Answer a question set greedily and score it (normalised exact match, multiple-choice letters); --out keeps the
    predictions and summary."""
    from ..errors import RecipeError
    from ..evaluation import evaluate

    for name, value, high in (("--batch-size", batch_size, 4096), ("--max-new-tokens", max_new_tokens, 1 << 16)):
        if not 1 <= value <= high:  # before the model is loaded or anything allocated
            raise RecipeError(f"{name} must be in 1..{high}, got {value}")
    summary = evaluate(checkpoint, data, image_folder, out=out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       limit=limit, skip_bad_rows=skip_bad_rows, overwrite=overwrite, device=device, dtype=dtype,
                       allow_pickle=allow_pickle, allow_outside_images=allow_outside_images)
    table = Table(title=f"{checkpoint} on {data}")
    for col in ("samples", "accuracy", "exact match", "choice", "model", "est. decoder FLOPs", "est. KV"):
        table.add_column(col, justify="right")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    table.add_row(str(summary.samples), pct(summary.accuracy), pct(summary.exact_accuracy), pct(summary.choice_accuracy),
                  "MoD" if summary.is_mod else "dense", pct(summary.decoder_flops_ratio), pct(summary.kv_ratio))
    out_console.print(table)
    if summary.skipped:
        console.print(f"skipped {summary.skipped} bad rows", highlight=False)
    if out is not None:
        console.print(f"wrote {out}/predictions.jsonl and {out}/summary.json ({summary.seconds:.1f} s)", highlight=False)
    else:
        console.print(f"{summary.seconds:.1f} s; nothing written (pass --out DIR for predictions.jsonl and summary.json)",
                      highlight=False)
