"""``pmod-convert quickstart``: the whole idea, end to end, on a CPU in minutes, with nothing downloaded.

1. data:        a synthetic shapes VQA dataset (``demo.synthetic``): most of every image is background;
2. dense model: a tiny LLaVA (``demo.model``) pretrained from scratch until it answers well;
3. add-routers: the published p-MoD schedule with zero routers (``api.convert``, as ``pmod-convert add-routers``);
4. calibrate:   the schedule fitted to FLOPs budgets, routers warm-started (``calibration.calibrate``);
5. finetune:    LoRA + routers on the training split (``training.finetune``);
6. export:      the finetuned model merged into a standalone folder (``export.export``);
7. evaluate:    every model on the test split (``evaluation.evaluate``) and the measured prefill time against
                the dense model (``bench.bench``);
8. report:      one table (printed, ``report.json``) and ``accuracy_vs_flops.png``.

Every folder under OUT is written by the same public functions the CLI commands call.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PmodError
from ..progress import quiet_library_bars
from .model import PretrainSettings, TinyLlavaSettings

MARKER = ".pmod-quickstart"
REPORT_FILE = "report.json"
PLOT_FILE = "accuracy_vs_flops.png"
TARGET_GAP = 0.02  # the target: within 2 accuracy points of dense ...
TARGET_FLOPS = 0.60  # ... at no more than 60% of the dense decoder FLOPs


# Questions about the one shape's colour and position: answers are balanced (five colours, each side of both
# midlines equally often), so answering blind stays near chance. Not asked: the shape's kind (in 600 steps the
# tower, trained from scratch, does not learn it: "triangle" to every shape question, 28% against 28% blind),
# and comparisons with the question text ("how many circles", "is there a red square", multiple choice).
QUICKSTART_KINDS = ("colour", "horizontal", "vertical")


class QuickstartError(PmodError):
    """The quickstart cannot run with these settings or this output folder."""


@dataclass
class QuickstartSettings:
    """Sizes and knobs of one quickstart run (``full()`` for the README's run, ``fast_run()`` for CI)."""

    # data
    train_images: int = 2000
    val_images: int = 200  # calibration reads the validation split
    test_images: int = 400
    train_questions: int = 3  # questions per training image (a multi-turn conversation): one of each kind
    # One shape per image, "the object" in every question: every answer needs the image, and a model trained from
    # scratch for a few minutes learns it (with two or three shapes it stalls on "which shape does the question
    # name" and reads colours only).
    max_shapes: int = 1
    question_kinds: tuple[str, ...] = QUICKSTART_KINDS
    train_captions: bool = False  # a caption turn would only repeat the answers
    # models and training
    model: TinyLlavaSettings = field(default_factory=TinyLlavaSettings)
    # Twice the steps of half the batch (the same compute as 300 x 32): the vision tower, trained from scratch,
    # needs the updates to tell left from right (300 x 32: left/right 62%, against 100% here).
    pretrain: PretrainSettings = field(default_factory=lambda: PretrainSettings(steps=600, batch_size=16,
                                                                                warmup_steps=50))
    target_flops: float = 0.55  # the main budget (decoder FLOPs, MoD / dense)
    extra_budgets: tuple[float, ...] = (0.4, 0.75)  # more calibrated points for the figure
    finetune_extra: tuple[float, ...] = (0.4,)  # extra budgets that are finetuned too
    calibration_samples: int = 64
    finetune_steps: int = 100
    finetune_batch_size: int = 16
    finetune_lr: float = 1e-3
    router_lr: float = 1e-2
    lora_r: int = 16
    export_quantize: str = "none"
    # measurements
    eval_batch_size: int = 50
    bench_batch_size: int = 32  # prompts per prefill: small batches time the routing overhead, not the layers
    bench_repeats: int = 7
    seed: int = 0
    fast: bool = False

    @classmethod
    def full(cls, seed: int = 0) -> QuickstartSettings:
        return cls(seed=seed)

    @classmethod
    def fast_run(cls, seed: int = 0) -> QuickstartSettings:
        """CI-sized: small data, a small model, few steps. Accuracy is not meaningful at this size."""
        return cls(train_images=48, val_images=12, test_images=24, train_questions=2, train_captions=False,
                   model=TinyLlavaSettings(vision_hidden=32, hidden=64, layers=4, mlp_ratio=2),
                   pretrain=PretrainSettings(steps=40, batch_size=8, lr=2e-3, warmup_steps=3), extra_budgets=(),
                   finetune_extra=(), calibration_samples=8, finetune_steps=3, finetune_batch_size=4,
                   eval_batch_size=24, bench_batch_size=2, bench_repeats=2, seed=seed, fast=True)

    def validate(self) -> QuickstartSettings:
        if min(self.train_images, self.val_images, self.test_images) < 1:
            raise QuickstartError("every split needs at least one image")
        budgets = (self.target_flops, *self.extra_budgets)
        if not all(0 < b < 1 for b in budgets):
            raise QuickstartError(f"FLOPs budgets must be in (0, 1), got {budgets}")
        if len(set(budgets)) != len(budgets):
            raise QuickstartError(f"FLOPs budgets must differ, got {budgets}")
        if not set(self.finetune_extra) <= set(self.extra_budgets):
            raise QuickstartError(f"finetune_extra {self.finetune_extra} must be among extra_budgets {self.extra_budgets}")
        if self.finetune_steps < 1 or self.bench_repeats < 1:
            raise QuickstartError("finetune_steps and bench_repeats must be >= 1")
        self.model.validate()
        self.pretrain.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelRow:
    """One line of the table."""

    name: str
    stage: str  # dense | calibrated | finetuned | exported
    checkpoint: str  # relative to OUT
    budget: float | None
    accuracy: float
    per_kind: dict[str, float]
    decoder_flops_ratio: float
    kv_ratio: float
    layer_ratios: list[float | None] | None
    checkpoint_bytes: int
    predictions: str  # relative to OUT
    prefill_time_ratio: float | None = None
    measured_kv_ratio: float | None = None
    bench: str | None = None  # relative to OUT


@dataclass
class QuickstartReport:
    out: Path
    rows: list[ModelRow]
    timings: dict[str, float]  # wall seconds per stage
    cpu_seconds: dict[str, float]  # CPU seconds per stage (this process, all threads)
    blind_accuracy: float
    blind_per_kind: dict[str, float]  # the blind baseline per question kind: what reading the image must beat
    target: dict[str, Any]
    pretraining: dict[str, Any]  # the dense model's training: steps, seconds, losses
    workload: dict[str, Any]  # tokens per test prompt
    settings: dict[str, Any]
    files: dict[str, str]

    def row(self, name: str) -> ModelRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out"] = str(self.out)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuickstartReport:
        """A report read back from ``report.json``."""
        data = dict(data)
        data["out"] = Path(data["out"])
        data["rows"] = [ModelRow(**row) for row in data["rows"]]
        return cls(**data)


# ------------------------------------------------------------------------------------------------
# Output folder and stage bookkeeping
# ------------------------------------------------------------------------------------------------


def prepare_out(out: Path, overwrite: bool) -> None:
    """OUT must be new or empty; with ``overwrite``, an earlier quickstart folder (and only one) is replaced."""
    if out.exists() and not out.is_dir():
        raise QuickstartError(f"{out} is a file; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise QuickstartError(f"{out} exists and is not a quickstart folder; choose another --out "
                                  "(only an earlier quickstart's folder can be replaced)")
        if not overwrite:
            raise QuickstartError(f"{out} holds an earlier quickstart run; pass --overwrite to replace it "
                                  "or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by pmod-convert quickstart; --overwrite may replace this folder\n")


class _Stages:
    """Prints a header per stage and records its wall time."""

    def __init__(self, total: int, console: Any):
        self.total, self.done, self.console = total, 0, console
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds of this process (all threads): comparable on a busy machine

    @contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        self.done += 1
        if self.console is not None:
            self.console.rule(f"[bold]{self.done}/{self.total} {name}[/bold]: {what}", align="left")
        start, cpu = time.perf_counter(), time.process_time()
        yield
        seconds = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu
        if self.console is not None:
            self.console.print(f"[dim]{name} took {seconds:.1f} s[/dim]")


def _progress(console: Any):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                    disable=console is None)


