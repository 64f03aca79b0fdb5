"""Prefill time of the MoD model against its dense model, measured in the same run, next to the FLOPs estimate.

    python benchmarks/prefill.py --shape qwen2-0.5b --vision-tokens 729
    python benchmarks/prefill.py --checkpoint path/to/pmod-checkpoint --vision-tokens 2880 --dtype bfloat16

A thin wrapper over ``pmod_convert.bench`` with ``new_tokens=0`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--shape", help="named random-weight shape (default qwen2-0.5b when no --checkpoint)")
    source.add_argument("--checkpoint", help="a pmod-convert checkpoint folder")
    p.add_argument("--dense", help="dense checkpoint to compare with (default: --checkpoint with routers ignored)")
    p.add_argument("--vision-tokens", type=int, default=729, help="vision tokens per prompt (default 729)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per prompt (default 64)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model, alternating (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per model first (default 1)")
    p.add_argument("--max-repeats", type=int, default=None,
                   help="add pairs up to this many until the pair ratios' relative spread is <= --target-spread")
    p.add_argument("--target-spread", type=float, default=0.03, help="relative spread (q3 - q1) / median to reach")
    p.add_argument("--threads", type=int, default=None, help="pin to this many CPUs / torch threads")
    p.add_argument("--dtype", default=None, help="float32 (default for --shape) | bfloat16 | float16 | auto")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--recipe", help="YAML recipe for --shape (default: the published p-MoD schedule)")
    p.add_argument("--ratio", type=float, help="constant retention ratio for --shape instead of the schedule")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (one more untimed run per model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the full report as JSON (and a PNG beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from pmod_convert.bench import bench, check_workload, pair_from_checkpoint, pair_from_shape, save_report
    from pmod_convert.cli.common import build_recipe
    from pmod_convert.errors import PmodError

    try:
        check_workload(batch_size=args.batch_size, vision_tokens=args.vision_tokens, text_tokens=args.text_tokens,
                       new_tokens=0, warmup=args.warmup, repeats=args.repeats)
        if args.checkpoint:
            mod, dense, label = pair_from_checkpoint(args.checkpoint, args.dense, dtype=args.dtype, device=args.device)
        else:
            recipe = build_recipe(Path(args.recipe) if args.recipe else None, None, None, None, None, args.ratio,
                                  None, None, None, None)
            mod, dense, label = pair_from_shape(args.shape or "qwen2-0.5b", recipe, dtype=args.dtype,
                                                device=args.device, seed=args.seed)
        report = bench(mod, dense, batch_size=args.batch_size, vision_tokens=args.vision_tokens,
                       text_tokens=args.text_tokens, new_tokens=0, warmup=args.warmup, repeats=args.repeats,
                       device=args.device, seed=args.seed, memory=args.memory, label=label,
                       max_repeats=args.max_repeats, target_spread=args.target_spread, threads=args.threads)
        if args.out:
            save_report(report, args.out)
    except PmodError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    d, m = report.dense.prefill_s, report.mod.prefill_s
    pairs = report.prefill_ratio_per_repeat
    time_ratio, flops_ratio = report.ratios["prefill_time"], report.ratios["estimated_prefill_flops"]
    n_mod = sum(1 for r in report.layer_ratios if r is not None)
    print(label)
    print(f"{report.family}, {report.device} ({report.device_name}), {report.dtype}, {report.threads} thread(s); "
          f"{n_mod}/{len(report.layer_ratios)} MoD layers")
    print(f"prompt: batch {report.batch_size} x ({report.vision_tokens} vision + {report.text_tokens} text tokens), "
          f"{report.prompt_layout}")
    print(f"dense prefill: median {statistics.median(d):.3f} s  (min {min(d):.3f}, max {max(d):.3f}, {len(d)} runs)")
    print(f"MoD   prefill: median {statistics.median(m):.3f} s  (min {min(m):.3f}, max {max(m):.3f}, {len(m)} runs)")
    print(f"measured prefill time ratio MoD/dense: {time_ratio:.3f}  "
          f"(alternating pairs: {', '.join(f'{x:.3f}' for x in pairs)}; spread {min(pairs):.3f}-{max(pairs):.3f})")
    sp = report.spread["prefill_time"]
    print(f"pair ratios: median {sp['median']:.3f}, quartiles {sp['q1']:.3f}-{sp['q3']:.3f}, relative spread "
          + ("-" if sp["rel_spread"] is None else f"{sp['rel_spread']:.3f}")
          + ("" if report.converged is None else f"; settled at {args.target_spread}: "
             + ("yes" if report.converged else "NO (noisy)")))
    print(f"estimated prefill FLOPs ratio (decoder layers): {flops_ratio:.3f}")
    print(f"time ratio - FLOPs ratio: {time_ratio - flops_ratio:+.3f}  (vision tower, embeddings, lm_head and "
          f"routing overhead are in the time, not in the FLOPs)")
    print(f"KV cache after prefill, measured MoD/dense: {report.ratios['kv_bytes_prefill']:.3f}")
    for note in report.notes[1:]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
