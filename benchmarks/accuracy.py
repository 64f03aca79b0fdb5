"""Accuracy of the pmod_convert pipeline on dense VLMs it did not build (``vlm_zoo``), at several FLOPs budgets.

For every zoo task and seed, through pmod_convert's public Python API only:

1. ``evaluate`` the dense checkpoint on the test split;
2. ``convert`` (add-routers, published recipe), then ``calibrate`` on the calib split at each target decoder
   FLOPs ratio (default 0.55 and 0.40), and ``evaluate``;
3. ``finetune`` each calibrated checkpoint with DEFAULT ``FinetuneSettings`` on at most 1000 training rows,
   and ``evaluate`` (``--finetune-seeds``: one finetune per seed, only ``seed`` changed);
4. the training-free pruning baselines (``calibrate --method fastv | pdrop`` on the dense checkpoint, the same
   budgets and calibration rows), and ``evaluate``.

Prints one table (model, variant, FLOPs budget, measured decoder FLOPs ratio, accuracy mean +- spread over
runs, delta vs dense in accuracy points, blind baseline), then one row per zoo model and budget (dense,
calibrated, each finetune seed, their mean against dense and against the calibrated input), and writes
``report.json``, ``accuracy_vs_flops.png`` and ``validation_curves.png`` (every finetune's validation curve)
under ``--out``. Checkpoints and results of finished steps are kept under ``<out>/runs/`` and reused when the
command is run again (so an interrupted run resumes); an evaluation is cached per test set. A failing API call
is recorded in the report (with its traceback) and the run goes on.

    python benchmarks/accuracy.py --out bench-accuracy                # 2 tasks x 3 seeds x 2 budgets
    python benchmarks/accuracy.py --out bench-accuracy --finetune-seeds 0 1 2   # 3 finetunes per checkpoint
    python benchmarks/accuracy.py --small --out /tmp/acc-small        # CI-sized: 1 seed, 8 finetune steps
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlm_zoo  # noqa: E402

FINETUNE_ROWS = 1000  # training rows given to finetune at most
SMALL_FINETUNE_STEPS = 8  # optimizer steps of a --small finetune
SMALL_EVAL_ROWS = 64  # test rows evaluated in --small mode
# test questions per model: the zoo's 400-row split plus 9,600 new ones (vlm_zoo.extra_test). The standard error
# of a paired difference between two models that disagree on a fraction d of the questions is sqrt(d / n): at
# 3% disagreement (finetuned against dense) 0.9 point with 400 questions, 0.4 with 2,000 and 0.17 with 10,000;
# a finetune against its own input disagrees on ~0.25%, 0.11 point with 2,000, as large as the gaps that decide
# "not below its input". Evaluating 10,000 questions takes ~20 s per checkpoint on 2 CPU cores.
TEST_ROWS = 10000


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _subset(src: str, dest: Path, n: int) -> Path:
    """The first ``n`` rows of a LLaVA JSON file, written to ``dest`` (same image folder)."""
    rows = json.loads(Path(src).read_text())[:n]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(rows))
    return dest


def _cached(path: Path, fn: Callable[[], dict]) -> dict:
    """``fn()``'s result, stored as JSON at ``path`` (reused when present). Errors become ``{"error": ...}``."""
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # an API failure is a finding of the benchmark, not a reason to stop it
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        _log(f"    FAILED: {result['error']}")
    result["seconds"] = round(time.perf_counter() - start, 1)
    if "error" not in result:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return result


def _eval(checkpoint: Path | str, meta: dict, test: Path) -> dict:
    import pmod_convert

    s = pmod_convert.evaluate(str(checkpoint), str(test), meta["image_folder"], batch_size=32, progress=False,
                              device="cpu")
    return {"accuracy": s.accuracy, "samples": s.samples, "decoder_flops_ratio": s.decoder_flops_ratio,
            "kv_ratio": s.kv_ratio, "layer_ratios": s.layer_ratios}


