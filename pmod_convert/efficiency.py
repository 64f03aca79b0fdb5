"""Analytic cost model: FLOPs and KV-cache size of a dense model versus its MoD conversion.

Pure Python, no torch and no weights: everything is computed from config values and token counts
(see docs/method.md section 5). transformers is imported lazily, and only to fill in fields that a
``config.json`` dict leaves to the library defaults.

Conventions (used identically for the dense and the MoD model):

- 1 multiply-add = 2 FLOPs. Only the decoder layers are counted: the q/k/v/o projections, the
  (gated) MLP linears, and the attention score / value products. Embeddings, lm_head, norms,
  rotary embeddings, softmax, activations, routers and the vision tower are excluded (the vision
  tower can be added on request, identically to both models; see ``vision_tower_flops``).
- Linear FLOPs of a layer processing ``n`` tokens:
  ``2 * n * (h*q*d + 2*h*kv*d + q*d*h + 3*h*f)`` (``2*h*f`` instead of ``3*h*f`` without a gated MLP).
- Attention FLOPs: ``4 * q * d`` per (query, key) pair actually attended (``2*q*d`` for QK^T and
  ``2*q*d`` for the weighted sum of V). Causal attention is counted EXACTLY: a prefill of ``n``
  tokens attends ``n*(n+1)/2`` pairs (query ``j`` sees keys ``0..j``), i.e. about half the full
  ``n x n`` product; a decode step attends to every cached key plus itself. An MoD layer runs causal
  attention over its kept tokens only (text + top-k vision), so it attends ``m*(m+1)/2`` pairs for
  ``m`` kept tokens. This is the same count as feeding the tokens one at a time through the cache.
- KV cache per layer: ``2 * n_cached * kv * d * bytes_per_element``; an MoD layer caches only the
  tokens it processed (text + kept vision tokens; later, the generated tokens).
- Decode: generating ``new_tokens`` tokens is counted as ``new_tokens`` single-token forward passes
  after the prefill; step ``i`` (0-based) attends to ``cached_l + i + 1`` keys in layer ``l``
  (the prompt's cached tokens of that layer, the ``i`` tokens generated before, and itself).
  Generated tokens are text, so every layer processes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from .errors import RecipeError
from .mod.schedule import kept_count

__all__ = [
    "TextShape",
    "LayerRow",
    "Estimate",
    "layer_cost",
    "linear_flops",
    "attention_flops",
    "kv_bytes",
    "estimate",
    "vision_tower_flops",
    "vision_tower_flops_for_tokens",
    "default_vision_tokens",
    "typical_image",
    "format_estimate",
    "COUNTED_DECODER",
    "COUNTED_WITH_VISION",
    "COUNTED_PAPER",
    "CONVENTIONS",
    "PAPER_TEXT_TOKENS",
]

COUNTED_DECODER = (
    "decoder layers only: attention (q/k/v/o) + MLP linears and causal attention scores/values "
    "(exact causal pair count), plus the attention scorer's projections and scores in layers that use it; "
    "embeddings, lm_head, norms, softmax, routers and vision tower excluded"
)
COUNTED_WITH_VISION = (
    "decoder layers (attention + MLP linears, exact causal attention pairs) plus a rough vision-tower "
    "estimate added identically to dense and MoD; embeddings, lm_head, norms, softmax, routers and the "
    "projector excluded"
)

# Cost conventions. "exact": the count above (decoder layers, exact causal attention pairs). "paper": the
# convention that reproduces the p-MoD paper's TFLOPs (arXiv 2412.04449, LLaVA-1.5-7B 8.38 -> 4.92 and
# LLaVA-NeXT-7B 39.46 -> 21.94 TFLOPs, KV 53.8%): decoder linears only (no quadratic attention term), plus
# lm_head on every prompt position (dense and MoD alike), KV cache counted over the vision tokens only,
# about 58 text tokens per prompt. See docs/costs.md for the derivation.
CONVENTIONS = ("exact", "paper")
PAPER_TEXT_TOKENS = 58
COUNTED_PAPER = (
    "paper convention (p-MoD, arXiv 2412.04449): decoder attention + MLP linears (no attention-score term) plus "
    "lm_head on every prompt position, added to dense and MoD alike; KV cache over vision tokens only; "
    "embeddings, norms, softmax, routers and vision tower excluded"
)



# --------------------------------------------------------------------------------------------------
# Reading configs (transformers objects or plain config.json dicts)
# --------------------------------------------------------------------------------------------------


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _present(section: Any) -> bool:
    if section is None:
        return False
    if isinstance(section, Mapping):
        return len(section) > 0
    return True


@lru_cache(maxsize=64)
def _library_default(model_type: str | None) -> Any:
    """A default transformers config object for ``model_type`` (None if unknown / unavailable)."""
    if not model_type:
        return None
    try:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[model_type]()
    except Exception:  # noqa: BLE001 - unknown type, transformers missing, or a constructor that needs args
        return None


class _Section:
    """One config section (text or vision). Values missing from a plain dict fall back to the
    transformers defaults transformers itself would use when loading that config.json."""

    def __init__(self, section: Any, fallbacks: Sequence[tuple[str | None, str | None]]):
        self.section = section
        # (model_type, sub-config attribute or None) pairs, tried in order, resolved lazily.
        self._fallbacks = list(fallbacks)

    def get(self, key: str, default: Any = None, *, library_default: bool = True) -> Any:
        value = _get(self.section, key)
        if value is not None:
            return value
        if library_default and isinstance(self.section, Mapping):
            for model_type, sub in self._fallbacks:
                obj = _library_default(model_type)
                if obj is not None and sub is not None:
                    obj = getattr(obj, sub, None)
                value = _get(obj, key)
                if value is not None:
                    return value
        return default


def _text_section(config: Any) -> _Section:
    top_type = _get(config, "model_type")
    text = _get(config, "text_config")
    if _present(text):
        return _Section(text, [(_get(text, "model_type"), None), (top_type, "text_config")])
    if not isinstance(config, Mapping) and hasattr(config, "get_text_config"):
        try:
            text = config.get_text_config()
        except Exception:  # noqa: BLE001
            text = config
        return _Section(text, [])
    # A bare text config (LlamaConfig dict), or an older multimodal config.json with the text
    # fields at the top level (Qwen2-VL before transformers moved them under text_config).
    return _Section(config, [(top_type, None), (top_type, "text_config")])


def _vision_section(config: Any) -> _Section:
    top_type = _get(config, "model_type")
    vision = _get(config, "vision_config")
    if _present(vision):
        return _Section(vision, [(_get(vision, "model_type"), None), (top_type, "vision_config")])
    return _Section({}, [(top_type, "vision_config")])


def _model_type(config: Any) -> str:
    return str(_get(config, "model_type", "") or "")


# --------------------------------------------------------------------------------------------------
# Shapes and per-layer cost
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextShape:
    """The decoder (language model) dimensions the cost model needs."""

    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecipeError(f"text shape field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise RecipeError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_config(cls, config: Any) -> TextShape:
        """Build from a transformers config object or a config.json dict.

        Multimodal configs (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Idefics3/SmolVLM)
        are read from their ``text_config``; a bare text config (Llama/Qwen2/...) is read directly, as is
        an older Qwen2-VL config.json with the text fields at the top level. Fields a dict leaves out
        take transformers' defaults for that model type. ``head_dim`` defaults to hidden // heads and
        ``num_key_value_heads`` to the number of heads.
        """
        text = _text_section(config)
        hidden = text.get("hidden_size")
        heads = text.get("num_attention_heads")
        missing = [
            k
            for k, v in (
                ("hidden_size", hidden),
                ("num_attention_heads", heads),
                ("intermediate_size", text.get("intermediate_size")),
                ("num_hidden_layers", text.get("num_hidden_layers")),
            )
            if v is None
        ]
        if missing:
            raise RecipeError(f"the text config lacks {', '.join(missing)}; cannot estimate its cost")
        # Derived fields: never taken from a library default (it was derived from other defaults).
        kv_heads = text.get("num_key_value_heads", library_default=False) or heads
        head_dim = text.get("head_dim", library_default=False) or (int(hidden) // int(heads))
        # All supported families (Llama / Vicuna / Mistral / Qwen2 decoders) use a gated (SwiGLU)
        # MLP; build TextShape directly with gated_mlp=False for a plain two-matrix MLP.
        return cls(
            hidden=int(hidden),
            intermediate=int(text.get("intermediate_size")),
            num_layers=int(text.get("num_hidden_layers")),
            num_heads=int(heads),
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab=int(text.get("vocab_size", 0) or 0),
            gated_mlp=True,
        )


def linear_flops(shape: TextShape, n_tokens: int) -> int:
    """FLOPs of a decoder layer's linears for ``n_tokens`` tokens (method.md section 5)."""
    h, f, q, kv, d = shape.hidden, shape.intermediate, shape.num_heads, shape.num_kv_heads, shape.head_dim
    mlp = (3 if shape.gated_mlp else 2) * h * f
    return 2 * n_tokens * (h * q * d + 2 * h * kv * d + q * d * h + mlp)


