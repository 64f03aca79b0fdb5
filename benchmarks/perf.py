"""The performance table in one command: prefill, routing overhead and decode of MoD against dense, with spreads.

    python benchmarks/perf.py --out perf.json                    # CPU, the README table (qwen2-0.5b, llava-onevision-0.5b)
    python benchmarks/perf.py --device cuda --dtype bfloat16 --batch-sizes 1 16 --out perf-cuda.json
    python benchmarks/perf.py --shapes tiny --quick              # a smoke run in seconds

Every row is one ``pmod_convert.bench.bench`` call: the MoD model and its dense model (same weights) in this
process, on the same prompts, in alternating pairs (dense then MoD, then MoD then dense, ...); each pair gives
one MoD / dense ratio. Pairs are added (``--repeats`` at least, ``--max-repeats`` at most) until the relative
spread (q3 - q1) / median of the pair ratios is at most ``--target-spread``; a row that never got there says
so (``settled: no``) instead of printing a number that looks precise. The process is pinned to ``--threads``
CPUs (default: all it may use) with as many torch threads.
``--retain-memory`` makes glibc keep freed memory for reuse first
(``pmod_convert.bench.retain_freed_memory``): by default the C library page-faults large activations back in
on every run, and which model pays for that depends on tensor sizes and order, not FLOPs (it moved the CPU
prefill ratio by 0.01-0.02 in back-to-back runs here, less than a row's swing between runs); with it, once the
heap has grown to what the runs need (the warm-up), almost nothing is faulted in again, as with a caching
allocator.

Rows per shape and batch size:

- ``prefill``: the published schedule, one prompt forward (``new_tokens=0``); target: time ratio <= estimated
  decoder FLOPs ratio + 0.02;
- ``routing overhead``: every layer an MoD layer at ratio 1.0 (all tokens kept, routers called, STRing applied):
  the cost of routing itself; target: <= 1.02;
- ``prefill, attention scorer``: the published schedule with every MoD layer ranking by its own text-to-vision
  attention (``calibrate``'s attention scorer, ``pmod_convert.set_scorers``); the estimate counts the scorer's
  FLOPs (``k_proj`` of every token, ``q_proj`` of the text queries, one score per pair); target: as prefill;
- ``decode, short context`` / ``decode, long context``: tokens/s over ``--new-tokens`` - 1 cached steps after a
  prompt of ``--vision-tokens`` (and 4x that) vision tokens; MoD / dense tokens/s; target >= 1.00.

Once per run (``--finetune-shape``, ``benchmarks/finetune_step.py``'s LLaVA-like decoder; ``none`` skips them):

- ``finetune step, LoRA + checkpointing``: one optimizer step of a LoRA finetune with gradient checkpointing, the
  same objective for both models (answer cross-entropy), alternating pairs on the same batches; target: step
  time ratio <= forward decoder FLOPs ratio + 0.05;
- ``finetune step, default objective``: the MoD step of a default ``finetune`` (distillation from the dense
  teacher pass and the router ranking targets) against the same dense LoRA step; no target: the teacher pass
  is a whole dense forward the dense finetune does not run.

Writes one JSON file (``--out``: every row's full ``BenchReport`` plus the summary rows) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    shape: str
    batch_size: int
    # "prefill" | "routing overhead" | "prefill, attention scorer" | "decode, short context" | "decode, long context"
    measure: str
    vision_tokens: int
    text_tokens: int
    metric: str  # which ratio: "prefill time" / "step time" (lower is better) or "decode tokens/s" (higher is better)
    median: float
    q1: float
    q3: float
    rel_spread: float | None
    pairs: int
    settled: bool
    estimate: float | None  # the analytic ratio to compare with (decoder FLOPs; None where none applies)
    target: str
    met: bool | None  # None when the row did not settle (the median is not trustworthy enough to judge)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["qwen2-0.5b", "llava-onevision-0.5b"], help="named shapes")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    p.add_argument("--vision-tokens", type=int, default=729, help="vision tokens per prompt (long context: 4x)")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=33, help="tokens generated in the decode rows")
    p.add_argument("--repeats", type=int, default=3, help="alternating pairs at least")
    p.add_argument("--max-repeats", type=int, default=9, help="alternating pairs at most")
    p.add_argument("--target-spread", type=float, default=0.03, help="relative spread (q3 - q1) / median to reach")
    p.add_argument("--threads", type=int, default=None, help="pin to this many CPUs/torch threads (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16")
    p.add_argument("--no-long", action="store_true", help="skip the long-context decode rows (they prefill 4x)")
    p.add_argument("--quick", action="store_true", help="2-3 pairs and 9 new tokens: a smoke run")
    p.add_argument("--finetune-shape", default="small", choices=("small", "qwen2-0.5b", "none"),
                   help="finetune_step.py shape of the finetune rows (none: skip them)")
    p.add_argument("--retain-memory", action="store_true",
                   help="glibc: keep freed memory for reuse (pmod_convert.bench.retain_freed_memory): almost no page "
                        "faults once warmed up, so the ratios reflect compute rather than which model the allocator "
                        "makes page-fault")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    return p.parse_args(argv)


def _row(shape, batch, measure, report, metric_key, estimate, target, ok) -> Row:
    sp = report.spread[metric_key]
    settled = report.converged is not False
    return Row(shape=shape, batch_size=batch, measure=measure, vision_tokens=report.vision_tokens,
               text_tokens=report.text_tokens,
               metric="prefill time" if metric_key == "prefill_time" else "decode tokens/s",
               median=sp["median"], q1=sp["q1"], q3=sp["q3"], rel_spread=sp["rel_spread"], pairs=int(sp["n"]),
               settled=settled, estimate=estimate, target=target, met=ok(sp["median"]) if settled else None)


def check_arguments(args: argparse.Namespace) -> None:
    """One-line errors (``PmodError``) for bad settings, before any model is built: every shape name, every
    batch size with the token counts and repeats as given (``--quick`` lowers them afterwards), the threads."""
    from pmod_convert.bench import BenchError, check_workload
    from pmod_convert.shapes import get_shape

    for shape in args.shapes:
        get_shape(shape)
    for batch in args.batch_sizes:
        for vision in (args.vision_tokens,) + (() if args.no_long else (4 * args.vision_tokens,)):
            check_workload(batch_size=batch, vision_tokens=vision, text_tokens=args.text_tokens,
                           new_tokens=args.new_tokens, warmup=1, repeats=args.repeats)
    if args.max_repeats < args.repeats:
        raise BenchError(f"--max-repeats ({args.max_repeats}) is below --repeats ({args.repeats})")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")


def run(args: argparse.Namespace) -> tuple[list[Row], list[dict]]:
    from pmod_convert import Recipe, ScheduleSettings, add_routers, set_scorers
    from pmod_convert.adapters import get_adapter
    from pmod_convert.api import mod_layers
    from pmod_convert.bench import _share_weights_copy, bench, pair_from_shape

    if args.quick:
        args.repeats, args.max_repeats, args.new_tokens = 2, 3, 9
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    args.threads = threads  # the settings recorded in the JSON say what ran
    common = dict(text_tokens=args.text_tokens, warmup=1, repeats=args.repeats, max_repeats=args.max_repeats,
                  target_spread=args.target_spread, threads=threads, device=args.device, memory=False)
    rows: list[Row] = []
    reports: list[dict] = []
    overhead_recipe = Recipe(schedule=ScheduleSettings(kind="constant", ratio=1.0))
    for shape in args.shapes:
        mod, dense, label = pair_from_shape(shape, None, dtype=args.dtype, device=args.device)
        # the ratio-1.0 model is one more structural copy sharing the dense model's weight tensors
        full = add_routers(_share_weights_copy(dense), overhead_recipe)
        # the same schedule, ranked by each MoD layer's own attention (one more copy sharing the weights)
        scored = _share_weights_copy(mod)
        routed = {i for i, _ in mod_layers(scored)}
        n_layers = len(get_adapter(scored).decoder_layers(scored))
        set_scorers(scored, ["attention" if i in routed else None for i in range(n_layers)])
        for batch in args.batch_sizes:
            plans = [("prefill", mod, args.vision_tokens, 0), ("routing overhead", full, args.vision_tokens, 0),
                     ("prefill, attention scorer", scored, args.vision_tokens, 0),
                     ("decode, short context", mod, args.vision_tokens, args.new_tokens)]
            if not args.no_long:
                plans.append(("decode, long context", mod, 4 * args.vision_tokens, args.new_tokens))
            for measure, model, vision, new in plans:
                print(f"[perf] {shape} batch {batch}: {measure} ({vision} vision tokens) ...", file=sys.stderr,
                      flush=True)
                report = bench(model, dense, batch_size=batch, vision_tokens=vision, new_tokens=new,
                               progress=False, label=f"{label}; {measure}", **common)
                reports.append({"shape": shape, "batch_size": batch, "measure": measure, "report": report.to_dict()})
                if measure in ("prefill", "prefill, attention scorer"):
                    est = report.ratios["estimated_prefill_flops"]
                    rows.append(_row(shape, batch, measure, report, "prefill_time", est,
                                     f"<= {est + 0.02:.3f} (FLOPs + 0.02)", lambda x, e=est: x <= e + 0.02))
                elif measure == "routing overhead":
                    rows.append(_row(shape, batch, measure, report, "prefill_time", 1.0, "<= 1.020",
                                     lambda x: x <= 1.02))
                else:
                    rows.append(_row(shape, batch, measure, report, "decode_tokens_per_s",
                                     1.0 / report.ratios["estimated_decode_flops"], ">= 1.000",
                                     lambda x: x >= 1.0))
        del mod, dense, full, scored
    if args.finetune_shape != "none":
        rows += finetune_rows(args, threads, reports)
    return rows, reports


def finetune_rows(args: argparse.Namespace, threads: int, reports: list[dict]) -> list[Row]:
    """The two finetune-step rows (see the module docstring), measured by ``finetune_step.measure``."""
    from pmod_convert.bench import pinned_threads
    from pmod_convert.training import FinetuneSettings

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import finetune_step

    if args.device != "cpu":
        print("[perf] finetune rows run on the CPU only (finetune_step.py); skipped", file=sys.stderr)
        return []
    rows = []
    plans = [("finetune step, LoRA + checkpointing", dict(loss="ce", router_rank_coef=0.0), True),
             ("finetune step, default objective", {}, False)]
    for measure, changes, targeted in plans:
        print(f"[perf] {args.finetune_shape}: {measure} ...", file=sys.stderr, flush=True)
        settings = FinetuneSettings(lora_dropout=0.0, gradient_checkpointing=True, **changes).validate()
        with pinned_threads(threads):
            result = finetune_step.measure(shape=args.finetune_shape, settings=settings, warmup=2,
                                           repeats=args.repeats, max_repeats=args.max_repeats,
                                           target_spread=args.target_spread)
        reports.append({"shape": args.finetune_shape, "batch_size": result["batch_size"], "measure": measure,
                        "report": result})
        sp, est = result["spread"], result["forward_decoder_flops_ratio"]
        target, ok = (f"<= {est + 0.05:.3f} (FLOPs + 0.05)", sp["median"] <= est + 0.05) if targeted else ("-", None)
        rows.append(Row(shape=f"finetune {args.finetune_shape}", batch_size=result["batch_size"], measure=measure,
                        vision_tokens=result["vision_tokens"], text_tokens=result["text_tokens"], metric="step time",
                        median=sp["median"], q1=sp["q1"], q3=sp["q3"], rel_spread=sp["rel_spread"],
                        pairs=int(sp["n"]), settled=result["settled"], estimate=est, target=target,
                        met=ok if result["settled"] else None))
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("shape", "batch", "measure", "tokens (vis+text)", "MoD/dense median", "quartiles", "pairs",
              "settled", "estimate", "target", "met")
    body = []
    for r in rows:
        body.append((r.shape, str(r.batch_size), f"{r.measure}: {r.metric}", f"{r.vision_tokens}+{r.text_tokens}",
                     f"{r.median:.3f}", f"{r.q1:.3f}-{r.q3:.3f}", str(r.pairs),
                     "yes" if r.settled else "no",
                     "-" if r.estimate is None else f"{r.estimate:.3f}", r.target,
                     "-" if r.met is None else ("yes" if r.met else "NO")))
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pmod_convert.bench import allocator_mode
    from pmod_convert.errors import PmodError

    try:
        check_arguments(args)
        if args.out is not None:
            from pmod_convert.bench import check_report_path

            check_report_path(args.out)
        if args.retain_memory:
            from pmod_convert.bench import retain_freed_memory

            retain_freed_memory()
        rows, reports = run(args)
    except PmodError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    first = reports[0]["report"] if reports else {}
    print(f"{first.get('device', args.device)} ({first.get('device_name', platform.machine())}), "
          f"{first.get('dtype', '-')}, {first.get('threads', '-')} thread(s) pinned to {first.get('pinned_cpus')}, "
          f"allocator {first.get('allocator', 'default')}; decode estimate = 1 / estimated decode FLOPs ratio")
    print(format_table(rows))
    unsettled = [r for r in rows if not r.settled]
    if unsettled:
        print(f"{len(unsettled)} row(s) did not reach a relative spread of {args.target_spread} within "
              f"{args.max_repeats} pairs: their medians are noisy (rerun on a quieter machine or raise --max-repeats)")
    if args.out is not None:
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"rows": [asdict(r) for r in rows], "runs": reports,
                                       "allocator": allocator_mode(),
                                       "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items()}}, indent=2))
            os.replace(tmp, args.out)
        except OSError as exc:
            print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
