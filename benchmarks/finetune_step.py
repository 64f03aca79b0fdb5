"""Step time of a LoRA finetune of the MoD model versus the same LoRA finetune of the dense model.

Both models are built from one random-weight LLaVA config (same weights: the MoD model is the dense one
plus routers from the published PRD schedule), get the same LoRA, and train on the same batches in the
same process, alternating step by step (order swapped every step), through the finetune command's own
step (``pmod_convert.training.loop.forward_backward`` + AdamW). Reported: median step times, their
ratio, and the analytic decoder FLOPs ratio of a forward pass for comparison.

The MoD step uses the finetune's default objective (``--loss mix``: distillation plus half the label
cross-entropy, with the dense teacher pass and, with ``--router-rank-coef`` > 0, its ranking targets inside the
step), so the ratio is the real cost of a default MoD finetune step against a plain LoRA step of the dense
model. ``--loss kl`` drops the label term; ``--loss ce`` measures the MoD step without a teacher (the same
objective as the dense step).

    python benchmarks/finetune_step.py                       # LLaVA-like, hidden 512 x 8 layers, 576 vision tokens
    python benchmarks/finetune_step.py --shape qwen2-0.5b --steps 4   # Qwen2-0.5B-sized decoder (slow on CPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from pmod_convert import Recipe, add_routers
from pmod_convert.adapters import adapter_by_family
from pmod_convert.bench import allocator_mode
from pmod_convert.efficiency import TextShape, estimate
from pmod_convert.training import FinetuneSettings
from pmod_convert.training.distill import Teacher
from pmod_convert.training.loop import Scales, answer_token_count, build_optimizer, forward_backward
from pmod_convert.training.losses import distill_positions, rank_terms
from pmod_convert.training.lora import prepare_for_training
from pmod_convert.training.routing import RouterTaps, TextRouting

# Decoder shapes (LLaVA-1.5 layout: CLIP-like tower kept tiny, it is frozen and identical in both models).
SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=32000),
}


def build_models(shape: str, image_size: int, patch: int, settings: FinetuneSettings, seed: int = 0):
    adapter = adapter_by_family("llava")
    config = adapter.tiny_config(**SHAPES[shape], vision_image_size=image_size, vision_patch_size=patch,
                                 vision_num_hidden_layers=1, max_position_embeddings=4096)
    torch.manual_seed(seed)
    dense = adapter.model_cls()(config)
    mod = add_routers(copy.deepcopy(dense), Recipe())
    models = {}
    for name, model in (("dense", dense), ("mod", mod)):
        torch.manual_seed(seed)  # the same LoRA initialisation for both
        models[name] = prepare_for_training(model, settings)
    return models, config


def make_batches(config, n: int, batch_size: int, text_tokens: int, answer_tokens: int) -> list[dict]:
    adapter = adapter_by_family("llava")
    batches = []
    for i in range(n):
        inputs = adapter.dummy_inputs(config, batch_size=batch_size, text_lengths=[text_tokens] * batch_size,
                                      seed=i, padding_side="right")
        labels = inputs["input_ids"].clone()
        labels[:, : labels.shape[1] - answer_tokens] = -100  # the answer is the last text tokens
        # Everything but the answer counts as instruction (only used with --route-text).
        instruction = (labels == -100) & (inputs["input_ids"] != config.image_token_id)
        batches.append({**inputs, "labels": labels, "instruction_mask": instruction})
    return batches


def step(model, optimizer, batch, settings, teacher=None, vision_ids=()) -> tuple[float, float]:
    """One optimizer step; (wall seconds, CPU seconds of this process). ``teacher``: distil (MoD model)."""
    rank = teacher is not None and teacher.attention
    taps = RouterTaps(model) if settings.router_aux_coef > 0 or rank else None
    text = TextRouting(model) if settings.route_text else None
    where = distill_positions(batch["labels"], batch["input_ids"], batch["attention_mask"], vision_ids,
                              settings.distill_positions)
    n_rank = rank_terms(batch["input_ids"], vision_ids, len(teacher.layers)) if rank else 0
    scales = Scales.for_window(settings, answer_token_count(batch), int(where.sum()), n_rank,
                               use_kl=teacher is not None and settings.loss != "ce", use_rank=rank)
    t0, c0 = time.perf_counter(), time.process_time()
    with taps if taps is not None else _null(), text if text is not None else _null():
        forward_backward(model, [batch], settings, device=torch.device("cpu"), scales=scales, taps=taps,
                         text_routing=text, teacher=teacher, vision_ids=vision_ids)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def measure(*, shape: str = "small", image_size: int = 336, patch: int = 14, text_tokens: int = 96,
            answer_tokens: int = 48, batch_size: int = 1, settings: FinetuneSettings, warmup: int = 2,
            repeats: int = 4, max_repeats: int | None = None, target_spread: float | None = None) -> dict:
    """MoD / dense LoRA finetune step time, in alternating pairs on the same batches.

    Every pair is one step of each model on one batch (order swapped every pair); its ratio is MoD wall
    seconds / dense wall seconds. ``warmup`` pairs are not measured; then at least ``repeats`` pairs and, while
    the relative spread (q3 - q1) / median of the pair ratios is above ``target_spread``, more, up to
    ``max_repeats``. Returns the figures as a dict (wall and process CPU seconds per step, the pair ratios and
    their spread, ``settled``, and the analytic forward decoder FLOPs ratio of the schedule).
    """
    from pmod_convert.bench import ratio_spread

    max_repeats = max(repeats, max_repeats or repeats)
    models, config = build_models(shape, image_size, patch, settings)
    optimizers = {name: build_optimizer(m, settings, total_steps=1000)[0] for name, m in models.items()}
    batches = make_batches(config, warmup + max_repeats, batch_size, text_tokens, answer_tokens)
    n_vision = int((batches[0]["input_ids"][0] == config.image_token_id).sum())
    vision_ids = [config.image_token_id]
    teacher = (Teacher(models["mod"], vision_ids, attention=settings.router_rank_coef > 0)
               if settings.loss != "ce" else None)

    times: dict[str, list[float]] = {"dense": [], "mod": []}
    cpu: dict[str, list[float]] = {"dense": [], "mod": []}
    pairs: list[float] = []
    settled = None
    for i, batch in enumerate(batches):
        order = ("dense", "mod") if i % 2 == 0 else ("mod", "dense")
        wall = {}
        for name in order:
            wall[name], cpu_s = step(models[name], optimizers[name], batch, settings,
                                     teacher=teacher if name == "mod" else None, vision_ids=vision_ids)
            if i >= warmup:
                times[name].append(wall[name])
                cpu[name].append(cpu_s)
        if i >= warmup:
            pairs.append(wall["mod"] / wall["dense"])
            if len(pairs) >= repeats:
                settled = target_spread is None or ratio_spread(pairs)["rel_spread"] <= target_spread
                if settled:
                    break

    ratios = models["mod"].config.pmod["layer_ratios"]
    est = estimate(TextShape.from_config(config), ratios, n_vision, text_tokens + 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "shape": shape, "layers": config.text_config.num_hidden_layers, "hidden": config.text_config.hidden_size,
        "vision_tokens": n_vision, "text_tokens": text_tokens + 1, "batch_size": batch_size,
        "mod_layers": sum(r is not None for r in ratios), "ratios": [None if r is None else round(r, 3) for r in ratios],
        "gradient_checkpointing": settings.gradient_checkpointing, "threads": torch.get_num_threads(),
        "dense_step_s": med["dense"], "mod_step_s": med["mod"], "step_time_ratio": med["mod"] / med["dense"],
        "dense_cpu_s": med_cpu["dense"], "mod_cpu_s": med_cpu["mod"], "cpu_time_ratio": med_cpu["mod"] / med_cpu["dense"],
        "pair_ratios": [round(x, 4) for x in pairs], "spread": ratio_spread(pairs), "settled": settled is not False,
        "wall_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "forward_decoder_flops_ratio": est.decoder_flops_ratio, "steps": len(pairs), "mod_loss": settings.loss,
        "router_rank_coef": settings.router_rank_coef, "teacher": teacher is not None,
        "allocator": allocator_mode(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--image-size", type=int, default=336, help="with --patch 14: 576 vision tokens per image")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--text-tokens", type=int, default=96)
    p.add_argument("--answer-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="measured steps per model (alternating pairs) at least")
    p.add_argument("--max-steps", type=int, default=None, help="more pairs, up to this, until --target-spread")
    p.add_argument("--target-spread", type=float, default=None, help="relative spread (q3 - q1) / median to reach")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per model first")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--router-aux-coef", type=float, default=0.0)
    p.add_argument("--route-text", action="store_true")
    p.add_argument("--loss", choices=("mix", "kl", "ce"), default="mix",
                   help="MoD objective: mix = distillation + 0.5 x cross-entropy (the finetune's default)")
    p.add_argument("--router-rank-coef", type=float, default=1.0, help="0: no eager-attention ranking targets")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--retain-memory", action="store_true",
                   help="glibc: keep freed memory for reuse (pmod_convert.bench.retain_freed_memory)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    if args.retain_memory:
        from pmod_convert.bench import retain_freed_memory
        from pmod_convert.errors import PmodError

        try:
            retain_freed_memory()
        except PmodError as exc:
            raise SystemExit(f"error: {exc}") from None
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = FinetuneSettings(lora_r=args.lora_r, lora_dropout=0.0, gradient_checkpointing=args.gradient_checkpointing,
                                router_aux_coef=args.router_aux_coef, route_text=args.route_text, loss=args.loss,
                                router_rank_coef=args.router_rank_coef).validate()
    result = measure(shape=args.shape, image_size=args.image_size, patch=args.patch, text_tokens=args.text_tokens,
                     answer_tokens=args.answer_tokens, batch_size=args.batch_size, settings=settings,
                     warmup=args.warmup, repeats=args.steps, max_repeats=args.max_steps,
                     target_spread=args.target_spread)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    med = {"dense": result["dense_step_s"], "mod": result["mod_step_s"]}
    med_cpu = {"dense": result["dense_cpu_s"], "mod": result["mod_cpu_s"]}
    sp = result["spread"]
    print(f"LLaVA-like decoder {args.shape}: {result['layers']} layers x hidden {result['hidden']}, "
          f"{result['vision_tokens']} vision + {result['text_tokens']} text tokens, batch {args.batch_size}, "
          f"LoRA r {args.lora_r}, checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{result['threads']} threads, allocator {result['allocator']}, MoD objective {args.loss}"
          + (" + router ranking (teacher attention)" if result["teacher"] and args.router_rank_coef > 0 else ""))
    print(f"MoD layers {result['mod_layers']}: ratios {result['ratios']}")
    print(f"median step  dense {med['dense'] * 1e3:8.1f} ms   MoD {med['mod'] * 1e3:8.1f} ms   "
          f"(over {result['steps']} steps each, alternating)")
    print(f"median CPU   dense {med_cpu['dense'] * 1e3:8.1f} ms   MoD {med_cpu['mod'] * 1e3:8.1f} ms   "
          "(process CPU time: less sensitive to other load on the machine)")
    print(f"step-time ratio MoD / dense: {result['step_time_ratio']:.3f} wall (pairs: median {sp['median']:.3f}, "
          f"quartiles {sp['q1']:.3f}-{sp['q3']:.3f}), {result['cpu_time_ratio']:.3f} CPU   "
          f"(analytic decoder forward FLOPs ratio {result['forward_decoder_flops_ratio']:.3f})")


if __name__ == "__main__":
    main()