def scorer_flops(shape: TextShape, n_vision: int, n_text: int, *, paper: bool = False) -> int:
    """Extra FLOPs of the attention scorer (``mod.scoring.own_attention_scores``) in one MoD layer for one prompt.

    What the scorer computes: ``k_proj`` for every token of the prompt (``2 * h * kv * d`` each; the layer then
    computes the kept tokens' keys again), ``q_proj`` for the text queries (``2 * h * q * d`` each; all
    ``n_text`` counted, an upper bound: only the prompt's text after the image is projected) and one score per
    (query, key) pair (``2 * q * d``, ``n_text * (n_vision + n_text)`` pairs at most). The norm before the
    projections and the softmax are elementwise and not counted, as for the layers. With ``paper`` (the p-MoD
    count, linears only) the pair term is left out, as it is for the layers.
    """
    h, q, kv, d = shape.hidden, shape.num_heads, shape.num_kv_heads, shape.head_dim
    linears = 2 * (n_vision + n_text) * h * kv * d + 2 * n_text * h * q * d
    return linears if paper else linears + 2 * n_text * (n_vision + n_text) * q * d


def attention_pairs(n_query: int, n_ctx: int, *, causal: bool) -> int:
    """(query, key) pairs attended. Causal: the queries are the LAST ``n_query`` positions of a
    context of ``n_ctx`` keys (which includes them), so query ``j`` sees ``n_ctx - n_query + j + 1``
    keys; a prefill (n_query == n_ctx == n) gives n*(n+1)/2, a decode step (n_query = 1) gives n_ctx."""
    if not causal:
        return n_query * n_ctx
    if n_query > n_ctx:
        raise RecipeError(f"causal attention needs n_query <= n_ctx, got {n_query} > {n_ctx}")
    return n_query * n_ctx - n_query * (n_query - 1) // 2


