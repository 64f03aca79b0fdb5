"""Which tokens of the current forward call are routing targets (vision tokens), and the routing switch."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn


# Forward kwargs that carry image/video features (raw pixels or pre-computed encoder outputs). Placeholder ids
# are routing targets only in a forward that carries one of these: a generated token that merely equals a
# vision id (a decode step) has no features behind it and is text.
VISION_INPUT_KEYS = ("pixel_values", "pixel_values_videos", "pixel_values_images", "mm_encoder_outputs",
                     "image_hidden_states", "image_embeds", "video_embeds")
VISION_MASK_KWARG = "pmod_vision_mask"
SCORE_QUERY_KWARG = "pmod_score_query"  # last prompt position (int or [batch]) whose attention ranks tokens


def _has_value(value) -> bool:
    if isinstance(value, dict):
        return any(_has_value(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return len(value) > 0
    return value is not None


def carries_vision(kwargs: dict) -> bool:
    """Whether a forward's kwargs carry image/video features (see ``VISION_INPUT_KEYS``)."""
    return any(_has_value(kwargs.get(key)) for key in VISION_INPUT_KEYS)


def packed_segments(position_ids) -> torch.Tensor | None:
    """Sample index ``[batch, seq]`` of each token of padding-free packed rows, or None if no row is packed.

    ``position_ids``: ``[batch, seq]`` or multimodal-rotary ``[k, batch, seq]`` (the first plane is used). A new
    sample starts wherever the position decreases (a left-padding run before a sample counts as its own
    segment: it holds no vision token, so budgets are unchanged).
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() not in (2, 3) or position_ids.shape[-1] < 2:
        return None
    pos = position_ids[0] if position_ids.dim() == 3 else position_ids
    restart = pos[:, 1:] < pos[:, :-1]
    if not bool(restart.any()):
        return None
    return torch.cat([torch.zeros_like(restart[:, :1]), restart], 1).long().cumsum(1)


class RoutingContext:
    """Filled by a forward pre-hook on the multimodal base model (``model.model``) at every call.

    The hook is a bound method of this object, not a closure: ``copy.deepcopy`` of the model then
    copies the context together with the layers that read it, so a copy never routes with the
    original's mask. MoD layers call ``route_call(layer_idx, hidden_states)``.

    Targets (``is_target``, ``[batch, seq]`` bool) of one call are, in this order:

    * ``pmod_vision_mask`` (a forward/generate kwarg, popped here): True at vision positions, ``[batch, L]``
      over logical positions ``0..L-1`` (with a cache, the call's tokens are positions ``past..past+seq-1``;
      positions past ``L``, e.g. generated tokens, are text). Needed for ``inputs_embeds`` holding merged
      image features;
    * ``input_ids`` in the vision ids, if the call carries image/video features (``VISION_INPUT_KEYS``),
      else none (a decode step that generated a vision id routes nothing);
    * ``inputs_embeds`` only, with features to merge: positions holding a placeholder's embedding.
    ``inputs_embeds`` without ids, features or ``pmod_vision_mask`` raise :class:`~pmod_convert.errors.PmodError`
    (merged image features cannot be told from text).

    The guard: a forward-hook on the same module checks, after each call that has vision targets, that
    every MoD layer routed in it (``route_call``); a layer that ran some other forward (an accelerate hook
    keeping the dense ``forward``, a wrapper) raises ``PmodError`` instead of a quiet dense result.

    ``disabled`` (a nesting depth, see :func:`routing_disabled`): while positive, MoD layers run the
    dense computation, the guard is off, and the hook leaves the targets of the last routed call untouched.

    ``method`` (``"pmod"`` | ``"fastv"`` | ``"pdrop"``): with a baseline method, MoD layers rank targets by
    ``scores`` (``[batch, seq]`` float32, -inf where a token was no key of the scoring layer), written by the
    scoring layers' attention (:mod:`pmod_convert.mod.scoring`) during the same forward, instead of their
    router. ``pmod_score_query`` (forward/generate kwarg, popped here; default -1, the call's last token): the
    position of the query whose attention ranks the tokens; pin it to the last prompt position to make a
    cache-free recomputation (``generate(use_cache=False)``) select what the cached prefill selected.
    """

    def __init__(self, target_token_ids: list[int]):
        self.target_token_ids = [int(i) for i in target_token_ids]
        self._is_target: torch.Tensor | None = None
        self._any_target: bool | None = None  # bool(is_target.any()), computed once per mask
        self.segments: torch.Tensor | None = None  # [batch, seq] sample index of packed rows, else None
        self.disabled = 0
        self.layer_ids: set[int] = set()  # decoder layer indices of the MoD layers reading this context
        self._embedding: nn.Module | None = None
        self._in_call = False
        self._vision_in_call = 0
        self._routed: set[int] = set()
        self.method = "pmod"
        self.score_layers: set[int] = set()
        self.scores: torch.Tensor | None = None
        self.score_query = -1
        self.key_index: torch.Tensor | None = None  # [batch, keys] positions of a gathered scoring layer's keys
        self.key_valid: torch.Tensor | None = None  # [batch, keys] False for padding entries of key_index

    @property
    def is_target(self) -> torch.Tensor | None:
        """``[batch, seq]`` bool targets of the current call (None: route nothing)."""
        return self._is_target

    @is_target.setter
    def is_target(self, mask: torch.Tensor | None) -> None:
        self._is_target, self._any_target = mask, None

    def any_target(self) -> bool:
        """Whether the current mask has a target at all (one host sync per forward, not one per layer)."""
        if self._is_target is None:
            return False
        if self._any_target is None:
            self._any_target = bool(self._is_target.any())
        return self._any_target

    def attach(self, base_model: nn.Module) -> tuple[torch.utils.hooks.RemovableHandle, ...]:
        """Register the capture pre-hook and the guard forward-hook on ``base_model``; returns both handles."""
        self._embedding = base_model.get_input_embeddings() if hasattr(base_model, "get_input_embeddings") else None
        return (base_model.register_forward_pre_hook(self.capture, with_kwargs=True),
                base_model.register_forward_hook(self.check))

    def register(self, layer_idx: int) -> None:
        self.layer_ids.add(int(layer_idx))

    # ---- per call (run eagerly under torch.compile: they read and write Python state) ------------------
    @torch.compiler.disable
    def capture(self, module: nn.Module, args: tuple, kwargs: dict):
        explicit = kwargs.pop(VISION_MASK_KWARG, None)
        score_query = kwargs.pop(SCORE_QUERY_KWARG, None)
        if self.disabled:
            return args, kwargs
        self.score_query = _score_query(score_query)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and getattr(cache, "layers", None) is not None:
            # Swap in every MoD cache layer here, eagerly, rather than in each layer's (compiled) forward: the
            # swap reads per-layer Python state that torch.compile would guard on and recompile for, per layer.
            from .cache import mod_cache_layer

            for idx in sorted(self.layer_ids):
                mod_cache_layer(cache, idx)
        self.scores, self.key_index = None, None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        self.segments = packed_segments(kwargs.get("position_ids"))
        if explicit is not None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            self.is_target = self._explicit_targets(explicit, reference, cache)
        elif input_ids is not None:
            if carries_vision(kwargs):
                ids = torch.tensor(self.target_token_ids, device=input_ids.device, dtype=input_ids.dtype)
                self.is_target = torch.isin(input_ids, ids)
            else:
                self.is_target = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        elif embeds is not None:
            if not carries_vision(kwargs) or self._embedding is None:
                from ..errors import PmodError

                raise PmodError(
                    "an MoD model got inputs_embeds without input_ids or image inputs and cannot tell merged vision "
                    f"features from text; pass {VISION_MASK_KWARG}=<bool [batch, seq], True at vision tokens> "
                    "(all False for text only) or input_ids")
            # Features still to be merged: a placeholder is recognised by its embedding (what the processor inserted).
            ids = torch.tensor(self.target_token_ids, device=embeds.device)
            placeholder = self._embedding(ids).to(device=embeds.device, dtype=embeds.dtype)  # [n_ids, hidden]
            self.is_target = (embeds.unsqueeze(-2) == placeholder).all(-1).any(-1)
        else:
            self.is_target = None
        self._vision_in_call = int(self.is_target.sum()) if self.is_target is not None else 0
        self._any_target = self._vision_in_call > 0
        self._routed = set()
        self._in_call = True
        return args, kwargs

    def _explicit_targets(self, mask, reference, cache) -> torch.Tensor:
        from ..errors import PmodError

        if reference is None:
            raise PmodError(f"{VISION_MASK_KWARG} was given without input_ids or inputs_embeds")
        batch, seq = reference.shape[:2]
        mask = torch.as_tensor(mask, device=reference.device).bool()
        if mask.dim() != 2 or mask.shape[0] != batch:
            raise PmodError(f"{VISION_MASK_KWARG} must be a bool tensor [batch={batch}, seq], got {tuple(mask.shape)}")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past == 0 and mask.shape[1] != seq:
            raise PmodError(f"{VISION_MASK_KWARG} covers {mask.shape[1]} positions but the input has {seq} tokens")
        window = mask[:, past:past + seq]  # positions beyond the mask (generated tokens) are text
        if window.shape[1] < seq:
            window = torch.cat([window, window.new_zeros(batch, seq - window.shape[1])], 1)
        return window

    @torch.compiler.disable
    def check(self, module: nn.Module, args: tuple, output) -> None:
        """Forward hook: every MoD layer must have routed a call that had vision targets."""
        in_call, self._in_call = self._in_call, False
        if self.disabled or not in_call or not self._vision_in_call:
            return
        missing = sorted(self.layer_ids - self._routed)
        if missing:
            from ..errors import PmodError

            raise PmodError(
                f"MoD layers {missing} did not route a forward with {self._vision_in_call} vision tokens: they ran "
                "another forward (e.g. an accelerate hook or wrapper keeping the dense forward). Load with "
                "pmod_convert.load_pretrained, or use pmod_convert.mod.context.routing_disabled(model) to run dense")

    def route_call(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """What an MoD layer routes: ``targets_for(hidden_states)``, and records that the layer routed.

        Plain Python over flags set once per forward by ``capture`` (no host sync, no tensor op when the call
        has no target), so torch.compile traces it without a graph break.
        """
        if self._in_call:
            self._routed.add(layer_idx)
        return self.targets_for(hidden_states)

    def targets_for(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The target mask ``[batch, seq]`` for these hidden states, or None (route nothing).

        Raises ``PmodError`` when the call has vision targets recorded for another shape (routing would
        silently be off).
        """
        if self.disabled:
            return None
        mask = self.is_target
        if mask is None:
            return None
        if not self.any_target():  # a decode step / text-only call: nothing to route in any layer
            return None
        if mask.shape != hidden_states.shape[:2]:
            if self._in_call and self._vision_in_call:
                from ..errors import PmodError

                raise PmodError(f"MoD layer got hidden states {tuple(hidden_states.shape[:2])} but the forward's "
                                f"vision mask is {tuple(mask.shape)}; cannot route")
            return None
        return mask.to(hidden_states.device)

    def record_scores(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None) -> None:
        """Called by a scoring layer's attention: store the last-query attention over this call's tokens.

        Does nothing for a call without vision targets (decode steps), with routing disabled, or with the
        ``pmod`` method. ``scores[b, t]`` is the head-averaged probability that the query puts on token ``t``;
        tokens that were no key (skipped by an earlier stage) get -inf. Raises ``PmodError`` when the keys
        include cached tokens (a prompt must be scored in one forward).
        """
        from ..errors import PmodError
        from .scoring import last_query_attention

        if self.disabled or self.method == "pmod" or not self._in_call or not self._vision_in_call:
            return
        if self.is_target is None:
            return
        batch, seq = self.is_target.shape
        device = query.device
        end = self.query_end(self.is_target)
        position = (torch.full((batch,), seq - 1, dtype=torch.long) if end is None else end).to(device)
        if self.key_index is not None:
            index, valid = self.key_index.to(device), self.key_valid.to(device)
            hit = (index == position[:, None]) & valid
            if not bool(hit.any(1).all()) or key.shape[2] != index.shape[1]:
                raise PmodError(f"scoring layer {module.layer_idx}: the query token (position {position.tolist()}) is not among "
                                "its kept tokens, or the keys include cached tokens (baselines score a whole prompt "
                                "in one forward)")
            query_rows = hit.float().argmax(1)
        else:
            if key.shape[2] != seq:
                raise PmodError(f"scoring layer {module.layer_idx} saw {key.shape[2]} keys for {seq} tokens: "
                                "baselines score a whole prompt in one forward (no chunked prefill)")
            query_rows = position
        with torch.no_grad():
            probs = last_query_attention(query, key, attention_mask, scaling, query_rows)  # [b, keys]
        if self.key_index is not None:
            # padding entries write into an extra column that is sliced off
            scores = torch.full((batch, seq + 1), float("-inf"), dtype=torch.float32, device=device)
            scores.scatter_(1, torch.where(valid, index, torch.full_like(index, seq)), probs)
            scores = scores[:, :seq]
        else:
            scores = probs
        self.scores = scores

    def query_end(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Last prompt position per row ``[batch]`` long from ``pmod_score_query`` (None: not given, every text
        position after the image is a query of the attention scorer)."""
        query, (batch, seq) = self.score_query, hidden_states.shape[:2]
        if isinstance(query, int):
            if query == -1:
                return None
            query = torch.full((batch,), query, dtype=torch.long)
        query = query.to(hidden_states.device).long().reshape(-1)
        if query.numel() == 1:
            query = query.expand(batch)
        from ..errors import PmodError

        if query.shape[0] != batch:
            raise PmodError(f"{SCORE_QUERY_KWARG} has {query.shape[0]} entries for a batch of {batch} rows")
        query = torch.where(query < 0, query + seq, query)
        if bool(((query < 0) | (query >= seq)).any()):
            raise PmodError(f"{SCORE_QUERY_KWARG} points outside the {seq} tokens of this forward")
        return query

    def selection_scores(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Scores ``[batch, seq]`` a baseline MoD layer ranks its targets by (raises if none was recorded)."""
        from ..errors import PmodError

        if self.scores is None or self.scores.shape != hidden_states.shape[:2]:
            raise PmodError(f"{self.method} layer {layer_idx} has no attention scores for this forward: a scoring "
                            f"layer ({sorted(self.score_layers)}) must run before it on the same tokens")
        return self.scores.to(hidden_states.device)

    def segments_for(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Sample index ``[batch, seq]`` of packed rows (per-sample budgets), or None."""
        seg = self.segments
        if self.disabled or seg is None or seg.shape != hidden_states.shape[:2]:
            return None
        return seg.to(hidden_states.device)


def _score_query(value) -> int | torch.Tensor:
    """``pmod_score_query`` as given: -1 (absent), an int position, or a long tensor ``[batch]`` per row."""
    if value is None:
        return -1
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
        return value.long().reshape(-1) if value.numel() > 1 else int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    from ..errors import PmodError

    raise PmodError(f"{SCORE_QUERY_KWARG} must be an int position or an integer tensor [batch] of positions, got "
                    f"{type(value).__name__} {str(value)[:40]}")


def score_query_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Last prompt position per row ``[batch]`` long of teacher-forced rows: the position before the first
    supervised label of ``labels`` ``[batch, seq]`` (HF alignment: ``labels[t]`` is the token at ``t``), or -1 (the
    row's last token) for a row without one. Pass it as ``pmod_score_query`` so the answer tokens of a training
    row never rank the vision tokens its prompt keeps."""
    supervised = labels != ignore_index
    first = torch.where(supervised.any(1), supervised.float().argmax(1), torch.zeros_like(supervised[:, 0],
                                                                                           dtype=torch.long))
    return torch.where(supervised.any(1), first - 1, torch.full_like(first, -1)).clamp_min(-1)


def _validate_model_kwargs(self, model_kwargs: dict) -> None:
    # generate() checks its kwargs against forward's signature (on a copy): let pmod_vision_mask through.
    model_kwargs.pop(VISION_MASK_KWARG, None)
    model_kwargs.pop(SCORE_QUERY_KWARG, None)
    return type(self)._validate_model_kwargs(self, model_kwargs)


def accept_vision_mask(model: nn.Module) -> None:
    """Let ``model.generate`` take ``pmod_vision_mask`` (it reaches the routing hook with every step's kwargs)."""
    if hasattr(type(model), "_validate_model_kwargs") and "_validate_model_kwargs" not in model.__dict__:
        model._validate_model_kwargs = types.MethodType(_validate_model_kwargs, model)


def routing_contexts(model: nn.Module) -> list[RoutingContext]:
    """Every distinct :class:`RoutingContext` read by the MoD layers inside ``model``.

    ``model`` may be wrapped (peft ``PeftModel``, DDP, ``torch.compile``'s ``OptimizedModule``, an
    accelerate-prepared model): the MoD layers are found among its submodules.
    """
    found: dict[int, RoutingContext] = {}
    for module in model.modules():
        context = module.__dict__.get("_pmod_context")
        if isinstance(context, RoutingContext):
            found.setdefault(id(context), context)
    return list(found.values())


@contextlib.contextmanager
def routing_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run an MoD model as its dense self: ``with routing_disabled(model): teacher = model(**batch)``.

    Inside the block every MoD layer runs exactly the dense decoder layer (every token is processed,
    no router weighting, the router is not even called), so the logits equal those of the model the
    routers were added to (e.g. a distillation teacher sharing weights with the student). The routing
    state of the last routed forward is left untouched, so a gradient-checkpointed student forward
    made before the block still recomputes its own routing in ``backward`` after it. Nests; works on
    wrapped models (peft, DDP, ``torch.compile``). The "MoD layer did not route" guard never fires
    inside the block. Yields ``model``. Raises ``ValueError`` if ``model`` has no MoD layers.
    """
    contexts = routing_contexts(model)
    if not contexts:
        raise ValueError(f"{type(model).__name__} has no MoD layers (pmod_convert.add_routers / load_pretrained)")
    for context in contexts:
        context.disabled += 1
    try:
        yield model
    finally:
        for context in contexts:
            context.disabled -= 1