def _step(result: Path, folder: Path, fn: Callable[[], dict]) -> dict:
    """``fn()`` writes the checkpoint ``folder`` and returns what to keep of it; cached at ``result`` (JSON).

    The cached result is reused only while ``folder`` still holds that step's output: a marker next to it
    (``<folder>.step``) names the result file of the step that wrote it last (folders are shared by the
    settings a budget is run with, so a later run with other settings may have replaced the weights).
    """
    marker = folder.with_name(folder.name + ".step")
    if result.exists() and folder.exists() and marker.exists() and marker.read_text() == result.name:
        return json.loads(result.read_text())
    # The step runs again: nothing may vouch for the folder while fn() rewrites it (an interrupted or failed
    # run must not leave the old marker on new or partial weights), and no evaluation of this step's earlier
    # weights may be reused.
    marker.unlink(missing_ok=True)
    result.unlink(missing_ok=True)
    for old in result.parent.glob(f"{result.stem}-test*.json"):
        old.unlink()
    r = _cached(result, fn)
    if "error" not in r:
        marker.write_text(result.name)
    return r


def _evaluated(step: dict, result: Path, checkpoint: Path | str, meta: dict, test: Path, test_key: str) -> dict:
    """``step`` plus the accuracy of ``checkpoint`` on ``test``, cached per step and test set."""
    if "error" in step:
        return step
    r = _cached(result.with_name(f"{result.stem}-{test_key}.json"), lambda: _eval(checkpoint, meta, test))
    return {**step, **r, "seconds": step.get("seconds", 0.0) + r.get("seconds", 0.0)}


def test_split(meta: dict, work: Path, rows: int | None) -> tuple[Path, str]:
    """The test set of a run and its cache key: the first ``rows`` of the 400-row test split when ``rows`` is at
    most 400, else the split extended by ``vlm_zoo.extra_test`` (new questions from the same generator)."""
    n = len(json.loads(Path(meta["test"]).read_text()))
    if rows is not None and rows < 1:
        raise ValueError(f"test rows must be >= 1, got {rows}")
    if rows is None or rows > n:
        test = Path(vlm_zoo.extra_test(meta, rows)) if rows is not None else Path(meta["test"])
    else:
        test = Path(meta["test"]) if rows == n else _subset(meta["test"], work / f"test-{rows}.json", rows)
    digest = hashlib.sha256(test.read_bytes()).hexdigest()[:8]
    return test, f"test{len(json.loads(test.read_text()))}-{digest}"


