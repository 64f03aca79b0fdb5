"""``bench``: measured prefill / decode time, memory and KV cache of an MoD model against its dense model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import (
    AllowPickleOpt,
    AvgOpt,
    LayersOpt,
    MaxOpt,
    MinOpt,
    RatioOpt,
    RatiosOpt,
    RecipeOpt,
    ScheduleOpt,
    app,
    build_recipe,
    console,
    one_line_errors,
    out_console,
)


@app.command("bench")
@one_line_errors
def bench_cmd(
    checkpoint: Annotated[Optional[Path], typer.Argument(
        help="A pmod-convert checkpoint folder (or use --shape instead).")] = None,
    dense: Annotated[Optional[Path], typer.Option(
        "--dense", help="Dense checkpoint to compare with (default: CHECKPOINT itself with its routers ignored).")] = None,
    shape: Annotated[Optional[str], typer.Option(
        "--shape", help="Build both models from a named shape with random weights instead of a checkpoint: "
                        "qwen2-0.5b, llava-onevision-0.5b, llava-1.5-7b, llava-next-7b, tiny, tiny-<family>.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per batch.")] = 1,
    vision_tokens: Annotated[Optional[int], typer.Option(
        "--vision-tokens", help="Vision tokens per prompt (the nearest count the family's images give is used and "
                                "reported; default: one typical image).")] = None,
    text_tokens: Annotated[int, typer.Option("--text-tokens", help="Text (non-vision) tokens per prompt.")] = 64,
    new_tokens: Annotated[int, typer.Option(
        "--new-tokens", help="Tokens to generate greedily (EOS ignored); 0 = prefill only.")] = 16,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per model (alternating).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed warm-up runs per model.")] = 1,
    max_repeats: Annotated[Optional[int], typer.Option(
        "--max-repeats", help="Keep adding alternating pairs (up to this many) until the relative spread of the "
                              "per-pair MoD/dense ratios is at most --target-spread; the report says if it got there.")] = None,
    target_spread: Annotated[float, typer.Option(
        "--target-spread", help="Relative spread (q3 - q1) / median of the per-pair ratios to reach.")] = 0.03,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", help="Pin the process to this many CPUs and torch threads while measuring.")] = None,
    retain_memory: Annotated[bool, typer.Option(
        "--retain-memory", help="CPU/glibc: keep freed memory for reuse (almost no page faults once warmed up), "
                                "as a caching allocator does; for timing that reflects compute rather than "
                                "allocator luck.")] = False,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="auto | float32 | float16 | bfloat16 (default: float32 for --shape, the checkpoint's own "
                        "dtype otherwise).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda")] = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights (--shape) and prompts.")] = 0,
    memory: Annotated[bool, typer.Option(
        "--memory/--no-memory", help="Measure peak memory in one more untimed run per model.")] = True,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write the report as JSON here, and a PNG plot beside it.")] = None,
    recipe: RecipeOpt = None, schedule: ScheduleOpt = None, avg_ratio: AvgOpt = None, max_ratio: MaxOpt = None,
    min_ratio: MinOpt = None, ratio: RatioOpt = None, layers: LayersOpt = None, ratios: RatiosOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Time the MoD model against its dense model in one process (prefill, decode, memory, KV cache).

    The schedule options (--recipe ... --ratios) convert a --shape; a checkpoint brings its own schedule.
    """
    from ..bench import (
        BenchError,
        bench,
        check_report_path,
        check_workload,
        pair_from_checkpoint,
        pair_from_shape,
        report_header,
        report_rows,
        retain_freed_memory,
        save_report,
    )

    check_workload(batch_size=batch_size, vision_tokens=vision_tokens, text_tokens=text_tokens,
                   new_tokens=new_tokens, warmup=warmup, repeats=repeats)
    schedule_options = (recipe, schedule, avg_ratio, max_ratio, min_ratio, ratio, layers, ratios)
    if (checkpoint is None) == (shape is None):
        raise BenchError("pass either a CHECKPOINT folder or --shape NAME (not both)")
    if out is not None:
        check_report_path(out)
    if retain_memory:
        retain_freed_memory()
    if shape is not None:
        if dense is not None:
            raise BenchError("--dense compares with a checkpoint; with --shape both models come from the shape")
        plan = build_recipe(recipe, schedule, avg_ratio, max_ratio, min_ratio, ratio, layers, ratios, None, None)
        with console.status(f"building shape {shape} ..."):
            mod, reference, label = pair_from_shape(shape, plan, dtype=dtype, device=device, seed=seed)
    else:
        if any(option is not None for option in schedule_options):
            raise BenchError("schedule options (--recipe, --schedule, --ratio, ...) apply to --shape; "
                             "a checkpoint brings its own schedule")
        with console.status(f"loading {checkpoint} ..."):
            mod, reference, label = pair_from_checkpoint(checkpoint, dense, dtype=dtype, device=device,
                                                       allow_pickle=allow_pickle)
    report = bench(mod, reference, batch_size=batch_size, vision_tokens=vision_tokens, text_tokens=text_tokens,
                   new_tokens=new_tokens, warmup=warmup, repeats=repeats, device=device, seed=seed, memory=memory, label=label,
                   max_repeats=max_repeats, target_spread=target_spread, threads=threads)

    for line in report_header(report):
        out_console.print(line, highlight=False)
    table = Table()
    for column in ("metric", "dense", "MoD", "MoD / dense"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in report_rows(report):
        table.add_row(*row)
    out_console.print(table)
    out_console.print(f"memory: {report.memory_method}", highlight=False)
    for note in report.notes:
        out_console.print(f"note: {note}", highlight=False)
    if out is not None:
        written = save_report(report, out)
        console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
