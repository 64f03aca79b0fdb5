"""``add-routers``, ``inspect`` and ``estimate``: conversion and cost commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import RecipeError
from .common import (
    AllowPickleOpt,
    AlphaOpt,
    AvgOpt,
    BetaOpt,
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


@app.command("add-routers")
@one_line_errors
def add_routers_cmd(
    source: Annotated[Path, typer.Argument(help="Local Hugging Face checkpoint folder of a dense model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist unless --overwrite).")],
    recipe: RecipeOpt = None, schedule: ScheduleOpt = None, avg_ratio: AvgOpt = None, max_ratio: MaxOpt = None,
    min_ratio: MinOpt = None, ratio: RatioOpt = None, layers: LayersOpt = None, ratios: RatiosOpt = None,
    tanh_alpha: AlphaOpt = None, tanh_beta: BetaOpt = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="auto | float32 | float16 | bfloat16")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace OUT if it is an earlier pmod-convert output (never the source).")] = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Add zero-initialised routers to a dense checkpoint following a PRD schedule, and save it."""
    from ..api import convert, layer_infos, load_pretrained

    plan = build_recipe(recipe, schedule, avg_ratio, max_ratio, min_ratio, ratio, layers, ratios,
                        tanh_alpha, tanh_beta, dtype)
    with console.status(f"converting {source} ..."):
        path = convert(source, out, plan, overwrite=overwrite, allow_pickle=allow_pickle)
    with console.status("checking the written checkpoint ..."):
        infos = layer_infos(load_pretrained(path))
    mod = [i for i in infos if i.ratio is not None]
    console.print(f"wrote {path}: {len(mod)} of {len(infos)} decoder layers are MoD layers "
                  f"(ratios {', '.join(f'{i.ratio:.2f}' for i in mod)})", highlight=False)


@app.command("inspect")
@one_line_errors
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A pmod-convert checkpoint folder.")],
    vision_tokens: Annotated[Optional[int], typer.Option("--vision-tokens", help="Vision tokens per sample (default: from the model's image size).")] = None,
    text_tokens: Annotated[int, typer.Option("--text-tokens", help="Text tokens per sample.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Per-layer table of an MoD checkpoint (ratios, routers) and its estimated FLOPs / KV-cache ratios."""
    from ..checkpoint import read_config, read_routers
    from ..errors import CheckpointError
    from ..export.manifest import verify_manifest

    config = read_config(checkpoint)
    verify_manifest(checkpoint)  # an export: every file as written (and its manifest present)
    pmod = config.get("pmod")
    if not isinstance(pmod, dict) or "layer_ratios" not in pmod:
        raise CheckpointError(f"{checkpoint} is not a pmod-convert checkpoint (no 'pmod' section in config.json)")
    routers = read_routers(checkpoint)
    ratios = list(pmod["layer_ratios"])
    rows = []
    for i, r in enumerate(ratios):
        w, b = routers.get((i, "weight")), routers.get((i, "bias"))
        rows.append({"layer": i, "kind": "MoD" if r is not None else "dense", "ratio": r,
                     "router_weight_norm": None if w is None else float(w.float().norm()),
                     "router_bias": None if b is None else float(b.float().reshape(-1)[0])})
    router = pmod.get("router", {})
    report = _estimate_report(config, ratios, vision_tokens, text_tokens)
    if as_json:
        out_console.print_json(json.dumps({"layers": rows, "router": router, "schedule": pmod.get("schedule"),
                                           "estimate": report.to_dict()}))
        return
    table = Table(title=f"{checkpoint} ({pmod.get('family')}, router: TanhNorm alpha={router.get('tanh_alpha')}, "
                        f"beta={router.get('tanh_beta')}, bias={router.get('bias')})")
    for col in ("layer", "kind", "retention", "router |w|", "router bias"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(str(row["layer"]), row["kind"], "1.00" if row["ratio"] is None else f"{row['ratio']:.3f}",
                      "-" if row["router_weight_norm"] is None else f"{row['router_weight_norm']:.4f}",
                      "-" if row["router_bias"] is None else f"{row['router_bias']:+.4f}")
    out_console.print(table)
    _print_estimate(report)


@app.command("estimate")
@one_line_errors
def estimate_cmd(
    config: Annotated[Path, typer.Option("--config", help="config.json of a model, or its folder (no weights needed).")],
    vision_tokens: Annotated[Optional[int], typer.Option("--vision-tokens", help="Vision tokens per sample (default: from the config's image size).")] = None,
    text_tokens: Annotated[int, typer.Option("--text-tokens", help="Text tokens per sample.")] = 100,
    recipe: RecipeOpt = None, schedule: ScheduleOpt = None, avg_ratio: AvgOpt = None, max_ratio: MaxOpt = None,
    min_ratio: MinOpt = None, ratio: RatioOpt = None, layers: LayersOpt = None, ratios: RatiosOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Estimated decoder FLOPs and KV-cache ratios (MoD vs dense) of a schedule, from a config alone."""
    from ..checkpoint import read_config
    from ..efficiency import TextShape

    data = read_config(config) if config.is_dir() else _read_json(config)
    plan = build_recipe(recipe, schedule, avg_ratio, max_ratio, min_ratio, ratio, layers, ratios, None, None)
    layer_ratios = plan.schedule.layer_ratios(TextShape.from_config(data).num_layers)
    report = _estimate_report(data, layer_ratios, vision_tokens, text_tokens)
    if as_json:
        out_console.print_json(json.dumps(report.to_dict()))
    else:
        _print_estimate(report)


def _read_json(path: Path) -> dict:
    from ..checkpoint import read_config
    from ..errors import CheckpointError

    if path.name == "config.json" and path.is_file():
        return read_config(path.parent)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a config.json or a checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None


def _estimate_report(config: dict, ratios: list, vision_tokens: int | None, text_tokens: int):
    from ..efficiency import TextShape, default_vision_tokens, estimate

    if vision_tokens is None:
        vision_tokens = default_vision_tokens(config)
    if vision_tokens < 0 or text_tokens < 0:
        raise RecipeError("--vision-tokens and --text-tokens must be >= 0")
    return estimate(TextShape.from_config(config), ratios, vision_tokens, text_tokens)


def _print_estimate(report) -> None:
    from ..efficiency import format_estimate

    typer.echo(format_estimate(report))
