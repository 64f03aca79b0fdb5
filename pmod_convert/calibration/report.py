"""The calibration report: ``calibration_report.json`` plus two PNG plots drawn from that same JSON.

- ``calibration_layers.png``: per decoder layer, the chosen retention ratio (dense layers at 1) over the
  measured redundancy signals (ARank fraction, vision-token cosine, text-to-vision attention).
- ``calibration_budget.png``: estimated FLOPs / KV-cache ratio along the solver's schedule parameter with
  the budget and the chosen point, and the chosen schedule's estimate next to the budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REPORT_FILE = "calibration_report.json"
LAYERS_PLOT = "calibration_layers.png"
BUDGET_PLOT = "calibration_budget.png"
REPORT_FORMAT = 1
ROUTER_LABELS = {"text_attention": "text", "key_attention": "key", "text_log_attention": "textlog", "update": "upd",
                 "zero": "zero"}


def clean(value: Any) -> Any:
    """JSON-ready copy: tensors / numpy scalars become numbers, non-finite floats become null.

    Numbers are not rounded: the report's ratios are exactly those in config.json and recipe.yaml.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return clean(value.item())
    return str(value)


def write_report(folder: str | Path, report: dict) -> list[Path]:
    """Write the JSON report and its two plots into ``folder``; returns the paths written."""
    folder = Path(folder)
    path = folder / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return [path, plot_layers(report, folder / LAYERS_PLOT), plot_budget(report, folder / BUDGET_PLOT)]


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*args, **kwargs)


def plot_layers(report: dict, path: Path) -> Path:
    plt, (fig, (top, bottom)) = _figure(2, 1, figsize=(max(7.0, 0.35 * len(report["layers"]) + 4), 6.5),
                                        sharex=True, gridspec_kw={"height_ratios": [1, 1.2]})
    layers = report["layers"]
    xs = [row["layer"] for row in layers]
    mod = [row["ratio"] is not None for row in layers]
    heights = [row["ratio"] if row["ratio"] is not None else 1.0 for row in layers]
    colors = ["tab:blue" if m else "lightgray" for m in mod]
    top.bar(xs, heights, color=colors, edgecolor="black", linewidth=0.5)
    for x, h, m, row in zip(xs, heights, mod, layers):
        top.text(x, h + 0.02, f"{h:.2f}" if m else "dense", ha="center", va="bottom", fontsize=7,
                 rotation=90 if len(xs) > 16 else 0)
        if m and row.get("router"):  # which router the warm start kept in this layer
            top.text(x, 0.02, ROUTER_LABELS.get(row["router"]["choice"], row["router"]["choice"]), ha="center",
                     va="bottom", fontsize=6, color="white", rotation=90)
    top.set_ylim(0, 1.25)
    top.set_ylabel("vision tokens kept")
    opts, est, budget = report["options"], report["estimate"], report["budget"]
    top.set_title(f"{sum(mod)}/{len(mod)} MoD layers ({opts['schedule']}, selection {opts['layer_selection']}, "
                  f"shape {opts['shape']})\nestimated FLOPs {est['flops_ratio']:.3f}, KV {est['kv_ratio']:.3f} "
                  f"(budget: {budget['metric']} {budget['target']:.3f})", fontsize=9)
    if opts["warm_start"]:
        top.text(0.01, 0.97, "in bars: router kept by the warm start (text / key fit, or zero)", fontsize=7,
                 transform=top.transAxes, va="top")

    series = [("arank_fraction", "ARank / rows (low = redundant)", "tab:red"),
              ("vision_cosine", "vision cos(in, out) (high = layer changes little)", "tab:green"),
              ("text_to_vision", "text->vision attention mass", "tab:purple")]
    for key, label, color in series:
        values = [row.get(key) for row in layers]
        if any(v is not None for v in values):
            bottom.plot(xs, [math.nan if v is None else v for v in values], marker="o", ms=3, color=color,
                        label=label)
    profile = [row.get("profile") for row in layers]
    if any(v is not None for v in profile):
        bottom.plot(xs, [math.nan if v is None else v for v in profile], ls="--", color="black", lw=1,
                    label=f"profile used ({opts['profile']})")
    for x, m in zip(xs, mod):
        if m:
            bottom.axvspan(x - 0.5, x + 0.5, color="tab:blue", alpha=0.07, lw=0)
    bottom.set_xlabel("decoder layer (shaded: MoD)")
    bottom.set_ylabel("measured on calibration data")
    bottom.legend(fontsize=7, loc="best")
    bottom.set_xticks(xs)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_budget(report: dict, path: Path) -> Path:
    plt, (fig, (left, right)) = _figure(1, 2, figsize=(11, 4.3), gridspec_kw={"width_ratios": [1.6, 1]})
    budget, est = report["budget"], report["estimate"]
    param = budget["parameter"]
    sweep = budget["sweep"]
    xs = [p[param] for p in sweep]
    left.plot(xs, [p["flops_ratio"] for p in sweep], drawstyle="steps-post", color="tab:blue", label="FLOPs ratio")
    left.plot(xs, [p["kv_ratio"] for p in sweep], drawstyle="steps-post", color="tab:orange", label="KV-cache ratio")
    target, tol = budget["target"], budget["tolerance"]
    left.axhspan(target - tol, target + tol, color="gray", alpha=0.2, label=f"budget {budget['metric']} {target:g} +/- {tol:g}")
    left.axhline(target, color="gray", ls="--", lw=1)
    left.axvline(budget["value"], color="black", ls=":", lw=1)
    left.plot([budget["value"]], [budget["achieved"]], "k*", ms=10,
              label=f"chosen {param} = {budget['value']:.3f}" + (" (gap filled)" if budget["gap_filled_layers"] else ""))
    left.set_xlabel(f"schedule parameter: {param}")
    left.set_ylabel("MoD / dense (estimate on calibration token counts)")
    left.set_title(f"{report['options']['schedule']} schedule family on {len(report['layers'])} layers", fontsize=9)
    left.legend(fontsize=7, loc="best")
    left.grid(alpha=0.3)

    groups = ["FLOPs", "KV cache"]
    estimates = [est["flops_ratio"], est["kv_ratio"]]
    budgets = [target if budget["metric"] == "flops" else math.nan, target if budget["metric"] == "kv" else math.nan]
    width = 0.25
    idx = range(len(groups))
    right.bar([i - width for i in idx], [1.0, 1.0], width, color="lightgray", label="dense")
    right.bar(list(idx), estimates, width, color="tab:blue", label="MoD estimate")
    right.bar([i + width for i in idx], [0 if math.isnan(b) else b for b in budgets], width, color="tab:green",
              label="budget")
    for i, value in zip(idx, estimates):
        right.text(i, value + 0.02, f"{value:.3f}", ha="center", fontsize=8)
    for i, value in zip(idx, budgets):
        if not math.isnan(value):
            right.text(i + width, value + 0.02, f"{value:g}", ha="center", fontsize=8)
    right.set_xticks(list(idx), groups)
    right.set_ylim(0, 1.2)
    right.set_title(("incl. vision tower" if est.get("vision_flops") else "decoder only") + f", {report['samples']['total']} samples",
                    fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