def run_one(meta: dict, budgets: list[float], work: Path, small: bool, *, eval_rows: int | None = None,
            finetune_steps: int | None = None, calib_samples: int = 128,
            baselines: tuple[str, ...] = ("fastv", "pdrop"), finetune_seeds: tuple[int, ...] = (0,)) -> list[dict]:
    """All variants of one zoo model (one task, one seed). Returns result rows (accuracy as fractions).

    ``baselines``: training-free pruning methods (``calibrate --method``) evaluated at the same budgets.
    ``finetune_seeds``: one default finetune of each calibrated checkpoint per seed (``FinetuneSettings.seed``:
    data order, held-out rows, LoRA initialisation); a row each, with ``finetune_seed``.
    ``eval_rows``: test questions (default ``TEST_ROWS``: the 400-row split extended by new questions from the
    same generator, ``vlm_zoo.extra_test``; at most 400: the first rows of the split).

    ``small``: the CI-sized path (``SMALL_EVAL_ROWS`` test rows, ``SMALL_FINETUNE_STEPS`` finetune steps on 64
    rows); ``eval_rows`` / ``finetune_steps`` override those sizes (tests); ``calib_samples``: calibration rows.
    Checkpoints and results are cached under ``work``: a calibration reruns when ``calibrate``'s defaults or the
    code that decides it change (``calibrate_key``), a finetune when the default settings or its calibrated
    input change (not when only the training code changes: delete the run's ``finetuned-*`` files then), an
    evaluation when its step reran or the test set changes.
    """
    import pmod_convert

    work.mkdir(parents=True, exist_ok=True)
    eval_rows = eval_rows if eval_rows is not None else (SMALL_EVAL_ROWS if small else TEST_ROWS)
    finetune_steps = finetune_steps if finetune_steps is not None else (SMALL_FINETUNE_STEPS if small else None)
    test, test_key = test_split(meta, work, eval_rows)
    train = _subset(meta["train"], work / "finetune-train.json", FINETUNE_ROWS if not small else 64)
    base = {"task": meta["task"], "seed": meta["seed"], "blind_accuracy": meta["blind_accuracy"],
            "test_set": test_key}
    rows = []
    _log(f"{meta['task']} seed {meta['seed']}: dense eval ({test_key})")
    r = _cached(work / "dense" / f"{test_key}.json", lambda: _eval(meta["checkpoint"], meta, test))
    rows.append({**base, "variant": "dense", "budget": 1.0, **r})
    _log(f"    dense accuracy {r.get('accuracy')}")

    converted = work / "converted"
    cal_key = calibrate_key()
    for budget in budgets:
        tag = f"{budget:.2f}"
        calibrated = work / f"calibrated-{tag}"

        def do_calibrate() -> dict:
            if not converted.exists():
                pmod_convert.convert(meta["checkpoint"], converted)
            n_calib = len(json.loads(Path(meta["calib"]).read_text()))
            res = pmod_convert.calibrate(converted, meta["calib"], meta["image_folder"], out=calibrated,
                                         target_flops=budget, samples=min(calib_samples, n_calib), overwrite=True,
                                         progress=False)
            return {"calibrated_ratios": res.ratios}

        for method in baselines:
            folder = work / f"{method}-{tag}"

            def do_baseline(method: str = method, folder: Path = folder) -> dict:
                n_calib = len(json.loads(Path(meta["calib"]).read_text()))
                res = pmod_convert.calibrate(meta["checkpoint"], meta["calib"], meta["image_folder"], out=folder,
                                             target_flops=budget, samples=min(calib_samples, n_calib),
                                             overwrite=True, progress=False, method=method)
                return {"calibrated_ratios": res.ratios}

            _log(f"{meta['task']} seed {meta['seed']}: {method} at {tag} FLOPs (training-free baseline), eval")
            result = work / f"{method}-{tag}-{cal_key}-step.json"
            r = _evaluated(_step(result, folder, do_baseline), result, folder, meta, test, test_key)
            rows.append({**base, "variant": method, "budget": budget, **r})
            _log(f"    {method} accuracy {r.get('accuracy')} (decoder FLOPs {r.get('decoder_flops_ratio')})")

        _log(f"{meta['task']} seed {meta['seed']}: convert + calibrate to {tag} FLOPs, eval")
        cal_result = work / f"calibrated-{tag}-{cal_key}-step.json"
        r = _evaluated(_step(cal_result, calibrated, do_calibrate), cal_result, calibrated, meta, test, test_key)
        rows.append({**base, "variant": "calibrated", "budget": budget, **r})
        _log(f"    calibrated accuracy {r.get('accuracy')} (decoder FLOPs {r.get('decoder_flops_ratio')})")
        if "error" in r:
            continue

        for ft_seed in dict.fromkeys(finetune_seeds):  # each seed once
            rows.append({**base, "variant": "finetuned", "budget": budget, "finetune_seed": ft_seed,
                         **_finetune(meta, work, tag, calibrated, cal_result, cal_key, train, test, test_key,
                                     ft_seed, finetune_steps, small)})
    return rows


def _finetune(meta: dict, work: Path, tag: str, calibrated: Path, cal_result: Path, cal_key: str, train: Path,
              test: Path, test_key: str, seed: int, finetune_steps: int | None, small: bool) -> dict:
    """One default finetune of ``calibrated`` with ``FinetuneSettings.seed = seed``, evaluated (cached)."""
    import pmod_convert

    # seed 0 (the default) keeps the folder and cache key it always had
    finetuned = work / (f"finetuned-{tag}" if seed == 0 else f"finetuned-{tag}-seed{seed}")
    settings = dataclasses.replace(pmod_convert.FinetuneSettings(), seed=seed)  # the library's defaults

    def do_finetune() -> dict:
        run = settings if finetune_steps is None else dataclasses.replace(settings, max_steps=finetune_steps)
        summary = pmod_convert.finetune(calibrated, train, meta["image_folder"], out=finetuned,
                                        settings=run, overwrite=True, show_progress=False)
        keep = {k: summary.get(k) for k in ("steps", "wall_seconds", "best_step") if k in summary}
        return {"finetune": keep, "finetune_settings": run.to_dict()}

    _log(f"{meta['task']} seed {meta['seed']}: finetune at {tag} FLOPs (default settings, seed {seed}, "
         f"{'small' if small else f'<= {FINETUNE_ROWS} rows'}), eval")
    # keyed by the settings: when the library's defaults change, the finetune runs again
    # (and by the rules that size a None setting from the data: the epochs for a few epoch lengths),
    # and by the calibrated checkpoint it starts from
    sized = {"epochs_for": [settings.epochs_for(n) for n in (10, 30, 60, 120, 400)]}
    settings_key = hashlib.sha256(json.dumps([settings.to_dict(), sized, cal_result.name], sort_keys=True,
                                             default=str).encode()).hexdigest()[:8]
    result = work / (f"finetuned-{tag}-{cal_key}-{settings_key}"
                     f"{'-' + str(finetune_steps) if finetune_steps else ''}-step.json")
    r = _evaluated(_step(result, finetuned, do_finetune), result, finetuned, meta, test, test_key)
    _log(f"    finetuned accuracy {r.get('accuracy')} (seed {seed})")
    return {**r, "folder": str(finetuned)}


