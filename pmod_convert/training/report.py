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


def plot_run(records: list[dict], layers: list[dict], path: Path, *, validations: list[dict] | None = None,
             dense_accuracy: float | None = None) -> Path:
    """Training losses per step; validation accuracy / agreement with dense per step (step 0: the input);
    per MoD layer the mean TanhNorm weight of kept vs skipped vision tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4))
    steps = [r["step"] for r in records]
    lines = ax1.plot(steps, [r["loss"] for r in records], label="objective", linewidth=0.8)
    if any(r.get("kl") is not None for r in records):
        lines += ax1.plot(steps, [r.get("ce") for r in records], label="label CE", linewidth=0.8, alpha=0.6)
    for key, colour, label in (("router_aux_loss", "tab:orange", "router aux loss"),
                               ("router_rank_loss", "tab:red", "router ranking loss")):
        series = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if series:
            lines += ax1.plot(*zip(*series), color=colour, alpha=0.7, linewidth=0.8, label=label)
    ax1.set_yscale("log")
    ax1.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss per token (log scale)")
    ax1.set_title("training")
    if validations:
        vs = [v["step"] for v in validations]
        ax3.plot(vs, [v["accuracy"] for v in validations], marker="o", label="accuracy (greedy)")
        ax3.plot(vs, [v["agreement"] for v in validations], marker="s", label="top-1 agreement with dense")
        best = [v for v in validations if v.get("best")]
        if best:
            ax3.scatter([best[-1]["step"]], [best[-1]["accuracy"]], s=160, facecolors="none", edgecolors="k",
                        label="kept")
        if dense_accuracy is not None:
            ax3.axhline(dense_accuracy, color="gray", linestyle="--", linewidth=0.8, label="dense accuracy")
        ax3.set_ylim(0, 1.05)
        ax3.legend(fontsize=8, loc="lower right")
    ax3.set_xlabel("optimizer step (0: the input model)")
    ax3.set_title("validation")
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


def format_summary(summary: dict, with_validation: bool = True) -> str:
    lines = [
        f"steps {summary['steps']} / {summary['total_steps']}, final loss {summary['final_loss']:.4f} "
        f"(first {summary['first_loss']:.4f}), {summary['train_seconds']:.1f} s, "
        f"{summary['tokens_per_s']:.0f} tokens/s, {summary['samples']} samples"
        + (f" ({summary['skipped_rows']} bad rows skipped)" if summary["skipped_rows"] else ""),
        "layer  ratio  kept/total    w(kept)  w(skipped)  router moved"
        + ("   (the input's weights were kept)" if (summary.get("validation") or {}).get("kept") == "input" else ""),
    ]
    for l in summary["layers"]:
        wk = "-" if l["weight_kept"] is None else f"{l['weight_kept']:.4f}"
        ws = "-" if l["weight_skipped"] is None else f"{l['weight_skipped']:.4f}"
        moved = "-" if l.get("router_moved") is None else f"{l['router_moved']:.3g}"
        lines.append(f"{l['layer']:>5}  {l['ratio']:.3f}  {l['kept']:>5}/{l['total']:<6}  {wk:>8}  {ws:>10}  "
                     f"{moved:>12}")
    if with_validation and summary.get("validation"):
        from .finetune import final_line

        lines.append(final_line(summary))
    return "\n".join(lines)
