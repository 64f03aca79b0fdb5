"""Estimated cost of three ways a serving engine could run a pmod checkpoint (docs/serving.md).

    python benchmarks/serving_options.py [--vision-tokens 2880] [--text-tokens 100] [--new-tokens 128]

For a LLaVA-NeXT-7B (Vicuna-7B) decoder with the published p-MoD schedule, prints decoder FLOPs (prefill,
decode, total) and KV-cache size after the prefill, each as a ratio against the dense model on the same
token counts, all from :func:`pmod_convert.efficiency.estimate` (decoder layers only; embeddings, lm_head and
the vision tower left out on both sides):

* dense fallback: what vLLM / SGLang run today from an ``export --dense`` folder (or ignore routers);
* prefill-only routing, full KV: MoD layers route in the prefill, but the keys/values of skipped tokens are
  still projected and cached, so the engine's paged KV cache keeps one slot per token in every layer; decode
  runs dense over the full cache;
* full MoD: each MoD layer caches only its kept tokens (per-layer KV lengths), as ``load_pretrained`` runs it.

The prefill-only row adds, per MoD layer, the K and V projections of its skipped vision tokens
(``2 * 2 * hidden * kv_heads * head_dim`` FLOPs per token) to the MoD prefill, and uses the dense decode and
dense KV cache. It is an estimate of work, not a measurement of time.
"""

from __future__ import annotations

import argparse

from pmod_convert.efficiency import TextShape, estimate
from pmod_convert.mod.schedule import kept_count, layer_ratios

# Vicuna-7B (LLaVA-NeXT-7B's language model): the sizes of its config.json.
VICUNA_7B = TextShape(hidden=4096, intermediate=11008, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                      vocab=32064)


def options(shape: TextShape, ratios: list[float | None], n_vision: int, n_text: int, new_tokens: int) -> dict:
    """``{option: {prefill, decode, total, kv}}``: each a ratio against dense (FLOPs, or KV bytes after prefill)."""
    est = estimate(shape, ratios, n_vision, n_text, new_tokens=new_tokens)
    dense_total = est.dense_decoder_flops + est.dense_decode_flops
    kv_projection = 2 * 2 * shape.hidden * shape.num_kv_heads * shape.head_dim  # K and V, FLOPs per token
    skipped = sum(n_vision - kept_count(r, n_vision) for r in ratios if r is not None)
    prefill_only = est.mod_decoder_flops + skipped * kv_projection
    return {
        "dense fallback (what engines run today)": {
            "prefill": 1.0, "decode": 1.0, "total": 1.0, "kv": 1.0},
        "prefill-only routing, full KV": {
            "prefill": prefill_only / est.dense_decoder_flops, "decode": 1.0,
            "total": (prefill_only + est.dense_decode_flops) / dense_total, "kv": 1.0},
        "full MoD (per-layer KV of kept tokens)": {
            "prefill": est.decoder_flops_ratio, "decode": est.decode_flops_ratio or 1.0,
            "total": (est.mod_decoder_flops + est.mod_decode_flops) / dense_total, "kv": est.kv_ratio},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-tokens", type=int, default=2880)
    parser.add_argument("--text-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    ratios = layer_ratios(VICUNA_7B.num_layers)  # the published schedule: shiftedcos, 0.5 / 0.85 / 0.15
    print(f"Vicuna-7B decoder, published p-MoD schedule ({sum(r is not None for r in ratios)} MoD layers), "
          f"{args.vision_tokens} vision + {args.text_tokens} text tokens, {args.new_tokens} new tokens; "
          "ratios against dense:")
    print(f"{'option':42s} {'prefill':>8s} {'decode':>8s} {'total':>8s} {'KV':>8s}")
    for name, row in options(VICUNA_7B, ratios, args.vision_tokens, args.text_tokens, args.new_tokens).items():
        print(f"{name:42s} " + " ".join(f"{100 * row[k]:7.1f}%" for k in ("prefill", "decode", "total", "kv")))


if __name__ == "__main__":
    main()