def calibrate_key() -> str:
    """Hash of what decides a calibration: ``calibrate``'s defaults, the schedule search and the source of the
    calibration, scoring and cost modules (a cached calibrated or finetuned result is reused only while these
    stay the same)."""
    import inspect

    import importlib

    calibration = importlib.import_module("pmod_convert.calibration.calibrate")

    defaults = {k: repr(v.default) for k, v in inspect.signature(calibration.calibrate).parameters.items()}
    # and the code that solves budgets, ranks tokens and costs them
    package = Path(calibration.__file__).resolve().parents[1]
    sources = [package / "calibration" / "calibrate.py", package / "calibration" / "budget.py",
               package / "calibration" / "warm_start.py", package / "mod" / "scoring.py", package / "efficiency.py"]
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    text = json.dumps([defaults, repr(calibration.SCHEDULE_SEARCH), code], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and spread (population std, accuracy fractions) over runs per (task, variant, budget): a run is one
    zoo model (and, for ``finetuned``, one finetune seed of it)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["variant"], r["budget"]), []).append(r)
    dense = {t: [r["accuracy"] for r in g if r.get("accuracy") is not None]
             for (t, v, _), g in groups.items() if v == "dense"}
    out = []
    for (task, variant, budget), group in groups.items():
        accs = [r["accuracy"] for r in group if r.get("accuracy") is not None]
        flops = [r["decoder_flops_ratio"] for r in group if r.get("decoder_flops_ratio") is not None]
        mean = statistics.fmean(accs) if accs else None
        d = dense.get(task) or []
        out.append({
            "task": task, "variant": variant, "budget": budget, "runs": len(accs),
            "failed": sum("error" in r for r in group),
            "accuracy_mean": mean, "accuracy_spread": statistics.pstdev(accs) if len(accs) > 1 else 0.0 if accs else None,
            "delta_vs_dense": None if mean is None or not d else mean - statistics.fmean(d),
            "decoder_flops_ratio": statistics.fmean(flops) if flops else None,
            "blind_accuracy": statistics.fmean(r["blind_accuracy"] for r in group),
        })
    return out


def _pct(x: float | None, signed: bool = False, digits: int = 1) -> str:
    """A fraction as percent (points when ``signed``) with ``digits`` decimals; "-" for None, never "-0.0"."""
    if x is None:
        return "-"
    x = 0.0 if abs(100 * x) < 0.5 * 10 ** -digits else x  # no "-0.0" from rounding noise
    return f"{100 * x:+.{digits}f}" if signed else f"{100 * x:.{digits}f}"


def table(summary: list[dict]) -> str:
    head = ("model", "variant", "FLOPs budget", "decoder FLOPs", "accuracy % (mean ± sd)", "Δ vs dense (pts)",
            "blind %", "runs")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        acc = ("failed" if s["accuracy_mean"] is None
               else f"{_pct(s['accuracy_mean'])} ± {_pct(s['accuracy_spread'])}")
        seeds = f"{s['runs']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        lines.append("| " + " | ".join([s["task"], s["variant"], f"{s['budget']:.2f}",
                                         _pct(s["decoder_flops_ratio"]), acc, _pct(s["delta_vs_dense"], True),
                                         _pct(s["blind_accuracy"]), seeds]) + " |")
    return "\n".join(lines)


