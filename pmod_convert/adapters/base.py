"""What pmod-convert needs to know about one model family, and the registry that finds it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedArchitecture


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Plain data about one multimodal family (like AutoAWQ's per-model classes, but declarative).

    family:            short name used in recipes, errors and the ``pmod`` config section.
    model_types:       ``config.model_type`` values this adapter handles.
    model_class:       name of the transformers ``*ForConditionalGeneration`` class.
    layers_path:       dotted path from the top model to the text decoder ``nn.ModuleList``; its first part is
                       the multimodal base model (``model``), absent when the model is the base class.
    text_config_attr:  attribute of the top config holding the text (decoder) config.
    vision_token_attrs: config attributes whose values are the vision placeholder token ids.
    lora_target_regex: peft ``target_modules`` regex matching the language model's linears only.
    never_quantize:    module-name substrings that export must leave unquantized.
    projector:         module path (name suffix) of the vision-language projector (``--train-projector``).
    tiny_config:       builds a small random-weight config of this family for tests and demos.
    dummy_inputs:      builds model inputs (input_ids with vision placeholders, pixel inputs,
                       attention_mask) for a config; see ``adapters/__init__.py`` for the signature.
    """

    family: str
    model_types: tuple[str, ...]
    model_class: str
    layers_path: str
    text_config_attr: str = "text_config"
    vision_token_attrs: tuple[str, ...] = ("image_token_id",)
    lora_target_regex: str = ""
    never_quantize: tuple[str, ...] = ()
    projector: str = ""
    tiny_config: Callable[..., Any] | None = field(default=None, compare=False)
    dummy_inputs: Callable[..., dict[str, torch.Tensor]] | None = field(default=None, compare=False)

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


def register(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


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
    raise UnsupportedArchitecture(
        f"unknown model family {family!r}; supported families: {', '.join(supported_families())}"
    )


def get_adapter(model_or_config: Any) -> ArchitectureAdapter:
    """The adapter for a model, a config object, or a config dict (keyed by ``model_type``)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        name = type(model_or_config).__name__ if hasattr(model_or_config, "config") else f"model_type={model_type!r}"
        raise UnsupportedArchitecture(
            f"{name} is not a supported multimodal model; supported families: {', '.join(supported_families())}"
        )
    return adapter
