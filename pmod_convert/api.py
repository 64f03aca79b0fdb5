"""The Python API behind the CLI: plain functions over transformers models and checkpoint folders."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .adapters import ArchitectureAdapter, get_adapter
from .checkpoint import (
    atomic_folder,
    check_replaceable,
    copy_processor_files,
    read_config,
    read_router_tensors,
    require_safetensors,
)
from .errors import CheckpointError, PmodError, RecipeError
from .mod.context import RoutingContext, accept_vision_mask
from .mod.inject import check_attention, convert_layer
from .mod.layer import MoDLayerMixin
from .mod.router import ROUTER_NAME, layer_scorers, position_priors, set_layer_scorers, set_position_priors
from .mod.scoring import METHODS, install_scoring, score_layers_for
from .recipe import Recipe, RouterSettings, ScheduleSettings
from .sidecar import has_sidecar, load_router_state, load_sidecar

log = logging.getLogger("pmod_convert")
PMOD_FORMAT = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LayerInfo:
    index: int
    ratio: float | None  # None: dense layer
    tanh_alpha: float | None = None
    tanh_beta: float | None = None


def add_routers(model: nn.Module, recipe: Recipe | None = None) -> nn.Module:
    """Convert ``model`` in place into an MoD model following ``recipe`` (default: published p-MoD settings)."""
    recipe = (recipe or Recipe()).validate()
    adapter = get_adapter(model)
    num_layers = len(adapter.decoder_layers(model))
    ratios = recipe.schedule.layer_ratios(num_layers)
    _apply(model, adapter, ratios, recipe.router)
    model.config.pmod = _pmod_section(adapter, model, ratios, recipe)
    return model


def _routing_root(model: nn.Module, adapter: ArchitectureAdapter) -> nn.Module:
    # The multimodal base model (``model.model``, or the model itself for a base class such as LlavaModel)
    # receives input_ids via __call__ even under peft, whose tuner calls the top model's ``forward`` directly
    # (hooks on the top model would not fire).
    return adapter.base_model(model)


def _apply(model: nn.Module, adapter: ArchitectureAdapter, ratios: list[float | None], router: RouterSettings,
           method: str = "pmod") -> None:
    check_attention(adapter.text_config(model.config))
    if method not in METHODS:
        raise CheckpointError(f"unknown pmod method {method!r}; this pmod-convert knows {', '.join(METHODS)}")
    layers = adapter.decoder_layers(model)
    if len(ratios) != len(layers):
        raise RecipeError(f"schedule has {len(ratios)} layer ratios but the model has {len(layers)} decoder layers")
    context: RoutingContext | None = getattr(model, "_pmod_context", None)
    if context is None:
        context = RoutingContext(adapter.vision_token_ids(model.config))
        model._pmod_context = context
        model._pmod_hook = context.attach(_routing_root(model, adapter))
        accept_vision_mask(model)  # generate(..., pmod_vision_mask=...)
    hidden = adapter.text_config(model.config).hidden_size
    for index, (layer, ratio) in enumerate(zip(layers, ratios)):
        if ratio is None:
            if isinstance(layer, MoDLayerMixin):
                raise RecipeError(f"layer {index} is already an MoD layer; a schedule cannot make it dense again")
            continue
        convert_layer(layer, ratio, context, hidden_size=hidden, alpha=router.tanh_alpha,
                      beta=router.tanh_beta, bias=router.bias, mlp_branch=adapter.string_branch(model.config))
    context.method = method
    if method != "pmod":
        context.score_layers = set(score_layers_for(ratios))
        for index in sorted(context.score_layers):
            install_scoring(layers[index], context)


def _pmod_section(adapter: ArchitectureAdapter, model: nn.Module, ratios: list[float | None], recipe: Recipe) -> dict:
    return {
        "format": PMOD_FORMAT,
        "version": __version__,
        "family": adapter.family,
        "target_token_ids": adapter.vision_token_ids(model.config),
        "layer_ratios": ratios,
        "mod_layers": [i for i, r in enumerate(ratios) if r is not None],
        "schedule": recipe.schedule.__dict__.copy(),
        "router": recipe.router.__dict__.copy(),
    }


def add_pruning(model: nn.Module, method: str, ratios: list[float | None]) -> nn.Module:
    """Convert ``model`` in place into a training-free pruning baseline on the MoD engine.

    ``method``: ``"fastv"`` or ``"pdrop"`` (see :mod:`pmod_convert.mod.scoring` for the papers' settings);
    ``ratios``: one entry per decoder layer (None = dense; e.g. ``scoring.fastv_ratios`` /
    ``scoring.pdrop_ratios``), non-increasing from the first pruned layer on. The pruned layers carry a zero
    router (unused: they rank vision tokens by the scoring layer's attention) so checkpoints, ``export`` and
    ``bench`` treat them like MoD layers; ``config.pmod["method"]`` records the method and
    ``config.pmod["score_layers"]`` the scoring layers. Returns ``model``.

    Raises:
        RecipeError: ``method`` is not a baseline, or ``ratios`` do not fit the model / have no dense layer
            before the first pruned one.
    """
    if method not in ("fastv", "pdrop"):
        raise RecipeError(f"add_pruning builds the fastv / pdrop baselines, not {method!r} (use add_routers)")
    try:
        score_layers = score_layers_for(list(ratios))
    except PmodError as exc:
        raise RecipeError(str(exc)) from None
    recipe = Recipe(schedule=ScheduleSettings(kind="explicit", ratios=list(ratios))).validate()
    adapter = get_adapter(model)
    layer_count = len(adapter.decoder_layers(model))
    _apply(model, adapter, recipe.schedule.layer_ratios(layer_count), recipe.router, method=method)
    section = _pmod_section(adapter, model, list(ratios), recipe)
    section.update(method=method, score_layers=score_layers)
    model.config.pmod = section
    return model


def pmod_method(model_or_config: Any) -> str:
    """``"pmod"`` (routers), ``"fastv"`` or ``"pdrop"``: the method a pmod model or config.json dict records."""
    if isinstance(model_or_config, dict):
        pmod = model_or_config.get("pmod")
    else:
        pmod = getattr(getattr(model_or_config, "config", None), "pmod", None)
    return (pmod or {}).get("method", "pmod") if isinstance(pmod, dict) else "pmod"


def check_trainable(checkpoint: str | Path) -> None:
    """Raise ``CheckpointError`` (one line) when ``checkpoint`` is a FastV / PyramidDrop baseline: its pruned
    layers rank tokens by attention and have no trained routers, so there is nothing for finetune to train."""
    method = pmod_method(read_config(checkpoint))
    if method != "pmod":
        raise CheckpointError(f"{checkpoint} is a training-free {method} pruning baseline (no trained routers); "
                              "finetune a --method pmod checkpoint instead")


def mod_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(decoder layer index, layer)`` of every MoD layer (peft wrappers allowed)."""
    layers = get_adapter(model).decoder_layers(model)
    return [(i, layer) for i, layer in enumerate(layers) if isinstance(layer, MoDLayerMixin)]


def layer_infos(model: nn.Module) -> list[LayerInfo]:
    """Per decoder layer: MoD ratio and router settings (None for dense layers)."""
    infos = []
    for i, layer in enumerate(get_adapter(model).decoder_layers(model)):
        if isinstance(layer, MoDLayerMixin):
            router = getattr(layer, ROUTER_NAME)
            infos.append(LayerInfo(i, layer.pmod_ratio, router.alpha, router.beta))
        else:
            infos.append(LayerInfo(i, None))
    return infos


def is_pmod_model(model: nn.Module) -> bool:
    return any(info.ratio is not None for info in layer_infos(model))


def save_pretrained(model: nn.Module, path: str | Path, *, source: str | Path | None = None,
                    recipe: Recipe | None = None, overwrite: bool = False) -> Path:
    """Write an MoD model as an HF folder (safetensors, config with a ``pmod`` section, recipe.yaml).

    ``source``: a checkpoint folder whose processor/tokenizer files are copied over (never its Python files,
    ``auto_map`` entries or links pointing outside it). The folder is written to a temporary sibling and moved
    into place only when complete; ``overwrite`` replaces only an earlier pmod-convert output, never ``source``,
    a folder holding it, or the current directory.

    Raises:
        CheckpointError: the model has no MoD layers, or ``path`` exists and may not be replaced.
    """
    if getattr(model.config, "pmod", None) is None:
        raise CheckpointError("this model has no MoD layers; call pmod_convert.add_routers(model, recipe) first")
    if recipe is None:
        recipe = recipe_from_config(model.config.pmod)
    sync_router_settings(model)
    with atomic_folder(path, overwrite=overwrite, protect=() if source is None else (source,)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if source is not None:
            copy_processor_files(source, tmp)
        recipe.save(tmp / "recipe.yaml")
    return Path(path)


def sync_router_settings(model: nn.Module) -> None:
    """Record the routers' position priors and scorers in ``model.config.pmod`` (``"position_prior"``,
    ``"scorer"``; each removed when every layer has the default, so such checkpoints stay as before); what
    ``load_pretrained`` restores."""
    layers = get_adapter(model).decoder_layers(model)
    priors = position_priors(layers)
    if any(priors):
        model.config.pmod["position_prior"] = priors
    else:
        model.config.pmod.pop("position_prior", None)
    scorers = layer_scorers(layers)
    if any(s not in (None, "router") for s in scorers):
        model.config.pmod["scorer"] = scorers
    else:
        model.config.pmod.pop("scorer", None)


def set_scorers(model: nn.Module, scorers) -> nn.Module:
    """Choose how each MoD layer of ``model`` ranks its vision tokens: ``scorers`` has one entry per decoder
    layer, ``"router"`` (its linear router, the default) / ``"attention"`` (its own text-to-vision attention,
    :func:`pmod_convert.mod.scoring.own_attention_scores`) / None (= router; dense layers take None), or is
    None (every layer: router). ``model.config.pmod`` follows at once (``sync_router_settings``: the scorers and
    the routers' position priors, so cost estimates of the model in memory, e.g. ``bench``, count the scorer), and
    ``save_pretrained`` records it in ``config.json`` ``pmod.scorer``. Returns ``model``. Raises ``PmodError``,
    changing nothing, for anything but one entry per decoder layer, an unknown scorer, a scorer on a dense
    layer, or a layer whose attention the scorer cannot reproduce."""
    adapter = get_adapter(model)
    set_layer_scorers(adapter.decoder_layers(model), scorers, norm_name=adapter.input_norm,
                      rope=adapter.attention_rope)
    if isinstance(getattr(model.config, "pmod", None), dict):
        sync_router_settings(model)
    return model


def recipe_from_config(pmod: dict) -> Recipe:
    return Recipe(router=RouterSettings(**pmod.get("router", {})),
                  schedule=ScheduleSettings(**pmod.get("schedule", {})))


@contextlib.contextmanager
def _routers_expected(model_cls: type) -> Iterator[None]:
    """Router keys are loaded by us after ``from_pretrained``; keep transformers from reporting them."""
    previous = model_cls.__dict__.get("_keys_to_ignore_on_load_unexpected", None)
    model_cls._keys_to_ignore_on_load_unexpected = list(previous or []) + [rf"\.{ROUTER_NAME}\."]
    try:
        yield
    finally:
        if previous is None:
            del model_cls._keys_to_ignore_on_load_unexpected
        else:
            model_cls._keys_to_ignore_on_load_unexpected = previous


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise RecipeError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def load_dense(path: str | Path, dtype: str | torch.dtype | None = None, device_map: Any = None,
               attn_implementation: str | None = None, quantization_config: Any = None,
               allow_pickle: bool = False, max_memory: dict | None = None,
               offload_folder: str | Path | None = None) -> nn.Module:
    """Load a supported multimodal checkpoint folder with transformers (no routing).

    ``device_map``, ``max_memory`` and ``offload_folder`` go to transformers' ``from_pretrained`` as they are
    (accelerate's placement: ``max_memory`` maps device keys, ``"cpu"`` included, to bytes or strings such as
    ``"2GiB"``; layers that fit nowhere go to ``"disk"`` under ``offload_folder``).

    ``quantization_config`` (e.g. a ``BitsAndBytesConfig``) quantizes while loading; a folder written
    quantized carries its own in config.json. The family is checked on config.json before transformers
    is called, the checkpoint's own code is never run (``trust_remote_code=False``), and weights are read
    from safetensors only unless ``allow_pickle``.

    Raises:
        CheckpointError: the folder, config.json or weights are missing, corrupt or pickle-only.
        UnsupportedArchitecture: the ``model_type`` is not a supported family.
        RecipeError: ``dtype`` is not a known dtype.
    """
    config = read_config(path)
    adapter = get_adapter(config)
    safetensors = require_safetensors(path, allow_pickle)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": False}
    if safetensors:
        kwargs["use_safetensors"] = True
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    cls = adapter.model_cls()
    try:
        with _routers_expected(cls):
            model = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_pretrained(path: str | Path, dtype: str | torch.dtype | None = None, device_map: Any = None,
                    attn_implementation: str | None = None, adapter: bool = True,
                    quantization_config: Any = None, allow_pickle: bool = False, max_memory: dict | None = None,
                    offload_folder: str | Path | None = None) -> nn.Module:
    """Load a pmod checkpoint folder: the transformers model with its MoD layers and trained routers.

    If the folder holds a finetune sidecar (``pmod_adapter/``) and ``adapter`` is true, its routers
    replace the base routers and its LoRA adapter is applied (the result is then a ``PeftModel``).
    Exported folders (``pmod-convert export``) are checked against their ``pmod_manifest.json`` first;
    quantized ones load as bitsandbytes models (on CUDA when present). ``allow_pickle``: accept
    ``pytorch_model.bin`` / ``adapter_model.bin`` weights (safetensors only by default). ``device_map``,
    ``max_memory``, ``offload_folder``: placement as in :func:`load_dense`; routing works on any of them (each
    router sits on its layer's execution device).

    Raises:
        CheckpointError: not a pmod checkpoint, written by a newer version, files missing / corrupt /
            pickle-only, or the manifest of an exported folder does not match.
        UnsupportedArchitecture: the ``model_type`` is not a supported family.
    """
    from .export.manifest import verify_manifest

    verify_manifest(path)
    config = read_config(path)
    pmod = config.get("pmod")
    if not isinstance(pmod, dict) or "layer_ratios" not in pmod:
        raise CheckpointError(f"{path} is not a pmod-convert checkpoint (no 'pmod' section in config.json); "
                              "create one with `pmod-convert add-routers`")
    if pmod.get("format", 0) > PMOD_FORMAT:
        raise CheckpointError(f"{path} was written by a newer pmod-convert (format {pmod['format']}); upgrade pmod-convert")
    model = load_dense(path, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation,
                       quantization_config=quantization_config, allow_pickle=allow_pickle, max_memory=max_memory,
                       offload_folder=offload_folder)
    recipe = recipe_from_config(pmod)
    adapter_ = get_adapter(model)
    _apply(model, adapter_, list(pmod["layer_ratios"]), recipe.router, method=pmod.get("method", "pmod"))
    set_position_priors(adapter_.decoder_layers(model), pmod.get("position_prior"))
    try:
        set_layer_scorers(adapter_.decoder_layers(model), pmod.get("scorer"), norm_name=adapter_.input_norm,
                          rope=adapter_.attention_rope)
    except PmodError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model.config.pmod = pmod
    _load_router_weights(model, path, allow_pickle)
    if adapter and has_sidecar(path):
        model = load_sidecar(model, path, allow_pickle=allow_pickle)
        model.eval()
    return model


def load_any(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
             allow_pickle: bool = False) -> nn.Module:
    """A pmod checkpoint with its routing (and finetune sidecar), or a dense checkpoint as it is, on ``device``.

    For commands that take either kind (eval, generate). ``device``: cpu / cuda; None: transformers' default.

    Raises:
        CheckpointError / UnsupportedArchitecture: as :func:`load_pretrained` and :func:`load_dense`.
    """
    pmod = read_config(path).get("pmod")
    # CPU is transformers' default placement; an explicit CPU map would make quantized models refuse to load.
    device_map = {"": str(device)} if device is not None and torch.device(device).type != "cpu" else None
    load = load_pretrained if isinstance(pmod, dict) else load_dense
    return load(path, dtype=dtype, device_map=device_map, allow_pickle=allow_pickle)


def _load_router_weights(model: nn.Module, path: str | Path, allow_pickle: bool = False) -> None:
    tensors = read_router_tensors(path, allow_pickle=allow_pickle)
    load_router_state(model, {f"{k}": v for k, v in tensors.items()}, where=str(path))


def convert(source: str | Path, out: str | Path, recipe: Recipe | None = None, *,
            overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """``pmod-convert add-routers``: load SOURCE, add routers per ``recipe``, write OUT.

    ``overwrite`` replaces only an earlier pmod-convert output (never SOURCE, a folder holding it or the current
    directory); ``allow_pickle`` accepts ``pytorch_model.bin`` weights (safetensors only by default).

    Raises:
        CheckpointError: SOURCE is missing / corrupt / pickle-only, or OUT exists and may not be replaced.
        UnsupportedArchitecture: SOURCE is not a supported family.
        RecipeError: the recipe does not fit the model.
    """
    recipe = (recipe or Recipe()).validate()
    config = read_config(source)
    adapter = get_adapter(config)
    text = config.get(adapter.text_config_attr) or {}
    depth = text.get("num_hidden_layers")
    if isinstance(depth, int):
        recipe.schedule.layer_ratios(depth)  # fail on a bad schedule before loading any weight
    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    check_replaceable(out, protect=(source,))
    model = load_dense(source, dtype=recipe.dtype, allow_pickle=allow_pickle)
    add_routers(model, recipe)
    return save_pretrained(model, out, source=source, recipe=recipe, overwrite=overwrite)