def per_model(rows: list[dict]) -> list[dict]:
    """Per zoo model and budget: dense and calibrated accuracy, the accuracy of each finetune seed, their mean,
    and the mean's difference from dense and from the calibrated input (fractions); ``below_calibrated``: how
    many of the finished finetune seeds ended below their calibrated input; ``failed``: seeds whose finetune or
    evaluation failed (``None`` in ``finetuned``; left out of the mean and the count)."""
    out = []
    models = sorted({(r["task"], r["seed"]) for r in rows})
    for task, seed in models:
        mine = [r for r in rows if (r["task"], r["seed"]) == (task, seed)]
        dense = next((r.get("accuracy") for r in mine if r["variant"] == "dense"), None)
        for budget in sorted({r["budget"] for r in mine if r["variant"] == "finetuned"}, reverse=True):
            cal = next((r.get("accuracy") for r in mine if r["variant"] == "calibrated" and r["budget"] == budget),
                       None)
            fts = {r["finetune_seed"]: r.get("accuracy") for r in mine
                   if r["variant"] == "finetuned" and r["budget"] == budget}
            accs = [a for a in fts.values() if a is not None]
            mean = statistics.fmean(accs) if accs else None
            out.append({
                "task": task, "seed": seed, "budget": budget, "dense": dense, "calibrated": cal,
                "finetuned": fts, "finetuned_mean": mean,
                "mean_vs_dense": None if mean is None or dense is None else mean - dense,
                "mean_vs_calibrated": None if mean is None or cal is None else mean - cal,
                "below_calibrated": None if cal is None else sum(a < cal for a in accs),
                "failed": sum(a is None for a in fts.values()),
            })
    return out


def per_model_table(models: list[dict]) -> str:
    def pct(x: float | None, signed: bool = False) -> str:
        return _pct(x, signed, digits=2)

    head = ("model", "FLOPs budget", "dense %", "calibrated %", "finetuned % (per finetune seed)", "mean",
            "mean - dense", "mean - calibrated", "seeds below calibrated")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        each = " / ".join(f"{pct(a)} (s{k})" for k, a in sorted(m["finetuned"].items()))
        done = len(m["finetuned"]) - m["failed"]
        below = "-" if m["below_calibrated"] is None else f"{m['below_calibrated']} of {done}"
        if m["failed"]:
            below += f" ({m['failed']} failed)"
        lines.append("| " + " | ".join([f"{m['task']} s{m['seed']}", f"{m['budget']:.2f}", pct(m["dense"]),
                                         pct(m["calibrated"]), each, pct(m["finetuned_mean"]),
                                         pct(m["mean_vs_dense"], True), pct(m["mean_vs_calibrated"], True),
                                         below]) + " |")
    return "\n".join(lines)