def folder_bytes(path: Path) -> int:
    """Bytes of every weight file (``*.safetensors``) under a checkpoint folder, finetune sidecar included."""
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))


def _budget_name(b: float) -> str:
    return f"{round(100 * b):d}"


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------


def quickstart(out: str | Path = "pmod-quickstart", *, fast: bool = False, settings: QuickstartSettings | None = None,
               overwrite: bool = False, console: Any = None) -> QuickstartReport:
    """Run the whole pipeline into OUT and return the report (also written to ``OUT/report.json``).

    ``settings`` defaults to ``QuickstartSettings.fast_run()`` with ``fast`` and ``full()`` otherwise.
    ``console``: a rich console for stage headers and progress bars (None: quiet).
    """
    settings = (settings or (QuickstartSettings.fast_run() if fast else QuickstartSettings.full())).validate()
    out = Path(out)
    prepare_out(out, overwrite)
    with quiet_library_bars():  # one bar per stage of ours, not one per weight file read or written
        return _run(out, settings, console)



def _run(out: Path, settings: QuickstartSettings, console: Any) -> QuickstartReport:
    import torch

    from ..api import convert
    from ..calibration import calibrate
    from ..export import export
    from ..recipe import Recipe
    from ..training import FinetuneSettings, finetune
    from . import synthetic
    from .model import build_checkpoint, pretrain

    torch.manual_seed(settings.seed)
    # Progress bars redraw in place: on a terminal only. Piped to a file, stages print periodic lines instead.
    quiet = console is None or not console.is_terminal
    budgets = [settings.target_flops, *settings.extra_budgets]
    finetune_budgets = [settings.target_flops, *settings.finetune_extra]
    stages = _Stages(8, console)
    data, ckpts, evals, benches = out / "data", out / "checkpoints", out / "eval", out / "bench"

    # 1. data ------------------------------------------------------------------------------------
    with stages("data", "synthetic shapes VQA (train / val / test)"):
        with _progress(console) as bar:
            tasks: dict[str, Any] = {}

            def tick(split: str, done: int, total: int) -> None:
                if split not in tasks:
                    tasks[split] = bar.add_task(f"{split} images", total=total, info="")
                bar.update(tasks[split], completed=done)

            info = synthetic.make_dataset(data, train=settings.train_images, val=settings.val_images,
                                          test=settings.test_images, train_questions=settings.train_questions,
                                          train_captions=settings.train_captions, seed=settings.seed,
                                          size=settings.model.image_size, max_shapes=settings.max_shapes,
                                          kinds=settings.question_kinds, progress=tick)
        train_rows = json.loads(info.split("train").read_text())
        test_rows = json.loads(info.split("test").read_text())
        blind = synthetic.blind_baseline(train_rows, test_rows)
        blind_per_kind = synthetic.blind_baseline_by_kind(train_rows, test_rows)
    images, train_json, val_json, test_json = info.image_folder, info.split("train"), info.split("val"), info.split("test")

    # 2. dense model -----------------------------------------------------------------------------
    dense = ckpts / "dense"
    with stages("pretrain", f"tiny LLaVA ({settings.model.layers} decoder layers, hidden {settings.model.hidden}, "
                            f"{settings.model.image_tokens} image tokens), dense, from scratch"):
        init = ckpts / ".init"
        build_checkpoint(init, info.vocabulary, settings.model, seed=settings.seed, overwrite=True)
        with _progress(console) as bar:
            task = bar.add_task("pretraining", total=settings.pretrain.steps, info="")

            def step(done: int, total: int, loss: float) -> None:
                bar.update(task, completed=done, info=f"loss {loss:.3f}")
                if quiet and console is not None and (done % max(1, total // 10) == 0 or done == total):
                    console.print(f"pretraining step {done}/{total}: loss {loss:.3f}", highlight=False)

            trained = pretrain(init, train_json, images, out=dense, settings=settings.pretrain, progress=step)
        shutil.rmtree(init, ignore_errors=True)

    rows: list[ModelRow] = []

    def evaluate_row(name: str, stage: str, checkpoint: Path, budget: float | None) -> ModelRow:
        from ..evaluation import evaluate

        summary = evaluate(checkpoint, test_json, images, out=evals / name, batch_size=settings.eval_batch_size,
                           max_new_tokens=4, overwrite=True, progress=console is not None)
        kinds: dict[str, list[bool]] = {}
        by_id = {r["id"]: r for r in test_rows}
        for p in summary.predictions:
            kinds.setdefault(by_id[p["id"]]["kinds"][-1], []).append(bool(p["correct"]))
        row = ModelRow(name=name, stage=stage, checkpoint=str(checkpoint.relative_to(out)), budget=budget,
                       accuracy=summary.accuracy, per_kind={k: sum(v) / len(v) for k, v in sorted(kinds.items())},
                       decoder_flops_ratio=summary.decoder_flops_ratio, kv_ratio=summary.kv_ratio,
                       layer_ratios=summary.layer_ratios, checkpoint_bytes=folder_bytes(checkpoint),
                       predictions=str((evals / name / "predictions.jsonl").relative_to(out)))
        rows.append(row)
        if console is not None:
            console.print(f"{name}: accuracy {100 * row.accuracy:.1f}%, decoder FLOPs {100 * row.decoder_flops_ratio:.1f}%")
        return row

    with stages("evaluate dense", "test accuracy of the dense model"):
        evaluate_row("dense", "dense", dense, None)

    # 3. add-routers -----------------------------------------------------------------------------
    routed = ckpts / "pmod"
    with stages("add-routers", "published p-MoD schedule, zero-initialised routers"):
        convert(dense, routed, Recipe())

    # 4. calibrate -------------------------------------------------------------------------------
    calibrated: dict[float, Path] = {}
    with stages("calibrate", "schedule fitted to " + ", ".join(f"{100 * b:.0f}%" for b in budgets)
                + " decoder FLOPs; routers warm-started"):
        for b in budgets:
            calibrated[b] = ckpts / f"calibrated-{_budget_name(b)}"
            calibrate(routed, val_json, images, out=calibrated[b], target_flops=b,
                      samples=min(settings.calibration_samples, settings.val_images), seed=settings.seed,
                      progress=console is not None)
            evaluate_row(f"calibrated-{_budget_name(b)}", "calibrated", calibrated[b], b)

    # 5. finetune --------------------------------------------------------------------------------
    finetuned: dict[float, Path] = {}
    ft_settings = FinetuneSettings(lora_r=settings.lora_r, lora_alpha=2.0 * settings.lora_r, lora_dropout=0.0,
                                   lr=settings.finetune_lr, router_lr=settings.router_lr, warmup_ratio=0.05,
                                   max_steps=settings.finetune_steps, batch_size=settings.finetune_batch_size,
                                   limit=settings.finetune_steps * settings.finetune_batch_size,
                                   save_steps=0, seed=settings.seed, stats_samples=16).validate()
    with stages("finetune", f"LoRA r{settings.lora_r} + routers, {settings.finetune_steps} steps x "
                            f"{settings.finetune_batch_size} samples per budget"):
        for b in finetune_budgets:
            finetuned[b] = ckpts / f"finetuned-{_budget_name(b)}"
            finetune(calibrated[b], train_json, images, out=finetuned[b], settings=ft_settings,
                     run_dir=ckpts / f".finetune-run-{_budget_name(b)}", overwrite=True, show_progress=console is not None)
            shutil.rmtree(ckpts / f".finetune-run-{_budget_name(b)}", ignore_errors=True)
            evaluate_row(f"finetuned-{_budget_name(b)}", "finetuned", finetuned[b], b)

    # 6. export ----------------------------------------------------------------------------------
    exported = ckpts / "exported"
    with stages("export", f"finetuned model merged into a standalone folder (quantize: {settings.export_quantize})"):
        export(finetuned[settings.target_flops], exported, quantize=settings.export_quantize, overwrite=True,
               progress=console is not None)
        evaluate_row("exported", "exported", exported, settings.target_flops)

    # 7. measured prefill time -------------------------------------------------------------------
    with stages("bench", "prefill time of every MoD model against the dense model, same process"):
        text_tokens = _mean_text_tokens(dense, test_json, images)
        for row in rows:
            if row.stage == "dense":
                row.prefill_time_ratio, row.measured_kv_ratio = 1.0, 1.0
                continue
            row.bench = str((benches / f"{row.name}.json").relative_to(out))
            report = _bench(out / row.checkpoint, dense, settings, text_tokens, out / row.bench, quiet)
            row.prefill_time_ratio = report.ratios["prefill_time"]
            row.measured_kv_ratio = report.ratios["kv_bytes_prefill"]

    # 8. report ----------------------------------------------------------------------------------
    main = rows_by_name(rows)[f"finetuned-{_budget_name(settings.target_flops)}"]
    dense_row = rows_by_name(rows)["dense"]
    target = {
        "goal": f"accuracy within {100 * TARGET_GAP:.0f} points of dense at <= {100 * TARGET_FLOPS:.0f}% decoder FLOPs",
        "model": main.name,
        "accuracy_gap_points": 100 * (dense_row.accuracy - main.accuracy),
        "decoder_flops_ratio": main.decoder_flops_ratio,
        "met": bool(dense_row.accuracy - main.accuracy <= TARGET_GAP + 1e-9 and main.decoder_flops_ratio <= TARGET_FLOPS),
        "applies": not settings.fast,  # a --fast run is too small for the target to mean anything
    }
    tail = trained.losses[-10:]
    pretraining = {"steps": trained.steps, "samples": trained.samples, "seconds": trained.seconds,
                   "first_loss": trained.losses[0], "final_loss_mean10": sum(tail) / len(tail),
                   "losses": trained.losses}
    workload = {"vision_tokens": settings.model.image_tokens, "text_tokens_mean": text_tokens,
                "test_questions": len(test_rows)}
    files = {"report": REPORT_FILE, "plot": PLOT_FILE, "data": "data", "checkpoints": "checkpoints",
             "predictions": "eval", "bench": "bench"}
    report = QuickstartReport(out=out, rows=rows, timings=dict(stages.timings), cpu_seconds=dict(stages.cpu),
                              blind_accuracy=blind, blind_per_kind=blind_per_kind, target=target,
                              pretraining=pretraining, workload=workload, settings=settings.to_dict(), files=files)
    from .plots import plot_accuracy_vs_flops

    title = (f"tiny LLaVA on synthetic shapes ({settings.model.image_tokens} image tokens)"
             + (" [--fast: accuracy not meaningful]" if settings.fast else ""))
    plot_accuracy_vs_flops([asdict(r) for r in rows], out / PLOT_FILE, blind_accuracy=blind, tolerance=TARGET_GAP,
                           flops_target=TARGET_FLOPS, title=title)
    report.timings["total"] = sum(v for k, v in stages.timings.items())
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report.to_dict(), indent=2))
    tmp.replace(out / REPORT_FILE)
    return report