def attention_flops(shape: TextShape, n_query: int, n_ctx: int, *, causal: bool = False) -> int:
    """Attention score + value FLOPs: ``2 * 2 * pairs * q * d`` (pairs = n_query * n_ctx when not causal)."""
    return 4 * attention_pairs(n_query, n_ctx, causal=causal) * shape.num_heads * shape.head_dim


def layer_cost(shape: TextShape, n_query: int, n_ctx: int, *, causal: bool = False) -> int:
    """FLOPs of one decoder layer: linears for ``n_query`` tokens plus attention over ``n_ctx`` keys.

    With ``causal=False`` (the default) the attention term is the full product
    ``2 * 2 * n_query * n_ctx * q * d``. With ``causal=True`` it counts only the pairs the causal mask
    allows (see ``attention_pairs``): exactly ``n*(n+1)/2`` pairs for a prefill of ``n`` tokens, i.e.
    the full product roughly halved. ``estimate`` always uses ``causal=True``, for dense and MoD layers
    alike, in prefill and decode.
    """
    if n_query < 0 or n_ctx < 0:
        raise RecipeError(f"token counts must be >= 0, got n_query={n_query}, n_ctx={n_ctx}")
    return linear_flops(shape, n_query) + attention_flops(shape, n_query, n_ctx, causal=causal)


