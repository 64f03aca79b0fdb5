"""``pmod-convert compare``: accuracy vs cost of dense, MoD and the pruning baselines on one question set.

For every FLOPs budget the dense checkpoint is converted three ways with :func:`calibrate` (``pmod``: MoD
routers with the warm start, no training; ``fastv``; ``pdrop``), every model (and any finetuned MoD checkpoint
given) is scored with :func:`pmod_convert.evaluate` on the same test rows, and its prefill time is measured
against the dense model with :func:`pmod_convert.bench.bench` on prompts of the calibration data's typical
token counts. Written: ``compare.json`` (one row per model) and ``compare.png`` (accuracy vs estimated decoder
FLOPs ratio, and vs measured prefill time ratio).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import PmodError, RecipeError

log = logging.getLogger("pmod_convert")

COMPARE_FILE = "compare.json"
COMPARE_PLOT = "compare.png"
METHOD_LABELS = {"dense": "dense", "pmod": "MoD calibrated", "finetuned": "MoD finetuned", "fastv": "FastV",
                 "pdrop": "PyramidDrop"}


@dataclass
class CompareRow:
    label: str
    method: str  # dense | pmod | finetuned | fastv | pdrop
    budget: float | None  # the --target-flops asked for (None: dense / finetuned as given)
    checkpoint: str
    accuracy: float | None  # share of test questions answered correctly (None: failed, see error)
    decoder_flops_ratio: float | None  # estimated on the test rows' real token counts
    kv_ratio: float | None
    prefill_time_ratio: float | None  # measured, model / dense, median of the bench repeats
    setting: str = ""
    error: str | None = None


def compare(dense: str | Path, data: str | Path, image_folder: str | Path | None, calib: str | Path, *,
            budgets: list[float], out: str | Path, finetuned: list[str | Path] = (),
            methods: tuple[str, ...] = ("pmod", "fastv", "pdrop"), calib_image_folder: str | Path | None = None,
            limit: int | None = None, batch_size: int = 16, samples: int = 64, seed: int = 0,
            bench_batch: int = 16, bench_repeats: int = 5, overwrite: bool = False,
            progress: bool = True, allow_pickle: bool = False, allow_outside_images: bool = False) -> dict[str, Any]:
    """Evaluate dense, each ``methods`` entry at each of ``budgets`` (decoder FLOPs ratios) and each
    ``finetuned`` pmod checkpoint; write ``out/compare.json``, ``out/compare.png`` and the converted
    checkpoints (``out/<method>-<budget>``). Returns the JSON document (``rows``: :class:`CompareRow` dicts).

    A budget a method cannot reach becomes a row with ``error`` set (the other rows still run).
    ``allow_pickle``: accept ``pytorch_model.bin`` / ``adapter_model.bin`` weights in ``dense`` and ``finetuned``
    (safetensors only by default); ``allow_outside_images``: accept image paths of ``data`` / ``calib`` that
    lead outside their image folder (refused by default).

    Raises:
        RecipeError: no budget, a budget outside (0, 1], or an unknown method.
        CheckpointError / DataError: as :func:`calibrate` and :func:`pmod_convert.evaluate`.
    """
    from ..api import load_dense, load_pretrained
    from ..bench import bench
    from ..evaluation import evaluate
    from .calibrate import calibrate

    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise RecipeError(f"--budgets must be decoder FLOPs ratios in (0, 1], got {budgets!r}")
    bad = [m for m in methods if m not in ("pmod", "fastv", "pdrop")]
    if bad:
        raise RecipeError(f"unknown method(s) {bad}; choose among pmod, fastv, pdrop")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RecipeError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    calib_folder = calib_image_folder if calib_image_folder is not None else image_folder
    eval_kw = dict(limit=limit, batch_size=batch_size, progress=progress, allow_outside_images=allow_outside_images)
    dense_model = load_dense(dense, allow_pickle=allow_pickle)
    rows: list[CompareRow] = []
    tokens: dict[str, float] | None = None

    def measure(row: CompareRow, path: Path, model) -> CompareRow:
        summary = evaluate(path, data, image_folder, model=model, **eval_kw)
        row.accuracy, row.decoder_flops_ratio, row.kv_ratio = summary.accuracy, summary.decoder_flops_ratio, summary.kv_ratio
        if row.method != "dense" and tokens is not None:
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            report = bench(model, dense_model, batch_size=bench_batch, vision_tokens=round(tokens["vision"]),
                           text_tokens=max(1, round(tokens["text"])), new_tokens=2, repeats=bench_repeats,
                           memory=False, progress=False)
            row.prefill_time_ratio = report.ratios["prefill_time"]
        elif row.method == "dense":
            row.prefill_time_ratio = 1.0
        return row

    rows.append(measure(CompareRow("dense", "dense", None, str(dense), None, None, None, None), Path(dense),
                        dense_model))
    for budget in budgets:
        for method in methods:
            path = out / f"{method}-{budget:g}"
            row = CompareRow(f"{METHOD_LABELS[method]} @ {budget:g}", method, budget, str(path), None, None, None, None)
            try:
                result = calibrate(dense, calib, calib_folder, out=path, target_flops=budget, method=method,
                                   samples=samples, seed=seed, overwrite=True, progress=progress,
                                   allow_pickle=allow_pickle, allow_outside_images=allow_outside_images)
            except PmodError as exc:
                row.error = str(exc)
                log.warning("%s: %s", row.label, exc)
                rows.append(row)
                continue
            report = result.report
            if tokens is None:
                tokens = {"vision": report["tokens"]["vision_per_sample"], "text": report["tokens"]["text_per_sample"]}
            row.setting = _setting(method, report)
            rows.append(measure(row, path, load_pretrained(path)))
    for path in finetuned:
        row = CompareRow(f"{METHOD_LABELS['finetuned']} ({Path(path).name})", "finetuned", None, str(path),
                         None, None, None, None)
        rows.append(measure(row, Path(path), load_pretrained(path, allow_pickle=allow_pickle)))

    doc = {"dense": str(dense), "data": str(data), "calib": str(calib), "budgets": list(budgets),
           "bench": {"batch_size": bench_batch, "repeats": bench_repeats, "tokens_per_prompt": tokens},
           "rows": [asdict(r) for r in rows]}
    (out / COMPARE_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    plot_compare(doc, out / COMPARE_PLOT)
    return doc


def _setting(method: str, report: dict) -> str:
    budget = report["budget"]
    if method == "fastv":
        return f"K={budget['fastv_k']} R={budget['fastv_drop_rate']:.2f}"
    if method == "pdrop":
        return f"stages@{budget['pdrop_boundaries']} lambda={budget['value']:.2f}"
    mod = [r for r in report["layer_ratios"] if r is not None]
    return f"{len(mod)} MoD layers, ratios {min(mod):.2f}-{max(mod):.2f}" if mod else "no MoD layer"


def table_lines(doc: dict) -> list[str]:
    """The comparison as markdown table lines (accuracy in %, ratios in % of dense)."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = ["| model | setting | accuracy | decoder FLOPs | KV cache | prefill time |", "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        acc = pct(r["accuracy"]) if r["error"] is None else f"failed: {r['error'][:80]}"
        lines.append(f"| {r['label']} | {r['setting']} | {acc} | {pct(r['decoder_flops_ratio'])} | "
                     f"{pct(r['kv_ratio'])} | {pct(r['prefill_time_ratio'])} |")
    return lines


def plot_compare(doc: dict, path: Path) -> Path:
    """Two panels: accuracy vs estimated decoder FLOPs ratio, and vs measured prefill time ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"dense": "*", "pmod": "o", "finetuned": "D", "fastv": "s", "pdrop": "^"}
    for ax, key, xlabel in ((axes[0], "decoder_flops_ratio", "estimated decoder FLOPs (vs dense)"),
                            (axes[1], "prefill_time_ratio", "measured prefill time (vs dense)")):
        for method, marker in markers.items():
            pts = sorted((r[key], r["accuracy"]) for r in doc["rows"]
                         if r["method"] == method and r["accuracy"] is not None and r[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=marker, markersize=9 if method == "dense" else 6,
                        linestyle="-" if len(pts) > 1 else "none", label=METHOD_LABELS[method])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("accuracy vs cost: dense, MoD and training-free pruning at equal decoder FLOPs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
