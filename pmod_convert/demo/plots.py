"""The quickstart's figure: test accuracy against decoder FLOPs for every model the run produced."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLES = {  # stage -> (marker, colour, legend label, label offset in points)
    "dense": ("*", "black", "dense", (4, -11)),
    "calibrated": ("o", "tab:orange", "calibrated only (no finetune)", (4, -11)),
    "finetuned": ("s", "tab:blue", "calibrated + finetuned", (-4, 7)),
    "exported": ("D", "tab:green", "exported (merged, standalone)", (6, 7)),
}


def plot_accuracy_vs_flops(rows: Sequence[dict[str, Any]], path: str | Path, *, blind_accuracy: float | None = None,
                           tolerance: float = 0.02, flops_target: float | None = None, title: str = "") -> Path:
    """Scatter of ``accuracy`` against ``decoder_flops_ratio`` for ``rows`` (dicts with ``stage`` and ``name``).

    Points of the same stage are joined in FLOPs order; the band under the dense accuracy shows ``tolerance``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    dense = next((r for r in rows if r["stage"] == "dense"), None)
    if dense is not None:
        ax.axhspan(dense["accuracy"] - tolerance, dense["accuracy"], color="tab:gray", alpha=0.15,
                   label=f"within {100 * tolerance:.0f} points of dense")
    if blind_accuracy is not None:
        ax.axhline(blind_accuracy, color="tab:red", linestyle=":", linewidth=1,
                   label=f"blind baseline (no image) {100 * blind_accuracy:.1f}%")
    if flops_target is not None:
        ax.axvline(flops_target, color="tab:gray", linestyle="--", linewidth=1,
                   label=f"FLOPs target {100 * flops_target:.0f}%")
    for stage, (marker, colour, label, offset) in STYLES.items():
        points = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["decoder_flops_ratio"])
        if not points:
            continue
        xs = [r["decoder_flops_ratio"] for r in points]
        ys = [r["accuracy"] for r in points]
        if len(points) > 1:
            ax.plot(xs, ys, color=colour, linewidth=1, alpha=0.6)
        hollow = stage == "exported"  # drawn over the finetuned point it was merged from
        ax.scatter(xs, ys, marker=marker, s=90 if marker == "*" else (80 if hollow else 45), label=label, zorder=3,
                   facecolors="none" if hollow else colour, edgecolors=colour, linewidths=1.5 if hollow else 1)
        for r in points:
            ax.annotate(r["name"], (r["decoder_flops_ratio"], r["accuracy"]), textcoords="offset points",
                        xytext=offset, fontsize=7, color=colour, ha="right" if offset[0] < 0 else "left")
    ax.set_xlabel("decoder prefill FLOPs (fraction of dense, estimated on the test questions)")
    ax.set_ylabel("test accuracy")
    ax.set_xlim(0, 1.05)
    low = min([r["accuracy"] for r in rows] + ([blind_accuracy] if blind_accuracy is not None else []))
    ax.set_ylim(max(0.0, low - 0.08), min(1.0, max(r["accuracy"] for r in rows) + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "accuracy vs FLOPs", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
