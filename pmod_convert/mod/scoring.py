"""Training-free token selection for the pruning baselines (FastV, PyramidDrop) on the MoD engine.

The baselines rank vision tokens by the attention they receive from the last prompt token in a *scoring
layer*, then the MoD layers after it keep the best-ranked tokens (and store only those in the KV cache):

- FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2", ECCV): after layer ``K`` drop the
  ``R`` share of vision tokens that receive the least attention (averaged over heads) from the last token in
  layer ``K``; the same tokens stay dropped in every later layer. Paper default ``K = 2``, ``R = 50%``. In
  0-based indices: scoring layer ``K - 1``, MoD layers ``K .. L-1`` all with ratio ``1 - R``.
- PyramidDrop (Xing et al. 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
  Visual Redundancy Reduction"): the layers are split into stages (paper: 4 stages of 8 layers on the
  32-layer Vicuna-7B); at each stage boundary a fraction ``lambda`` (paper 0.5) of the vision tokens that
  are still present is kept, ranked by the attention of the last instruction token. Stage ``s`` keeps
  ``lambda ** s`` of the vision tokens; the ranking for stage ``s`` is computed in the last layer of stage
  ``s - 1``, where only the stage ``s - 1`` tokens are keys, so the kept sets are nested.

The score is computed inside the model's own attention call through transformers' ``AttentionInterface``:
the scoring layer's attention module gets a private config copy whose ``_attn_implementation`` names
:func:`scored_attention`, which runs the model's own sdpa/eager attention unchanged and, on a forward that
carries vision tokens, also computes ``softmax(q_last . K^T * scaling + mask_last)`` averaged over heads from
the post-RoPE query/key states it receives. Cost: one query row per scoring layer (negligible; not counted
in the FLOPs estimate).
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from ..errors import PmodError

METHODS = ("pmod", "fastv", "pdrop")
SCORED_ATTENTION = "pmod_scored"
FASTV_DEFAULT_K = 2  # Chen et al. 2024: prune after layer 2
FASTV_DEFAULT_RATIO = 0.5  # R = 50%
PDROP_DEFAULT_STAGES = 4  # Xing et al. 2024: 4 stages (layers 0-7, 8-15, 16-23, 24-31 of LLaVA-1.5-7B)
PDROP_DEFAULT_LAMBDA = 0.5


def fastv_ratios(num_layers: int, k: int, keep: float) -> list[float | None]:
    """Per-layer ratios of FastV: layers ``0..k-1`` dense (None), layers ``k..`` keep ``keep`` (= 1 - R).

    Raises ``PmodError`` unless ``1 <= k < num_layers`` and ``0 < keep <= 1``.
    """
    if not 1 <= k < num_layers:
        raise PmodError(f"FastV K must be in 1..{num_layers - 1} for a {num_layers}-layer model, got {k}")
    if not 0 < keep <= 1:
        raise PmodError(f"FastV keeps a share in (0, 1] of the vision tokens, got {keep!r}")
    return [None] * k + [float(keep)] * (num_layers - k)


def pdrop_boundaries(num_layers: int, stages: int) -> list[int]:
    """First layer of stages ``1..stages-1`` (evenly spaced, as the paper's 8/16/24 of 32 layers)."""
    if not 2 <= stages <= num_layers:
        raise PmodError(f"PyramidDrop needs 2..{num_layers} stages on a {num_layers}-layer model, got {stages}")
    return [round(s * num_layers / stages) for s in range(1, stages)]


def pdrop_ratios(num_layers: int, boundaries: list[int], lam: float) -> list[float | None]:
    """Per-layer ratios of PyramidDrop: stage 0 dense, stage ``s`` keeps ``lam ** s`` of the vision tokens."""
    if not 0 < lam <= 1:
        raise PmodError(f"PyramidDrop lambda must be in (0, 1], got {lam!r}")
    ratios: list[float | None] = []
    for layer in range(num_layers):
        stage = sum(layer >= b for b in boundaries)
        ratios.append(None if stage == 0 else float(lam ** stage))
    return ratios


def score_layers_for(ratios: list[float | None]) -> list[int]:
    """The scoring layers of a baseline schedule: the layer before the first pruned layer and before every
    later drop of the ratio (a new stage). Raises ``PmodError`` when layer 0 is pruned (nothing scores it)."""
    out: list[int] = []
    previous: float | None = None
    for layer, ratio in enumerate(ratios):
        if ratio is not None and (previous is None or ratio < previous - 1e-12):
            if layer == 0:
                raise PmodError("a baseline needs a dense layer before its first pruned layer (layer 0 is pruned)")
            out.append(layer - 1)
        previous = ratio
    return out


def _inner_attention(module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = module._pmod_inner_attention
    if name == "eager":
        # the model's own eager function, defined in its modeling module
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise PmodError(f"{type(module).__name__} has no eager_attention_forward to score with")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def last_query_attention(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                         scaling: float | None, query_index: torch.Tensor) -> torch.Tensor:
    """Attention probabilities ``[batch, keys]`` (float32, mean over heads) of one query per row.

    ``query`` ``[batch, heads, q, head_dim]`` and ``key`` ``[batch, kv_heads, keys, head_dim]`` are the
    post-RoPE states the attention function receives (kv heads are repeated for GQA); ``query_index``
    ``[batch]`` long: the query row of each batch row; ``attention_mask`` ``[batch or 1, 1 or heads, q, >=keys]``
    bool (True = attend) or additive float, or None (causal: the query sees every key up to its position).
    """
    batch = query.shape[0]
    rows = torch.arange(batch, device=query.device)
    query_index = query_index.to(query.device)
    q = query.float()[rows, :, query_index]  # [b, h, d]
    k = key.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    logits = torch.einsum("bhd,bhkd->bhk", q, k) * scale
    n_keys = k.shape[2]
    if attention_mask is not None:
        mask = attention_mask.expand(batch, *attention_mask.shape[1:])
        row = mask[rows, :, query_index, :n_keys]  # [b, 1 or h, keys]
        if row.dtype == torch.bool:
            logits = logits.masked_fill(~row, float("-inf"))
        else:
            logits = logits + row.float()
    else:
        past = n_keys - query.shape[2]
        causal = torch.arange(n_keys, device=k.device)[None, :] > (past + query_index)[:, None]
        logits = logits.masked_fill(causal[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(1)


def scored_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs):
    """An ``AttentionInterface`` function: the module's own attention, plus the last-query score.

    Registered under ``"pmod_scored"``; only scoring layers' attention modules use it. Returns what the
    inner attention returns (``(attn_output, attn_weights)``).
    """
    context = getattr(module, "_pmod_scoring_context", None)
    if context is not None:
        context.record_scores(module, query, key, attention_mask, kwargs.get("scaling"))
    return _inner_attention(module)(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    if SCORED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SCORED_ATTENTION, scored_attention)
    if SCORED_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:  # only used if someone builds masks from our config
        ALL_MASK_ATTENTION_FUNCTIONS.register(SCORED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def install_scoring(layer: nn.Module, context) -> None:
    """Make ``layer``'s attention record last-query scores into ``context`` (idempotent).

    The attention module gets its own shallow config copy with ``_attn_implementation = "pmod_scored"``;
    the model's config (and every other layer) is untouched. Raises ``PmodError`` for an attention
    implementation other than sdpa / eager.
    """
    _register()
    attn = layer.self_attn
    if getattr(attn, "_pmod_scoring_context", None) is None:
        inner = attn.config._attn_implementation or "eager"
        if inner not in ("sdpa", "eager"):
            raise PmodError(f"the pruning baselines score with sdpa or eager attention, not {inner!r}")
        attn._pmod_inner_attention = inner
        config = copy.copy(attn.config)
        config._attn_implementation_internal = SCORED_ATTENTION
        attn.config = config
    attn._pmod_scoring_context = context


def inner_attention_name(attn: nn.Module) -> str:
    """The attention implementation an attention module really runs (sdpa / eager / ...)."""
    return getattr(attn, "_pmod_inner_attention", None) or attn.config._attn_implementation or "eager"


def text_query_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, queries: torch.Tensor,
                         scaling: float | None) -> torch.Tensor:
    """Attention each key receives from the ``queries`` rows, mean over heads and those rows: ``[batch, keys]``.

    query ``[batch, heads, seq, dim]`` and key ``[batch, kv_heads, keys, dim]`` (post-RoPE, as an attention
    kernel receives them); mask: the kernel's 4-D mask (bool: True = attend, or additive float) or None
    (plain causal); queries: bool ``[batch, seq]``.
    """
    b, h, n, d = query.shape
    order, valid = query_rows(queries)
    rows = torch.gather(query, 2, order[:, None, :, None].expand(b, h, order.shape[1], d))
    return rows_attention(rows, order, valid, key, mask, scaling, n)


def query_rows(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query positions of each row, first, padded to the longest row: ``(order, valid)``, both
    ``[batch, width]`` (``order`` long positions; ``valid`` False for padding slots)."""
    width = max(int(queries.sum(1).max()), 1)
    order = torch.argsort((~queries).to(torch.int8), dim=1, stable=True)[:, :width]
    return order, torch.gather(queries, 1, order)


def rows_attention(rows: torch.Tensor, order: torch.Tensor, valid: torch.Tensor, key: torch.Tensor,
                   mask: torch.Tensor | None, scaling: float | None, seq: int) -> torch.Tensor:
    """Mean attention over heads and the valid query rows, ``[batch, keys]`` float32.

    ``rows`` ``[batch, heads, width, dim]``: post-RoPE queries at positions ``order`` ``[batch, width]`` of a
    forward of ``seq`` tokens (``valid`` marks real rows); ``key`` ``[batch, kv_heads, keys, dim]``; ``mask`` the
    kernel's 4-D mask over the ``seq`` query positions, or None (causal: a query sees every key up to its position;
    with a cache, the queries are the last ``seq`` of the keys).
    """
    b, h, width, d = rows.shape
    keys = key.shape[2]
    q = rows.float()
    k = key.float().repeat_interleave(h // key.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * (scaling if scaling is not None else d ** -0.5)  # [b, h, width, keys]
    if mask is None or mask.dim() != 4:
        position = order + (keys - seq)
        allowed = torch.arange(keys, device=q.device)[None, None, :] <= position[:, :, None]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    else:
        picked = torch.gather(mask.expand(b, mask.shape[1], seq, keys), 2,
                              order[:, None, :, None].expand(b, mask.shape[1], width, keys))
        scores = scores.masked_fill(~picked, float("-inf")) if picked.dtype == torch.bool else scores + picked.float()
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0) * valid[:, None, :, None]
    count = valid.sum(1).clamp_min(1).to(weights.dtype)
    return weights.sum(dim=(1, 2)) / (count[:, None] * h)


# ---- the MoD layer's own attention as a router (``scorer = "attention"``) -----------------------------------
SCORERS = ("router", "attention")


def attention_scorer_problem(layer: nn.Module, norm_name: str = "input_layernorm") -> str | None:
    """Why ``layer`` cannot rank its vision tokens by its own attention (None when it can).

    The scorer needs a pre-attention norm child ``norm_name``, ``self_attn`` with ``q_proj`` / ``k_proj``
    linears and an int ``head_dim`` (``scaling`` when present, else ``head_dim ** -0.5``), and a module-level
    ``apply_rotary_pos_emb(q, k, cos, sin)`` in the attention's modeling module (per-head ``q_norm`` / ``k_norm``
    or ``q_layernorm`` / ``k_layernorm`` are applied as the model does).
    """
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        return f"{type(layer).__name__} has no self_attn (not an attention layer)"
    if not isinstance(getattr(layer, norm_name, None), nn.Module):
        return f"{type(layer).__name__} has no {norm_name} before its attention"
    for name in ("q_proj", "k_proj"):
        if not isinstance(getattr(attn, name, None), nn.Module):
            return f"{type(attn).__name__} has no {name}"
    if not isinstance(getattr(attn, "head_dim", None), int):
        return f"{type(attn).__name__} has no head_dim"
    if getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None) is None:
        return f"{type(attn).__module__} has no apply_rotary_pos_emb"
    return None


def scorer_queries(targets: torch.Tensor, query_end: torch.Tensor | None, attention_mask: torch.Tensor | None,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[batch, seq]``: the text queries whose attention ranks the vision tokens.

    The prompt's text after the row's LAST vision token (text inside an image block, e.g. crop separators,
    or between two images would see only the earlier crops and bias the mean towards them), up to
    ``query_end`` ``[batch]`` long (the row's last prompt position, so answer tokens of a teacher-forced row
    never choose what the prompt keeps; None: the whole row), in the sample (``segments`` ``[batch, seq]``,
    see ``context.packed_segments``) that holds the vision tokens, and not padding (from the diagonal of a 4-D
    ``attention_mask``: a padded query attends nowhere).
    """
    batch, seq = targets.shape
    after_last = targets.long().flip(1).cumsum(1).flip(1) == 0  # no vision token at or after this position
    queries = after_last & (targets.long().cumsum(1) > 0)
    if segments is not None:
        last = seq - 1 - targets.flip(1).long().argmax(1)  # the row's last vision position
        queries = queries & (segments == segments.gather(1, last[:, None]))
    if query_end is not None:
        queries = queries & (torch.arange(seq, device=targets.device)[None, :] <= query_end.to(targets.device)[:, None])
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] >= seq \
            and attention_mask.shape[-2] == seq:
        offset = attention_mask.shape[-1] - seq
        diag = attention_mask[:, 0, :, offset:].diagonal(dim1=-2, dim2=-1).expand(batch, seq)
        allowed = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
        queries = queries & allowed
    return queries


@torch.no_grad()
def own_attention_scores(layer: nn.Module, hidden_states: torch.Tensor, targets: torch.Tensor,
                         attention_mask: torch.Tensor | None, position_embeddings, *,
                         query_end: torch.Tensor | None = None, norm_name: str = "input_layernorm",
                         rope: bool = True, segments: torch.Tensor | None = None) -> torch.Tensor:
    """The attention each token receives in ``layer`` from the prompt's text queries, ``[batch, seq]`` float32.

    Mean over heads and over the queries of :func:`scorer_queries` of ``softmax(q K^T * scaling)`` under the
    causal mask (or ``attention_mask``), with ``q`` / ``K`` computed exactly as the layer's attention computes
    them from ``hidden_states`` ``[batch, seq, hidden]`` (pre-attention norm, ``q_proj`` / ``k_proj`` with any
    LoRA adapters, per-head ``q_norm`` / ``k_norm``, the model's ``apply_rotary_pos_emb`` with
    ``position_embeddings`` ``(cos, sin)`` unless ``rope`` is False: a layer without rotary embeddings). This is
    the ranking the dense model's own text-to-vision attention gives in that layer (docs/baselines.md: near-dense
    accuracy where a ``Linear(hidden, 1)`` router cannot match it), computed before the layer runs, so a skipped
    token needs only its key. Returns ``[batch, seq]`` (every position; top-k reads the vision ones).

    Cost (counted by ``efficiency.scorer_flops``): ``k_proj`` for every token, ``q_proj`` for the queries and one
    score per (query, key) pair. The mask is the layer's own (a sliding-window layer's window) when the model
    passes one; without one (sdpa, no padding) plain causal attention is used. Raises ``PmodError`` when
    ``layer`` does not have the structure above, when a row with vision tokens has no query, or when a packed
    row (``segments``) holds vision tokens of several samples.
    """
    problem = attention_scorer_problem(layer, norm_name)
    if problem is not None:
        raise PmodError(f"the attention scorer cannot run here: {problem}")
    attn = layer.self_attn
    apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    queries = scorer_queries(targets, query_end, attention_mask, segments)
    if segments is not None:  # a left-padding run is its own segment; several samples with images are not allowed
        big = torch.iinfo(segments.dtype).max
        lo = torch.where(targets, segments, big).amin(1)
        hi = torch.where(targets, segments, -1).amax(1)
        if bool(((lo != hi) & targets.any(1)).any()):
            raise PmodError("the attention scorer ranks each sample's vision tokens by that sample's prompt; a row "
                            "packing several samples with images is not supported: pad the batch instead")
    orphan = targets.any(1) & ~queries.any(1)
    if bool(orphan.any()):
        raise PmodError(f"rows {orphan.nonzero().flatten().tolist()} have vision tokens but no prompt text after "
                        "them (or pmod_score_query points before the image), so the attention scorer has nothing "
                        "to rank by; put the question after the image, or use a checkpoint calibrated with "
                        "--scorer router")
    batch, seq, _ = hidden_states.shape
    d = attn.head_dim
    x = getattr(layer, norm_name)(hidden_states)
    key = attn.k_proj(x).view(batch, seq, -1, d)
    k_norm, q_norm = _head_norm(attn, "k"), _head_norm(attn, "q")
    if k_norm is not None:
        key = k_norm(key)
    key = key.transpose(1, 2)
    order, valid = query_rows(queries)
    width = order.shape[1]
    rows = torch.gather(x, 1, order[:, :, None].expand(batch, width, x.shape[-1]))
    query = attn.q_proj(rows).view(batch, width, -1, d)
    if q_norm is not None:
        query = q_norm(query)
    query = query.transpose(1, 2)
    if rope and position_embeddings is not None:
        cos, sin = position_embeddings
        pick = order.view(batch, width, *([1] * (cos.dim() - 2))).expand(batch, width, *cos.shape[2:])
        cos_q, sin_q = (torch.gather(t.expand(batch, *t.shape[1:]), 1, pick) for t in (cos, sin))
        query = apply_rope(query, query, cos_q, sin_q)[0]
        key = apply_rope(key, key, cos, sin)[1]
    return rows_attention(query, order, valid, key, attention_mask, getattr(attn, "scaling", None), seq)


def _head_norm(attn: nn.Module, which: str) -> nn.Module | None:
    """The per-head norm on queries / keys (``q_norm`` / ``k_norm``, LFM2's ``q_layernorm`` / ``k_layernorm``)."""
    for name in (f"{which}_norm", f"{which}_layernorm"):
        module = getattr(attn, name, None)
        if isinstance(module, nn.Module):
            return module
    return None
