"""``quickstart``: the whole pipeline on a synthetic task with a tiny model, on a CPU, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import app, console, one_line_errors, out_console


@app.command("quickstart")
@one_line_errors
def quickstart_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the dataset, checkpoints, predictions, report.json and the plot.")] = Path("pmod-quickstart"),
    fast: Annotated[bool, typer.Option("--fast", help="CI-sized run (small data, model and steps; about a minute; accuracy not meaningful).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the dataset, initial weights and training order.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it holds an earlier quickstart run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of the table.")] = False,
) -> None:
    """Synthetic data -> tiny dense LLaVA -> add-routers -> calibrate -> finetune -> export -> evaluate, one table."""
    from ..demo.quickstart import QuickstartSettings, quickstart, summary_lines, table

    settings = QuickstartSettings.fast_run(seed) if fast else QuickstartSettings.full(seed)
    report = quickstart(out, settings=settings, overwrite=overwrite, console=console)
    if as_json:
        out_console.print_json(json.dumps(report.to_dict()))
        return
    out_console.print(table(report))
    for line in summary_lines(report):
        out_console.print(line, highlight=False, soft_wrap=True)
