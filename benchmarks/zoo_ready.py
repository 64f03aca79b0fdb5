"""Build zoo models, verify each one's dense accuracy with pmod_convert's own evaluator, publish a JSON file.

After every model, ``--ready-file`` (default ``/tmp/zoo_ready.json``) is rewritten atomically with the paths
and accuracies (fractions) of all models verified so far, so whoever waits on it can start with the first.

    python benchmarks/zoo_ready.py --tasks object oddone --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlm_zoo  # noqa: E402

MIN_GAIN = 0.3  # a model is published only when its dense test accuracy beats blind by this much (fraction)


def verify(meta: dict, batch_size: int = 32) -> dict:
    """Dense test accuracy (fraction) of ``meta['checkpoint']`` through ``pmod_convert.evaluate``."""
    import pmod_convert

    summary = pmod_convert.evaluate(meta["checkpoint"], meta["test"], meta["image_folder"], batch_size=batch_size,
                                    progress=False, device="cpu")
    return {"pmod_eval_accuracy": summary.accuracy, "pmod_eval_samples": summary.samples}


def publish(entries: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"models": entries}, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(vlm_zoo.TASKS), choices=list(vlm_zoo.TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(vlm_zoo.DEFAULT_CACHE))
    parser.add_argument("--ready-file", default="/tmp/zoo_ready.json")
    args = parser.parse_args(argv)
    ready = Path(args.ready_file)
    for task in args.tasks:
        meta = vlm_zoo.build(task, args.seed, args.cache_dir)
        if meta["dense_accuracy"] < meta["blind_accuracy"] + MIN_GAIN:
            print(f"[ready] {task} seed {args.seed}: NOT published, dense {meta['dense_accuracy']:.3f} is within "
                  f"{MIN_GAIN} of blind {meta['blind_accuracy']:.3f} ({meta['checkpoint']})", flush=True)
            continue
        meta.update(verify(meta))
        keep = ("task", "seed", "architecture", "parameters", "checkpoint", "train", "val", "test", "calib",
                "image_folder", "dense_accuracy", "dense_accuracy_by_kind", "pmod_eval_accuracy", "blind_accuracy",
                "blind_accuracy_by_kind", "train_seconds")
        entry = {k: meta[k] for k in keep}
        entries = json.loads(ready.read_text()).get("models", []) if ready.exists() else []  # others' updates
        entries = [e for e in entries if (e["task"], e["seed"]) != (task, args.seed)] + [entry]
        publish(entries, ready)
        print(f"[ready] {task} seed {args.seed}: dense {meta['dense_accuracy']:.3f} "
              f"(pmod_convert.evaluate {meta['pmod_eval_accuracy']:.3f}), blind {meta['blind_accuracy']:.3f} "
              f"-> {ready}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
