"""What pmod-convert needs to know about one model family, and the registry that finds it.

A family is one subclass of :class:`ArchitectureAdapter` in one module of this package (AutoAWQ's one class per
architecture): class attributes are the family's tables (plain data), methods answer the questions whose answer
is a computation (vision tokens of an image, vision-tower FLOPs, bench image layouts, tiny test models). The rest
of the package asks the adapter and holds no ``model_type`` strings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import RecipeError, UnsupportedArchitecture

# peft target_modules regex: decoder-layer q/k/v/o + gate/up/down of the language model only.
# ``(?:.*\.)?`` after the layer index tolerates a wrapper module around the decoder layer.
LANG_PROJ = r"(?:.*\.)?(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"


def lora_regex(layers_path: str, proj: str = LANG_PROJ) -> str:
    """peft ``target_modules`` regex: the ``proj`` linears of every layer under ``layers_path`` only."""
    return r"(?:.*\.)?" + layers_path.replace(".", r"\.") + r"\.\d+\." + proj


class ArchitectureAdapter:
    """One multimodal family. Subclasses set the data attributes and override the methods that differ.

    Data (class attributes):

    family:             short name used in recipes, errors and the ``pmod`` config section.
    model_types:        ``config.model_type`` values this adapter handles.
    model_class:        name of the transformers ``*ForConditionalGeneration`` class.
    layers_path:        dotted path from the top model to the text decoder ``nn.ModuleList``; its first part is
                        the multimodal base model (``model``), absent when the model is the base class.
    text_config_attr:   attribute of the top config holding the text (decoder) config.
    vision_token_attrs: config attributes whose values are the vision placeholder token ids.
    never_quantize:     module-name parts that export / QLoRA leave unquantized.
    projector:          module path (name suffix) of the vision-language projector (``--train-projector``).
    mlp_branch:         child of the decoder layer whose output is the MLP branch added to the residual
                        (STRing scales it): ``mlp``, or the norm after it in sandwich-norm layers (Gemma 2/3).
    input_norm:         child of the decoder layer that normalises the attention's input (the attention scorer,
                        ``mod.scoring.own_attention_scores``, runs it).
    lora_per_layer:     linears per decoder layer that ``lora_target_regex`` matches (7; 4 in sparse-MoE layers,
                        whose experts are fused parameters, not linears).
    nested_images:      the processor takes one list of images per text (Idefics3 / SmolVLM).
    mm_token_types:     inputs carry ``mm_token_type_ids`` (0 text, 1 image, 2 video), needed by M-RoPE.
    placeholder_fallback: without a processor, the data loader expands each image placeholder itself
                        (``fallback_image_text``; tokenizer + image processor only).
    typical_image_px:   side of the typical image of dynamic-resolution families (``typical_image``).
    shapes:             named real-size shapes of this family (``pmod_convert.shapes``): name ->
                        (summary, tiny_config overrides, notes).

    Test scaffolding (``tiny_*`` attributes, ``tiny_config``, ``dummy_inputs``, ``tiny_processor``) builds tiny
    random-weight models from configs; only ``pmod_convert.tiny``, the demo and the tests use it.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[str] = ""
    layers_path: ClassVar[str] = "model.language_model.layers"
    text_config_attr: ClassVar[str] = "text_config"
    vision_token_attrs: ClassVar[tuple[str, ...]] = ("image_token_id",)
    never_quantize: ClassVar[tuple[str, ...]] = ("vision_tower", "multi_modal_projector", "lm_head", "pmod_router")
    projector: ClassVar[str] = "multi_modal_projector"
    mlp_branch: ClassVar[str] = "mlp"
    input_norm: ClassVar[str] = "input_layernorm"
    lora_per_layer: ClassVar[int] = 7
    lora_proj: ClassVar[str] = LANG_PROJ
    nested_images: ClassVar[bool] = False
    mm_token_types: ClassVar[bool] = False
    placeholder_fallback: ClassVar[bool] = False  # without a processor, expand placeholders itself (see below)
    typical_image_px: ClassVar[int] = 0
    shapes: ClassVar[Mapping[str, tuple[str, Mapping[str, Any], tuple[str, ...]]]] = {}

    # ---- test scaffolding data ------------------------------------------------------------------------
    tiny_token_names: ClassVar[Mapping[int, str]] = {}  # special id -> this family's token string
    tiny_named_tokens: ClassVar[Mapping[str, str]] = {"image_token": "<image>"}
    tiny_special_tokens: ClassVar[Mapping[str, Any]] = {}  # pad/bos/eos overrides
    tiny_chat_style: ClassVar[str] = "llava"
    tiny_image_text: ClassVar[str] = "<image>"
    tiny_video_text: ClassVar[str] = "<video>"
    tiny_rows: ClassVar[tuple[dict, ...]] = ()  # two single-row dummy_inputs kwargs differing in tokens
    tiny_generated_types: ClassVar[Mapping[str, int]] = {}  # per-token input -> value of a generated token
    tiny_varied: ClassVar[Mapping[str, Any]] = {}  # dummy_inputs kwargs giving a 2-row batch unequal vision tokens

    # ---- the model ------------------------------------------------------------------------------------
    @property
    def lora_target_regex(self) -> str:
        """peft regex matching the language model's linears only (a bare ``q_proj`` also hits the tower)."""
        return lora_regex(self.layers_path, self.lora_proj)

    def string_branch(self, config: Any) -> str:
        """The decoder layer's child whose output is the MLP branch STRing scales (``mlp_branch`` by default)."""
        return self.mlp_branch

    def attention_rope(self, layer: nn.Module) -> bool:
        """Whether ``layer``'s attention applies rotary embeddings to its queries and keys (the attention scorer
        does as the layer does); True unless a family has layers without (Cohere 2's global layers)."""
        return True

    def base_model(self, model: nn.Module) -> nn.Module:
        """The multimodal base model: ``model.model`` of the ``*ForConditionalGeneration`` class (peft wrappers
        allowed), or ``model`` itself when it is the base class (``LlavaModel``, ``Qwen2VLModel``, ...).

        Raises ``UnsupportedArchitecture`` (one line) when neither holds the decoder layers.
        """
        top: Any = unwrap(model)
        head, _, rest = self.layers_path.partition(".")
        child = getattr(top, head, None)
        if isinstance(child, nn.Module) and _resolve(child, rest) is not None:
            return child
        if _resolve(top, rest) is not None:  # the base class: no LM head, the layer path starts one level down
            return top
        raise UnsupportedArchitecture(
            f"{type(top).__name__} has no text decoder layers at {self.layers_path} (or {rest}); "
            f"load the model with transformers.{self.model_class}")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _resolve(self.base_model(model), self.layers_path.partition(".")[2])

    def text_config(self, config: Any) -> Any:
        return getattr(config, self.text_config_attr)

    def vision_token_ids(self, config: Any) -> list[int]:
        ids = []
        for attr in self.vision_token_attrs:
            value = getattr(config, attr, None)
            if value is not None:
                ids.append(int(value))
        return ids

    def pad_token_id(self, config: Any) -> int:
        text_pad = getattr(self.text_config(config), "pad_token_id", None)
        return int(text_pad if text_pad is not None else 0)

    def model_cls(self) -> type:
        import transformers

        return getattr(transformers, self.model_class)

    # ---- cost model (pmod_convert.efficiency asks these) ----------------------------------------------
    def typical_image(self, config: Any) -> dict[str, Any]:
        """One typical image of this family: ``vision_tokens`` (placeholder positions MoD routes), ``tiles``
        (crops the tower encodes), ``patches_per_tile`` (tower sequence per crop, CLS included) and an
        ``assumption`` sentence. ``config``: a config object or a config.json dict. Raises ``RecipeError``."""
        raise RecipeError(f"no default vision-token count for the {self.family} family; pass --vision-tokens N")

    def tower_crop_flops(self, config: Any, patches: int) -> int:
        """FLOPs of one crop of ``patches`` patches through the vision tower (ViT: q/k/v/o + 2-matrix MLP
        linears and full attention; ``vit_flops``). Reads ``hidden_size``, ``num_hidden_layers``,
        ``intermediate_size`` of the vision config; raises ``RecipeError`` when one is missing."""
        from ..efficiency import _need, _vision_section

        vision = _vision_section(config)
        return vit_flops(patches, _need(vision, "num_hidden_layers", self.family),
                         _need(vision, "hidden_size", self.family), _need(vision, "intermediate_size", self.family))

    def tower_flops_for_tokens(self, config: Any, counts: list[int]) -> int:
        """Vision-tower FLOPs of images that put ``counts`` vision tokens into the LLM input. Fixed-crop
        families: the tower cost of one typical image per typical image's worth of tokens (proportional)."""
        from ..efficiency import default_vision_tokens, vision_tower_flops

        per_token = vision_tower_flops(config, 1) / default_vision_tokens(config)
        return round(sum(n * per_token for n in counts))

    # ---- benchmark prompts (pmod_convert.bench asks this) ---------------------------------------------
    def vision_layout(self, config: Any, n: int) -> tuple[tuple[tuple[int, int], ...], int]:
        """Images of ONE row (``(height, width)`` px each) whose vision-token count is nearest to ``n`` > 0,
        and that count. Default: whole copies of the tiny dummy image (``image_tokens_of``)."""
        s = config.vision_config.image_size
        per = self.image_tokens_of(config, s, s)
        k = max(1, round(n / per))
        return ((s, s),) * k, k * per

    def image_tokens_of(self, config: Any, height: int, width: int) -> int:
        """Vision tokens one image of ``height`` x ``width`` px gives in a row of its own (tiny configs)."""
        raise NotImplementedError(f"{self.family}: image_tokens_of")

    # ---- data encoding quirks (pmod_convert.data asks these) ------------------------------------------
    def template_image_token(self, config: Any, tokenizer: Any) -> str:
        """The token string the chat template writes for one image (the processor expands it): the image
        placeholder's own string by default."""
        return tokenizer.convert_ids_to_tokens(int(config.image_token_id))

    def processor_without_video(self, checkpoint: str, tokenizer: Any, image_processor: Any) -> Any:
        """The family's processor built from its tokenizer and image processor when ``AutoProcessor`` fails for
        want of torchvision (video processors need it); None when the family has no such fallback."""
        return None

    def fallback_image_text(self, config: Any, pixels: Mapping[str, Any], image_processor: Any,
                            placeholder: str) -> list[str]:
        """Without a processor (``placeholder_fallback``): the text each image's ``placeholder`` (what the chat
        template writes per image) becomes, one entry per image, from the image processor's outputs ``pixels``, as
        the family's processor writes it. May pop entries of ``pixels`` the model does not take (InternVL's
        ``num_patches``)."""
        raise NotImplementedError(f"{self.family} has no processor-free placeholder expansion")

    # ---- test scaffolding ------------------------------------------------------------------------------
    def tiny_config(self, **overrides: Any) -> Any:
        """A small random-weight config of this family (override rules: ``adapters.scaffold.split_overrides``)."""
        raise NotImplementedError(f"{self.family}: tiny_config")

    def dummy_inputs(self, config: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Model inputs with real vision placeholders (signature: ``adapters/__init__.py``)."""
        raise NotImplementedError(f"{self.family}: dummy_inputs")

    def tiny_init(self, model: nn.Module) -> None:
        """Re-draw (seeded by the caller) weights that transformers initialises to zero where that would make a tiny
        random model ignore its images; nothing by default."""

    def tiny_processor(self, config: Any, tokenizer: Any, template: str) -> tuple[Any, Any, str | None]:
        """``(image_processor, processor or None, note)`` for a tiny checkpoint (PIL backends, no torchvision)."""
        raise NotImplementedError(f"{self.family}: tiny_processor")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.family}>"


def vit_flops(patches: int, layers: int, hidden: int, mlp: int, *, gated: bool = False,
              attn_ctx: list[int] | None = None) -> int:
    """One crop through a ViT: per layer ``2*p*(4h^2 + 2hf)`` linears (``3hf`` if gated) + ``4*p*ctx*h``
    attention (``ctx`` keys per query, ``p`` by default). Source: docs/method.md section 5 (cost model)."""
    lin = 2 * patches * (4 * hidden * hidden + (3 if gated else 2) * hidden * mlp) * layers
    ctxs = list(attn_ctx) if attn_ctx is not None else [patches] * layers
    return lin + sum(4 * patches * c * hidden for c in ctxs)


def square_factors(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b == n`` and ``a <= b`` as close as possible."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def nearest_layout(options: list[tuple[int, tuple[tuple[int, int], ...]]], n: int):
    """The (sizes, tokens) option closest to ``n`` tokens; ties go to fewer images, then squarer ones."""
    def key(option):
        tokens, sizes = option
        return abs(tokens - n), len(sizes), sum(abs(h - w) for h, w in sizes)

    tokens, sizes = min(options, key=key)
    return tuple(sizes), tokens


def size_table(step: int, top: int, count: Callable[[int, int], int]) -> dict[int, tuple[int, int]]:
    """Vision tokens of one image -> the squarest (height, width) giving it, over sizes ``step..top`` px."""
    table: dict[int, tuple[int, int]] = {}
    for h in range(step, top + 1, step):
        for w in range(step, top + 1, step):
            tokens = count(h, w)
            best = table.get(tokens)
            if best is None or abs(h - w) < abs(best[0] - best[1]):
                table[tokens] = (h, w)
    return table


def _resolve(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


_REGISTRY: dict[str, ArchitectureAdapter] = {}
_REFUSED: dict[str, str] = {}  # model_type -> why it cannot be routed


def register(adapter: ArchitectureAdapter | type) -> ArchitectureAdapter:
    """Register an adapter (instance or class) for its ``model_types``; returns the instance."""
    if isinstance(adapter, type):
        adapter = adapter()
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def refuse(model_type: str, reason: str) -> None:
    """Record a family that cannot be routed: ``get_adapter`` raises ``UnsupportedArchitecture(reason)``."""
    _REFUSED[model_type] = reason


def refused_families() -> dict[str, str]:
    """``model_type`` -> one-line reason, for the families refused on purpose."""
    return dict(_REFUSED)


def supported_families() -> list[str]:
    return sorted({a.family for a in _REGISTRY.values()})


def all_adapters() -> list[ArchitectureAdapter]:
    seen: dict[str, ArchitectureAdapter] = {}
    for a in _REGISTRY.values():
        seen.setdefault(a.family, a)
    return [seen[f] for f in sorted(seen)]


def adapter_by_family(family: str) -> ArchitectureAdapter:
    for a in _REGISTRY.values():
        if a.family == family:
            return a
    if family in _REFUSED:
        raise UnsupportedArchitecture(_REFUSED[family])
    raise UnsupportedArchitecture(
        f"unknown model family {family!r}; supported families: {', '.join(supported_families())}"
    )


def get_adapter(model_or_config: Any) -> ArchitectureAdapter:
    """The adapter for a model, a config object, or a config dict (keyed by ``model_type``).

    Raises ``UnsupportedArchitecture`` (one line): an unknown ``model_type`` (naming the supported families) or a
    family refused on purpose (saying why).
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        if model_type in _REFUSED:
            raise UnsupportedArchitecture(_REFUSED[model_type])
        name = type(model_or_config).__name__ if hasattr(model_or_config, "config") else f"model_type={model_type!r}"
        raise UnsupportedArchitecture(
            f"{name} is not a supported multimodal model; supported families: {', '.join(supported_families())}"
        )
    return adapter