def plot_validation(rows: list[dict], path: Path) -> bool:
    """One panel per zoo model and budget: each finetune seed's validation curve (KL to dense per answer token
    and accuracy on its held-out rows, from ``pmod_finetune/validation.jsonl``), the kept step circled.
    Returns False (and writes nothing) when no finetune left a curve."""
    from pmod_convert.training import REPORT_DIR

    curves: dict[tuple, list] = {}
    for r in rows:
        log = Path(r.get("folder", "")) / REPORT_DIR / "validation.jsonl"
        if r["variant"] == "finetuned" and "error" not in r and log.is_file():
            points = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            curves.setdefault((r["task"], r["seed"], r["budget"]), []).append((r.get("finetune_seed", 0), points))
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(curves, key=lambda k: (k[0], k[1], -k[2]))
    cols = min(3, len(keys))
    rows_n = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        acc_ax = ax.twinx()
        for seed, points in sorted(curves[key]):
            steps = [p["step"] for p in points]
            line, = ax.plot(steps, [max(p["kl"], 1e-6) for p in points], "-", label=f"seed {seed} KL")
            acc_ax.plot(steps, [100 * p["accuracy"] for p in points], ":", color=line.get_color())
            kept = [p for p in points if p.get("best")]
            if kept:
                ax.scatter([kept[-1]["step"]], [max(kept[-1]["kl"], 1e-6)], s=90, facecolors="none",
                           edgecolors=line.get_color())
        ax.set_yscale("log")
        ax.set_title(f"{key[0]} s{key[1]} at {key[2]:.2f} FLOPs", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("KL to dense (nats, solid)")
        acc_ax.set_ylabel("validation accuracy % (dotted)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("finetune validation curves (circled: the kept step)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for task in sorted({s["task"] for s in summary}):
        dense = next((s for s in summary if s["task"] == task and s["variant"] == "dense"), None)
        for variant, style in (("calibrated", "o--"), ("finetuned", "s-"), ("fastv", "x:"), ("pdrop", "^:")):
            pts = sorted((s["decoder_flops_ratio"] or s["budget"], s["accuracy_mean"], s["accuracy_spread"] or 0.0)
                         for s in summary if s["task"] == task and s["variant"] == variant
                         and s["accuracy_mean"] is not None)
            if dense is not None and dense["accuracy_mean"] is not None:
                pts.append((1.0, dense["accuracy_mean"], dense["accuracy_spread"] or 0.0))
            if pts:
                xs, ys, es = zip(*sorted(pts))
                ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], fmt=style, capsize=3,
                            label=f"{task} {variant}")
        blind = next(s["blind_accuracy"] for s in summary if s["task"] == task)
        ax.axhline(100 * blind, linestyle=":", linewidth=1, color="gray")
    ax.set_xlabel("decoder FLOPs (MoD / dense)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("pmod_convert on zoo VLMs (dotted: blind baselines)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-accuracy", help="output folder (report.json, PNG, runs/)")
    parser.add_argument("--tasks", nargs="+", default=list(vlm_zoo.TASKS), choices=list(vlm_zoo.TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (--small: 0)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.55, 0.40],
                        help="target decoder FLOPs ratios (MoD / dense)")
    parser.add_argument("--cache-dir", default=str(vlm_zoo.DEFAULT_CACHE), help="zoo models and data")
    parser.add_argument("--small", action="store_true",
                        help=f"CI-sized: 1 seed, {SMALL_EVAL_ROWS} test rows, {SMALL_FINETUNE_STEPS} finetune steps")
    parser.add_argument("--models", nargs="+", default=None, metavar="TASK:SEED",
                        help="exact zoo models, e.g. oddone:0 oddone:1 object:2 (instead of --tasks x --seeds)")
    parser.add_argument("--test-rows", type=int, default=None,
                        help=f"test questions per model (default {TEST_ROWS}: the 400-row split plus new ones from "
                             f"the same generator; --small: {SMALL_EVAL_ROWS})")
    parser.add_argument("--finetune-seeds", nargs="+", type=int, default=[0], metavar="SEED",
                        help="one default finetune per seed of each calibrated checkpoint (default: 0; the "
                             "finetune's noise: data order, held-out rows, LoRA initialisation)")
    parser.add_argument("--baselines", nargs="*", default=["fastv", "pdrop"], choices=["fastv", "pdrop"],
                        help="training-free pruning baselines evaluated at the same budgets (none: skip)")
    args = parser.parse_args(argv)
    if args.test_rows is not None and args.test_rows < 1:
        parser.error(f"--test-rows must be >= 1, got {args.test_rows}")
    seeds = args.seeds if args.seeds is not None else ([0] if args.small else [0, 1, 2])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    models = []
    pairs = [(t, s) for t in args.tasks for s in seeds]
    if args.models:
        try:
            pairs = [(m.split(":")[0], int(m.split(":")[1])) for m in args.models]
        except (IndexError, ValueError):
            parser.error("--models takes TASK:SEED entries, e.g. oddone:0")
        bad = [t for t, _ in pairs if t not in vlm_zoo.TASKS]
        if bad:
            parser.error(f"unknown zoo task(s) {bad}; choose from {', '.join(vlm_zoo.TASKS)}")
    for task, seed in pairs:
        _log(f"zoo model {task} seed {seed} (cached after the first build)")
        meta = vlm_zoo.build(task, seed, args.cache_dir, log=_log)
        models.append({k: meta[k] for k in ("task", "seed", "architecture", "checkpoint", "dense_accuracy",
                                            "blind_accuracy", "train_seconds")})
        rows += run_one(meta, args.budgets, out / "runs" / ("small" if args.small else "full") / meta["key"],
                        args.small, baselines=tuple(args.baselines), eval_rows=args.test_rows,
                        finetune_seeds=tuple(dict.fromkeys(args.finetune_seeds)))
    summary = aggregate(rows)
    by_model = per_model(rows)
    print(table(summary))
    print()
    print(per_model_table(by_model))
    report = {"small": args.small, "budgets": args.budgets, "seeds": seeds,
              "finetune_seeds": list(dict.fromkeys(args.finetune_seeds)), "models": models, "summary": summary,
              "per_model": by_model, "runs": rows}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot(summary, out / "accuracy_vs_flops.png")
    curves = plot_validation(rows, out / "validation_curves.png")
    _log(f"wrote {out / 'report.json'}, {out / 'accuracy_vs_flops.png'}"
         + (f" and {out / 'validation_curves.png'}" if curves else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