def kv_bytes(shape: TextShape, n_cached: int, bytes_per_element: int | float = 2) -> int | float:
    """KV-cache bytes of one layer holding ``n_cached`` tokens: 2 (K and V) * n * kv_heads * head_dim * bytes."""
    return 2 * n_cached * shape.num_kv_heads * shape.head_dim * bytes_per_element


def _decode_flops(shape: TextShape, cached: int, new_tokens: int) -> int:
    """``new_tokens`` single-token steps; step i attends to cached + i + 1 keys."""
    if new_tokens <= 0:
        return 0
    pairs = new_tokens * cached + new_tokens * (new_tokens + 1) // 2
    return linear_flops(shape, new_tokens) + 4 * pairs * shape.num_heads * shape.head_dim


# --------------------------------------------------------------------------------------------------
# Whole-model estimate
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerRow:
    """One decoder layer. Token counts and costs are summed over all samples (and the batch).

    ratio:           None for a dense layer, else the MoD retention ratio.
    prefill_tokens:  tokens the layer processes in the MoD model's prefill (text + kept vision).
    cached_tokens:   tokens in the layer's KV cache after the prefill (same set as processed).
    dense_tokens:    tokens the dense model's layer processes / caches (text + all vision).
    """

    layer: int
    ratio: float | None
    prefill_tokens: int
    cached_tokens: int
    dense_tokens: int
    dense_flops: int
    mod_flops: int
    dense_kv_bytes: float
    mod_kv_bytes: float
    dense_decode_flops: int = 0
    mod_decode_flops: int = 0


