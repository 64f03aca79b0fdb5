"""``add-routers``, ``inspect`` and ``estimate``: conversion and cost commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

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


ConventionOpt = Annotated[str, typer.Option(
    "--convention", help="exact: decoder layers with exact causal attention (default); paper: the p-MoD paper's "
                         "count (decoder linears + lm_head on every prompt position, KV over vision tokens only).")]
VisionTokensOpt = Annotated[Optional[int], typer.Option(
    "--vision-tokens", help="Vision tokens per sample (default: the checkpoint's calibration data, else one typical "
                            "image of the family).")]
TextTokensOpt = Annotated[Optional[int], typer.Option(
    "--text-tokens", help="Text tokens per sample (default: the checkpoint's calibration data, else 100; 58 under "
                          "--convention paper).")]


@app.command("inspect")
@one_line_errors
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A pmod-convert checkpoint folder.")],
    vision_tokens: VisionTokensOpt = None,
    text_tokens: TextTokensOpt = None,
    convention: ConventionOpt = "exact",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Per-layer table of an MoD checkpoint as load_pretrained runs it (ratios, routers: the finetuned ones when a
    finetune sidecar is present) and its estimated FLOPs / KV-cache ratios with the token counts they assume."""
    from ..checkpoint import read_config
    from ..costs import checkpoint_cost, effective_routers
    from ..errors import CheckpointError
    from ..export.manifest import verify_manifest

    config = read_config(checkpoint)
    verify_manifest(checkpoint)  # an export: every file as written (and its manifest present)
    pmod = config.get("pmod")
    if not isinstance(pmod, dict) or "layer_ratios" not in pmod:
        raise CheckpointError(f"{checkpoint} is not a pmod-convert checkpoint (no 'pmod' section in config.json)")
    routers = effective_routers(checkpoint)
    ratios = list(pmod["layer_ratios"])
    priors = pmod.get("position_prior") or [None] * len(ratios)
    scorers = pmod.get("scorer") or [None] * len(ratios)
    rows = []
    for i, r in enumerate(ratios):
        w, b = routers.tensors.get((i, "weight")), routers.tensors.get((i, "bias"))
        rows.append({"layer": i, "kind": "MoD" if r is not None else "dense", "ratio": r,
                     "router_weight_norm": None if w is None else float(w.float().norm()),
                     "router_bias": None if b is None else float(b.float().reshape(-1)[0]),
                     "position_prior": None if r is None else float(priors[i] or 0.0),
                     "scorer": None if r is None else (scorers[i] or "router")})
    router = pmod.get("router", {})
    cost = checkpoint_cost(config, checkpoint, vision_tokens=vision_tokens, text_tokens=text_tokens,
                           convention=convention)
    if as_json:
        out_console.print_json(json.dumps({"layers": rows, "router": router, "routers_source": routers.source,
                                           "schedule": pmod.get("schedule"), "imported_from": pmod.get("imported_from"),
                                           "estimate": cost.estimate.to_dict(), "cost": cost.to_dict()}))
        return
    table = Table(title=f"{checkpoint} ({pmod.get('family')}, router: TanhNorm alpha={router.get('tanh_alpha')}, "
                        f"beta={router.get('tanh_beta')}, bias={router.get('bias')})")
    for col in ("layer", "kind", "retention", "ranked by", "router |w|", "router bias", "position prior"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(str(row["layer"]), row["kind"], "1.00" if row["ratio"] is None else f"{row['ratio']:.3f}",
                      row["scorer"] or "-",
                      "-" if row["router_weight_norm"] is None else f"{row['router_weight_norm']:.4f}",
                      "-" if row["router_bias"] is None else f"{row['router_bias']:+.4f}",
                      "-" if row["position_prior"] is None else f"{row['position_prior']:g}")
    out_console.print(table)
    if any(row["position_prior"] for row in rows):
        out_console.print("position prior > 0: the router's selection also prefers later vision tokens (a zero "
                          "router with a prior keeps the last k); see docs/baselines.md", highlight=False,
                          soft_wrap=True)
    if any(row["scorer"] == "attention" for row in rows):
        out_console.print("ranked by attention: the layer keeps the vision tokens its own text queries attend to "
                          "most (its cost is in the estimate below); see docs/baselines.md", highlight=False,
                          soft_wrap=True)
    out_console.print(f"routers: {routers.source}", highlight=False, soft_wrap=True)
    if isinstance(pmod.get("imported_from"), dict):
        origin = pmod["imported_from"]
        out_console.print(f"imported from {origin.get('layout')}: {origin.get('source')}", highlight=False,
                          soft_wrap=True)
    _print_cost(cost)


@app.command("estimate")
@one_line_errors
def estimate_cmd(
    config: Annotated[Path, typer.Option("--config", help="config.json of a model, or its folder (no weights needed).")],
    vision_tokens: VisionTokensOpt = None,
    text_tokens: TextTokensOpt = None,
    convention: ConventionOpt = "exact",
    recipe: RecipeOpt = None, schedule: ScheduleOpt = None, avg_ratio: AvgOpt = None, max_ratio: MaxOpt = None,
    min_ratio: MinOpt = None, ratio: RatioOpt = None, layers: LayersOpt = None, ratios: RatiosOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Estimated FLOPs and KV-cache ratios (MoD vs dense) from a config alone: a pmod checkpoint's own schedule,
    or the schedule the options give (default: the published p-MoD schedule for a dense config)."""
    from ..costs import checkpoint_cost, stored_ratios
    from ..efficiency import TextShape

    data = _read_json(config)
    folder = config if config.is_dir() else config.parent if config.name == "config.json" else None
    options = (recipe, schedule, avg_ratio, max_ratio, min_ratio, ratio, layers, ratios)
    given, source = None, None
    if any(v is not None for v in options) or stored_ratios(data) is None:
        plan = build_recipe(recipe, schedule, avg_ratio, max_ratio, min_ratio, ratio, layers, ratios, None, None)
        given = plan.schedule.layer_ratios(TextShape.from_config(data).num_layers)
        source = "the schedule options" if any(v is not None for v in options) else \
            "the published p-MoD schedule (shiftedcos, avg 0.5, max 0.85, min 0.15; no schedule options given)"
    cost = checkpoint_cost(data, folder, ratios=given, ratios_source=source, vision_tokens=vision_tokens,
                           text_tokens=text_tokens, convention=convention)
    if as_json:
        out_console.print_json(json.dumps({**cost.estimate.to_dict(), "cost": cost.to_dict()}))
    else:
        _print_cost(cost)


def _read_json(path: Path) -> dict:
    from ..checkpoint import check_config_numbers, check_pmod_section, read_config
    from ..errors import CheckpointError

    if path.is_dir():
        return read_config(path)
    if path.name == "config.json" and path.is_file():
        return read_config(path.parent)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a config.json or a checkpoint folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    check_config_numbers(data, path)
    check_pmod_section(data, path)
    return data


def _print_cost(cost) -> None:
    """The estimate table, then what the figure assumes: schedule source, token counts, convention."""
    from ..efficiency import format_estimate

    typer.echo(format_estimate(cost.estimate))
    typer.echo(f"schedule: {cost.ratios_source}")
    typer.echo(f"tokens: {cost.workload.describe()}")
    if cost.other_line():
        typer.echo(cost.other_line())
    for note in cost.notes:
        typer.echo(f"note: {note}")