def rows_by_name(rows: list[ModelRow]) -> dict[str, ModelRow]:
    return {r.name: r for r in rows}


def _mean_text_tokens(checkpoint: Path, data: Path, images: Path, limit: int = 64) -> int:
    """Mean non-vision tokens of the test prompts (the checkpoint's own encoding), for the benchmark prompts."""
    import torch

    from ..data import SampleEncoder, read_samples

    encoder = SampleEncoder.from_pretrained(checkpoint)
    vision = torch.tensor(sorted(encoder.vision_ids))
    counts = []
    for sample in read_samples(data, images, limit=limit).samples:
        ids = encoder.encode_for_generation(sample)[0]["input_ids"][0]
        counts.append(int((~torch.isin(ids, vision)).sum()))
    return max(1, round(sum(counts) / len(counts)))


def _bench(checkpoint: Path, dense: Path, settings: QuickstartSettings, text_tokens: int, path: Path, quiet: bool):
    from ..bench import bench, pair_from_checkpoint, save_report

    mod_model, dense_model, _ = pair_from_checkpoint(checkpoint, dense)
    report = bench(mod_model, dense_model, batch_size=settings.bench_batch_size,
                   vision_tokens=settings.model.image_tokens, text_tokens=text_tokens, new_tokens=0,
                   warmup=1, repeats=settings.bench_repeats, memory=False, progress=not quiet,
                   label=f"{checkpoint.name} vs dense", seed=settings.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_report(report, path, plot=False)
    return report


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def table(report: QuickstartReport):
    """The report as a rich Table (fits 80 columns)."""
    from rich import box
    from rich.table import Table

    dense = report.row("dense")
    t = Table(title=f"pmod-convert quickstart: {report.out}", title_justify="left", box=box.SIMPLE_HEAD,
              caption="FLOPs and KV cache: decoder prefill, estimated for the test questions. Prefill time: "
                      "measured. All relative to dense.", caption_justify="left")
    for col in ("model", "accuracy", "vs dense", "FLOPs", "KV cache", "prefill", "size"):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for r in report.rows:
        delta = "" if r.stage == "dense" else f"{100 * (r.accuracy - dense.accuracy):+.1f}"
        t.add_row(r.name, f"{100 * r.accuracy:.1f}%", delta, f"{100 * r.decoder_flops_ratio:.1f}%",
                  f"{100 * r.kv_ratio:.1f}%",
                  "-" if r.prefill_time_ratio is None else f"{100 * r.prefill_time_ratio:.0f}%",
                  _mib(r.checkpoint_bytes))
    return t


def summary_lines(report: QuickstartReport) -> list[str]:
    t = report.target
    verdict = "met" if t["met"] else "NOT met"
    main, dense = report.row(t["model"]), report.row("dense")
    lines = [
        f"blind baseline (answering without the image): {100 * report.blind_accuracy:.1f}%",
        f"target ({t['goal']}): {verdict}: {t['model']} {100 * main.accuracy:.1f}% vs dense {100 * dense.accuracy:.1f}% "
        f"({round(-t['accuracy_gap_points'], 1) + 0.0:+.1f} points) at {100 * t['decoder_flops_ratio']:.1f}% FLOPs"
        + ("" if t["applies"] else " (--fast run: accuracy not meaningful)"),
        f"by question kind, dense -> {t['model']} (blind): " + ", ".join(
            f"{kind} {100 * dense.per_kind[kind]:.0f}->{100 * main.per_kind.get(kind, float('nan')):.0f}% "
            f"({100 * report.blind_per_kind.get(kind, float('nan')):.0f}%)" for kind in dense.per_kind),
        "stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in report.timings.items()),
        f"wrote {report.out / REPORT_FILE} and {report.out / PLOT_FILE}",
    ]
    return lines


__all__ = ["ModelRow", "QuickstartError", "QuickstartReport", "QuickstartSettings", "quickstart", "summary_lines",
           "table"]