@dataclass
class Estimate:
    """Dense vs MoD cost of a workload (all totals summed over samples and batch).

    ``dense_prefill_flops`` / ``mod_prefill_flops`` include ``vision_flops`` (0 unless the caller
    passed it); ``*_decoder_flops`` are the decoder layers alone. KV bytes are the cache after the
    prefill; ``*_kv_bytes_final`` after the ``new_tokens`` decode steps.
    """

    layers: list[LayerRow]
    samples: int
    batch: int
    n_vision: int
    n_text: int
    new_tokens: int
    bytes_per_element: float
    dense_decoder_flops: int
    mod_decoder_flops: int
    vision_flops: float
    dense_prefill_flops: float
    mod_prefill_flops: float
    flops_ratio: float
    decoder_flops_ratio: float
    dense_kv_bytes: float
    mod_kv_bytes: float
    kv_ratio: float
    dense_decode_flops: int = 0
    mod_decode_flops: int = 0
    decode_flops_ratio: float | None = None
    dense_kv_bytes_final: float = 0
    mod_kv_bytes_final: float = 0
    num_mod_layers: int = 0
    shape: dict[str, Any] = field(default_factory=dict)
    counted: str = COUNTED_DECODER
    convention: str = "exact"  # one of CONVENTIONS
    head_flops: float = 0.0  # lm_head FLOPs on every prompt position (paper convention; else 0), in both totals

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (numbers, strings, None, lists and dicts only)."""
        return asdict(self)


def _as_counts(name: str, value: int | Sequence[int]) -> list[int]:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else list(value)
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise RecipeError(f"{name} must be a non-negative integer or a list of them, got {v!r}")
    if not values:
        raise RecipeError(f"{name} is an empty list")
    return values


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 1.0


def estimate(
    shape: TextShape,
    ratios: Sequence[float | None],
    n_vision: int | Sequence[int],
    n_text: int | Sequence[int],
    *,
    new_tokens: int = 0,
    batch: int = 1,
    bytes_per_element: int | float = 2,
    vision_flops: float | Sequence[float] = 0.0,
    convention: str = "exact",
    scorers: Sequence[str | None] | None = None,
) -> Estimate:
    """Dense vs MoD prefill FLOPs, KV-cache bytes and (``new_tokens`` > 0) decode FLOPs.

    ``ratios``: one entry per decoder layer (``layer_ratios(...)``): None = dense layer, else the MoD
    layer keeps ``floor(ratio * n_vision)`` vision tokens (``kept_count``) plus every text token.
    ``n_vision`` / ``n_text``: per-prompt counts, or lists with one entry per sample (an int is
    broadcast against a list); totals are summed over samples and every ratio is a ratio of sums.
    ``batch`` multiplies everything (each sample repeated ``batch`` times).
    ``vision_flops``: vision-tower FLOPs per sample (a float, or a list per sample), added
    identically to dense and MoD prefill (pass ``vision_tower_flops(config, images)`` when the
    caller asks to include the vision tower); 0 leaves it out.
    See the module docstring for what is counted and the causal convention.

    ``convention``: ``"exact"`` (the default, above) or ``"paper"``, the p-MoD paper's count: each layer costs
    ``linear_flops`` of the tokens it processes (no attention-score term), ``lm_head`` (``2 * hidden * vocab``
    FLOPs per prompt position) is added to both totals as ``head_flops``, and the KV cache holds only the vision
    tokens (text tokens cached by every layer are left out of both sides). Prefill only (``new_tokens`` must be
    0). Raises ``RecipeError`` for an unknown convention, or ``"paper"`` without ``shape.vocab``.

    ``scorers``: per layer, ``"attention"`` for an MoD layer that ranks by its own attention (its extra cost,
    ``scorer_flops``, is added to the MoD side; skipped when the layer keeps every vision token), else
    ``"router"`` / None (the router's ``Linear(hidden, 1)`` is not counted: ``2 * hidden`` FLOPs per token).
    """
    if convention not in CONVENTIONS:
        raise RecipeError(f"unknown cost convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    paper = convention == "paper"
    if paper and new_tokens:
        raise RecipeError("the paper convention counts the prefill only; use the exact convention for decode steps")
    if paper and shape.vocab < 1:
        raise RecipeError("the paper convention counts lm_head and needs the config's vocab_size")
    if len(ratios) != shape.num_layers:
        raise RecipeError(f"got {len(ratios)} layer ratios for a model with {shape.num_layers} decoder layers")
    for i, r in enumerate(ratios):
        if r is not None and not (isinstance(r, (int, float)) and 0.0 < float(r) <= 1.0):
            raise RecipeError(f"ratio of layer {i} must be None or in (0, 1], got {r!r}")
    if not isinstance(batch, int) or batch < 1:
        raise RecipeError(f"batch must be a positive integer, got {batch!r}")
    if not isinstance(new_tokens, int) or new_tokens < 0:
        raise RecipeError(f"new_tokens must be a non-negative integer, got {new_tokens!r}")
    if not bytes_per_element or bytes_per_element <= 0:
        raise RecipeError(f"bytes_per_element must be positive, got {bytes_per_element!r}")

    vis = _as_counts("n_vision", n_vision)
    txt = _as_counts("n_text", n_text)
    if len(vis) != len(txt):
        if len(vis) == 1:
            vis = vis * len(txt)
        elif len(txt) == 1:
            txt = txt * len(vis)
        else:
            raise RecipeError(f"n_vision has {len(vis)} samples but n_text has {len(txt)}")
    samples = len(vis)
    if isinstance(vision_flops, (int, float)):
        vflops = [float(vision_flops)] * samples
    else:
        vflops = [float(v) for v in vision_flops]
        if len(vflops) != samples:
            raise RecipeError(f"vision_flops has {len(vflops)} entries for {samples} samples")
    if any(v < 0 for v in vflops):
        raise RecipeError("vision_flops must be >= 0")
    if sum(vis) + sum(txt) == 0:
        raise RecipeError("there are no tokens to estimate (n_vision and n_text are all 0)")

    scorers = list(scorers) if scorers is not None else [None] * len(ratios)
    if len(scorers) != len(ratios):
        raise RecipeError(f"got {len(scorers)} scorers for {len(ratios)} layers")
    rows: list[LayerRow] = []
    for i, r in enumerate(ratios):
        row = LayerRow(i, None if r is None else float(r), 0, 0, 0, 0, 0, 0, 0)
        for nv, nt in zip(vis, txt):
            n_dense = nv + nt
            n_mod = n_dense if r is None else nt + kept_count(float(r), nv)
            row.dense_tokens += n_dense
            row.prefill_tokens += n_mod
            row.cached_tokens += n_mod
            if paper:  # linears only (no attention-score term)
                row.dense_flops += linear_flops(shape, n_dense)
                row.mod_flops += linear_flops(shape, n_mod)
            else:
                row.dense_flops += layer_cost(shape, n_dense, n_dense, causal=True)
                row.mod_flops += layer_cost(shape, n_mod, n_mod, causal=True)
            if r is not None and scorers[i] == "attention" and kept_count(float(r), nv) < nv:
                row.mod_flops += scorer_flops(shape, nv, nt, paper=paper)
            row.dense_decode_flops += _decode_flops(shape, n_dense, new_tokens)
            row.mod_decode_flops += _decode_flops(shape, n_mod, new_tokens)
        for name in ("prefill_tokens", "cached_tokens", "dense_tokens", "dense_flops", "mod_flops",
                     "dense_decode_flops", "mod_decode_flops"):
            setattr(row, name, getattr(row, name) * batch)
        cached_text = sum(txt) * batch if paper else 0
        row.dense_kv_bytes = kv_bytes(shape, row.dense_tokens - cached_text, bytes_per_element)
        row.mod_kv_bytes = kv_bytes(shape, row.cached_tokens - cached_text, bytes_per_element)
        rows.append(row)

    dense_dec = sum(r.dense_flops for r in rows)
    mod_dec = sum(r.mod_flops for r in rows)
    vision_total = sum(vflops) * batch
    dense_kv = sum(r.dense_kv_bytes for r in rows)
    mod_kv = sum(r.mod_kv_bytes for r in rows)
    generated = new_tokens * samples * batch
    extra_kv = shape.num_layers * kv_bytes(shape, generated, bytes_per_element)
    dense_decode = sum(r.dense_decode_flops for r in rows)
    mod_decode = sum(r.mod_decode_flops for r in rows)
    head = 2 * shape.hidden * shape.vocab * (sum(vis) + sum(txt)) * batch if paper else 0
    vision_total += head  # in both prefill totals (reported apart as head_flops; vision_flops is the tower's)
    return Estimate(
        layers=rows,
        samples=samples,
        batch=batch,
        n_vision=sum(vis) * batch,
        n_text=sum(txt) * batch,
        new_tokens=new_tokens,
        bytes_per_element=bytes_per_element,
        dense_decoder_flops=dense_dec,
        mod_decoder_flops=mod_dec,
        vision_flops=vision_total - head,
        dense_prefill_flops=dense_dec + vision_total,
        mod_prefill_flops=mod_dec + vision_total,
        flops_ratio=_ratio(mod_dec + vision_total, dense_dec + vision_total),
        decoder_flops_ratio=_ratio(mod_dec, dense_dec),
        dense_kv_bytes=dense_kv,
        mod_kv_bytes=mod_kv,
        kv_ratio=_ratio(mod_kv, dense_kv),
        dense_decode_flops=dense_decode,
        mod_decode_flops=mod_decode,
        decode_flops_ratio=_ratio(mod_decode, dense_decode) if new_tokens > 0 else None,
        dense_kv_bytes_final=dense_kv + extra_kv,
        mod_kv_bytes_final=mod_kv + extra_kv,
        num_mod_layers=sum(1 for r in ratios if r is not None),
        shape=asdict(shape),
        counted=COUNTED_PAPER if paper else COUNTED_WITH_VISION if vision_total > 0 else COUNTED_DECODER,
        convention=convention,
        head_flops=head,
    )


# --------------------------------------------------------------------------------------------------
# Vision tokens and vision tower of one typical image, per family
# --------------------------------------------------------------------------------------------------

def _unknown(model_type: str) -> RecipeError:
    from .adapters import supported_families

    return RecipeError(
        f"no default vision-token count for model_type {model_type!r}; pass --vision-tokens N "
        f"(known: {', '.join(supported_families())})"
    )


def _need(vision: _Section, key: str, family: str) -> int:
    value = vision.get(key)
    if value is None:
        raise RecipeError(f"the {family} vision config lacks {key}; pass --vision-tokens N")
    return int(value)


def _family(config: Any):
    """The adapter of ``config`` (object or config.json dict); an unknown family is a ``RecipeError``."""
    from .adapters import get_adapter
    from .errors import UnsupportedArchitecture

    try:
        return get_adapter(config)
    except UnsupportedArchitecture:
        raise _unknown(_model_type(config)) from None


def typical_image(config: Any) -> dict[str, Any]:
    """The assumptions behind ``default_vision_tokens`` and ``vision_tower_flops`` for one image.

    Returns a dict: ``model_type``, ``vision_tokens`` (placeholder positions in the LLM input that MoD
    routes), ``tiles`` (crops the vision tower encodes), ``patches_per_tile`` (tower sequence length
    per crop, CLS included), ``assumption`` (a sentence). The family's adapter answers
    (``ArchitectureAdapter.typical_image``). Unknown families raise ``RecipeError``.
    """
    info = dict(_family(config).typical_image(config))
    info["model_type"] = _model_type(config)
    return info


def default_vision_tokens(config: Any) -> int:
    """Vision-token count (MoD targets) of one typical image for ``config`` (object or config.json dict).

    Answered by the family's adapter (``typical_image``); for example:

    - ``llava`` (1.5): ``(image_size/patch_size)^2``, plus the CLS only under the ``full`` select
      strategy: 576 for CLIP 336/14 with ``default``.
    - ``llava_next``: any-res at the largest-area ``image_grid_pinpoints`` entry, image of that aspect
      ratio (no unpadding): base 576 + tiles x 576 + one newline token per feature row. For the default
      pinpoints (672x672, 2x2 tiles): 576 + 2304 + 48 = 2928 (the published ~2,880 = 5 x 576 leaves out
      the 48 newline tokens, which are image-token positions too).
    - ``llava_onevision``: same for SigLIP 384/14 (729 per tile, no CLS) at the largest pinpoint within
      ``anyres_max_N`` (larger grids are interpolated down to the same count): 729 + 81x81 + 81 = 7371.
    - ``qwen2_vl`` / ``qwen2_5_vl``: a 448x448 image: (448/14)^2 = 1024 patches / merge 2x2 = 256.
    - ``idefics3`` / ``smolvlm``: ``image_seq_len`` (config value, else (image_size/patch)^2 /
      scale_factor^2, else 169) x 5 crops (2x2 split + global view); 845 for Idefics3-8B (364/14, x2).

    Unknown families raise ``RecipeError`` naming ``--vision-tokens``.
    """
    return int(typical_image(config)["vision_tokens"])


def vision_tower_flops(config: Any, n_images: int = 1) -> int:
    """Rough vision-tower FLOPs for ``n_images`` typical images (the same image as ``default_vision_tokens``).

    Per crop (the family adapter's ``tower_crop_flops``; ViT default ``adapters.base.vit_flops``):
    ``layers * (2*p*(4*h^2 + 2*h*f) + 4*p*p*h)`` with ``p`` the patches per crop (CLS included for CLIP):
    q/k/v/o + MLP linears and full bidirectional attention; times the ``tiles`` crops per image (LLaVA-NeXT:
    base + 2x2 = 5; Idefics3: 5). Qwen2-VL reads ``embed_dim``, ``depth``, ``mlp_ratio``; Qwen2.5-VL has a
    gated MLP and windowed attention. Patch embedding, position embeddings, norms, the projector / merger /
    connector are excluded. Counts every tower layer even when the features come from an earlier one.
    """
    if not isinstance(n_images, int) or n_images < 0:
        raise RecipeError(f"n_images must be a non-negative integer, got {n_images!r}")
    info = typical_image(config)
    per_crop = _family(config).tower_crop_flops(config, int(info["patches_per_tile"]))
    return per_crop * int(info["tiles"]) * n_images


def vision_tower_flops_for_tokens(config: Any, image_tokens: Sequence[int]) -> int:
    """Rough vision-tower FLOPs of real images, from the vision tokens each image put into the LLM input.

    ``image_tokens``: one entry per image (e.g. per contiguous run of vision placeholders in a sample).
    Same counting conventions as ``vision_tower_flops``; the family adapter's ``tower_flops_for_tokens`` answers:
    dynamic-resolution families (Qwen2-VL / Qwen2.5-VL / Qwen3-VL / GLM-4V) count the tower for exactly the
    image's patches; fixed-crop families scale ``vision_tower_flops(config, 1)`` by ``n / default_vision_tokens``
    (exact for LLaVA-1.5, where every image has the typical count).
    """
    counts = list(image_tokens)
    for n in counts:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise RecipeError(f"image_tokens must be non-negative integers, got {n!r}")
    return int(_family(config).tower_flops_for_tokens(config, counts))


# --------------------------------------------------------------------------------------------------
# Human-readable table
# --------------------------------------------------------------------------------------------------


def _flops_str(x: float) -> str:
    for unit, scale in (("PFLOPs", 1e15), ("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("KFLOPs", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f} FLOPs"


def _bytes_str(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def _pct(num: float, den: float) -> str:
    return f"{100.0 * _ratio(num, den):.1f}%"


def format_estimate(est: Estimate) -> str:
    """A plain-text table: one row per decoder layer, then the totals with percentages of dense."""
    header = f"{'layer':>5}  {'ratio':>6}  {'tokens':>10}  {'dense tok':>10}  {'MoD GFLOPs':>12}  {'dense GFLOPs':>12}  {'FLOPs':>6}  {'KV':>6}"
    lines = [header, "-" * len(header)]
    for r in est.layers:
        ratio = "dense" if r.ratio is None else f"{r.ratio:.3f}"
        lines.append(
            f"{r.layer:>5}  {ratio:>6}  {r.prefill_tokens:>10}  {r.dense_tokens:>10}  "
            f"{r.mod_flops / 1e9:>12.2f}  {r.dense_flops / 1e9:>12.2f}  "
            f"{_pct(r.mod_flops, r.dense_flops):>6}  {_pct(r.mod_kv_bytes, r.dense_kv_bytes):>6}"
        )
    lines.append("-" * len(header))
    n_layers = len(est.layers)
    lines.append(
        f"workload: {est.samples} sample(s) x batch {est.batch}: {est.n_vision} vision + {est.n_text} text tokens; "
        f"{est.num_mod_layers}/{n_layers} MoD layers"
    )
    lines.append(
        f"prefill decoder FLOPs: MoD {_flops_str(est.mod_decoder_flops)} / dense {_flops_str(est.dense_decoder_flops)}"
        f" = {_pct(est.mod_decoder_flops, est.dense_decoder_flops)}"
    )
    if est.vision_flops:
        lines.append(f"vision tower (added to both): {_flops_str(est.vision_flops)}")
    if est.head_flops:
        lines.append(f"lm_head on every prompt position (added to both): {_flops_str(est.head_flops)}")
    if est.vision_flops or est.head_flops:
        lines.append(
            f"prefill total FLOPs: MoD {_flops_str(est.mod_prefill_flops)} / dense {_flops_str(est.dense_prefill_flops)}"
            f" = {_pct(est.mod_prefill_flops, est.dense_prefill_flops)}"
        )
    lines.append(
        f"KV cache after prefill{' (vision tokens only)' if est.convention == 'paper' else ''} "
        f"({est.bytes_per_element} B/elem): MoD {_bytes_str(est.mod_kv_bytes)} / dense "
        f"{_bytes_str(est.dense_kv_bytes)} = {_pct(est.mod_kv_bytes, est.dense_kv_bytes)}"
    )
    if est.new_tokens > 0:
        lines.append(
            f"decode {est.new_tokens} new tokens: MoD {_flops_str(est.mod_decode_flops)} / dense "
            f"{_flops_str(est.dense_decode_flops)} = {_pct(est.mod_decode_flops, est.dense_decode_flops)}"
        )
        lines.append(
            f"KV cache after decode: MoD {_bytes_str(est.mod_kv_bytes_final)} / dense "
            f"{_bytes_str(est.dense_kv_bytes_final)} = {_pct(est.mod_kv_bytes_final, est.dense_kv_bytes_final)}"
        )
    lines.append(f"convention: {est.convention}; counted: {est.counted}")
    return "\n".join(lines)
