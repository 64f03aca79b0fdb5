"""What the trained routers do on the training data, the run summary, and its PNG plot."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..data import collate, model_inputs
from .data import PADDING_SIDE, TrainingData
from .routing import RouterTaps, mod_layers


@torch.no_grad()
def router_statistics(model: nn.Module, data: TrainingData, *, samples: int, batch_size: int,
                      device: torch.device) -> list[dict]:
    """Per MoD layer, over the first ``samples`` training samples, routing as at inference (vision targets):

    ``kept`` / ``total`` vision tokens (equal to the layer ratio by construction of top-k), and the mean
    TanhNorm weight ``alpha * tanh(logit) + beta`` of kept and of skipped tokens: the part the routers learn
    (kept tokens above 1 and skipped ones below 1 means the routers separate the tokens they keep).
    """
    layers = {i: layer for i, layer in mod_layers(model)}
    sums = {i: {"kept": 0, "total": 0, "w_kept": 0.0, "w_skipped": 0.0} for i in layers}
    n = min(samples, len(data))
    was_training = model.training
    model.eval()
    try:
        with RouterTaps(model) as taps:
            for start in range(0, n, batch_size):
                items = [data.encode(i) for i in range(start, min(start + batch_size, n))]
                batch = collate(items, pad_token_id=data.encoder.pad_token_id, padding_side=PADDING_SIDE)
                batch = {k: v.to(device) for k, v in model_inputs(batch).items()}
                with taps.record():
                    model(**batch, use_cache=False)
                for rec in taps.records:
                    t, keep, w = rec.targets, rec.keep, rec.weights
                    s = sums[rec.layer]
                    s["kept"] += int((keep & t).sum())
                    s["total"] += int(t.sum())
                    s["w_kept"] += float(w[keep & t].sum())
                    s["w_skipped"] += float(w[~keep & t].sum())
    finally:
        model.train(was_training)
    out = []
    for i, layer in layers.items():
        s = sums[i]
        skipped = s["total"] - s["kept"]
        out.append({
            "layer": i, "ratio": layer.pmod_ratio, "kept": s["kept"], "total": s["total"],
            "retained": s["kept"] / s["total"] if s["total"] else None,
            "weight_kept": s["w_kept"] / s["kept"] if s["kept"] else None,
            "weight_skipped": s["w_skipped"] / skipped if skipped else None,
        })
    return out


def plot_run(records: list[dict], layers: list[dict], path: Path) -> Path:
    """Loss per step, and per MoD layer the mean TanhNorm weight of kept vs skipped vision tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in records]
    lines = ax1.plot(steps, [r["loss"] for r in records], label="LM loss")
    aux = [(r["step"], r["router_aux_loss"]) for r in records if r.get("router_aux_loss") is not None]
    if aux:
        ax1b = ax1.twinx()
        lines += ax1b.plot(*zip(*aux), color="tab:orange", alpha=0.7, label="router aux loss")
        ax1b.set_ylabel("router aux loss")
    ax1.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("LM loss (answer tokens)")
    ax1.set_title("training loss")
    xs = list(range(len(layers)))
    width = 0.38
    kept = [l["weight_kept"] if l["weight_kept"] is not None else float("nan") for l in layers]
    skipped = [l["weight_skipped"] if l["weight_skipped"] is not None else float("nan") for l in layers]
    ax2.bar([x - width / 2 for x in xs], kept, width, label="kept tokens")
    ax2.bar([x + width / 2 for x in xs], skipped, width, label="skipped tokens")
    ax2.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax2.set_xticks(xs, [f"L{l['layer']}\n{(l['retained'] or 0):.0%}" for l in layers])
    ax2.set_ylabel("mean TanhNorm weight")
    ax2.set_title("routers on the training data (layer, kept share)")
    ax2.legend()
    present = [v for v in kept + skipped if not math.isnan(v)] or [1.0]
    lo, hi = min(present), max(present)
    pad = max(hi - lo, 1e-3) * 0.5
    ax2.set_ylim(lo - pad, hi + pad)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_summary(summary: dict) -> str:
    lines = [
        f"steps {summary['steps']} / {summary['total_steps']}, final loss {summary['final_loss']:.4f} "
        f"(first {summary['first_loss']:.4f}), {summary['train_seconds']:.1f} s, "
        f"{summary['tokens_per_s']:.0f} tokens/s, {summary['samples']} samples"
        + (f" ({summary['skipped_rows']} bad rows skipped)" if summary["skipped_rows"] else ""),
        "layer  ratio  kept/total    w(kept)  w(skipped)",
    ]
    for l in summary["layers"]:
        wk = "-" if l["weight_kept"] is None else f"{l['weight_kept']:.4f}"
        ws = "-" if l["weight_skipped"] is None else f"{l['weight_skipped']:.4f}"
        lines.append(f"{l['layer']:>5}  {l['ratio']:.3f}  {l['kept']:>5}/{l['total']:<6}  {wk:>8}  {ws:>10}")
    return "\n".join(lines)
