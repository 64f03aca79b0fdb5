"""Import the authors' p-MoD checkpoints (original LLaVA repository layout) as pmod-convert checkpoints.

The published checkpoints ``MCG-NJU/p-MoD-LLaVA-v1.5-7B`` and ``MCG-NJU/p-MoD-LLaVA-NeXT-7B`` are written by the
p-MoD code base (github.com/MCG-NJU/p-MoD, a fork of the original LLaVA repository), not by transformers'
LLaVA classes. Facts of that layout this module relies on (read from the authors' public code):

- ``config.json`` is a Llama config with ``model_type: "pmod_llava_llama"``, the LLaVA fields (``mm_vision_tower``,
  ``mm_projector_type``, ``mm_vision_select_layer``, ``mm_vision_select_feature``, ``image_aspect_ratio``,
  ``mm_patch_merge_type``, ``image_grid_pinpoints``, ``max_num_patches``) and the MoD fields
  ``mod_target_layers`` (schedule string), ``mod_router_factor`` (average factor ``a``, or the constant ratio),
  ``mod_weight_norm`` (``"<activation>_<scale>_<bias>"``, e.g. ``tanh_0.2_1``: ``w = scale * tanh(logit) + bias``),
  ``mod_bias_enabled``, ``mod_target_token_type`` (``vision_all`` | ``vision_hr`` | ``all``) and, once built,
  ``mod_target_layer_indices``.
- Schedule strings: ``<shiftedcos|shiftedlinear>_decay_<max>_<min>``: layer ``i`` gets
  ``v(i) = cos(pi * i / 31) / 2 + a`` (shifted cosine) or ``v(i) = 0.5 - i / 31 + a`` (shifted linear); layers with
  ``v(i) <= max`` are MoD layers keeping ``max(v(i), min)``. The divisor is 31 whatever the depth (the reference
  code was written for 32 layers); this importer reproduces it exactly, so the imported ratios are the ones the
  original code runs. ``deep_all`` (layers 2..L-2), ``deep_all_include_last`` (2..L-1) and ``interleave``
  (1, 3, 5, ...) keep ``mod_router_factor`` in every MoD layer.
- Weights: a MoD layer wraps the decoder layer, so its keys are ``model.layers.N.decoder_layer.*`` and its router
  ``model.layers.N.router.router.weight`` ``[1, hidden]`` / ``.bias`` ``[1]``; dense layers keep
  ``model.layers.N.*``. Vision tower: ``model.vision_tower.vision_tower.vision_model.*`` (a CLIP vision model);
  projector: ``model.mm_projector.0.*`` / ``model.mm_projector.2.*`` (``mlp2x_gelu``); LLaVA-NeXT:
  ``model.image_newline`` ``[hidden]``. Text: ``model.embed_tokens``, ``model.norm``, ``lm_head``.
- Routing: the router reads the layer's input; the top ``trunc(ratio * n_targets)`` targets by weight are kept,
  all other tokens are kept; kept targets get ``h + w * mlp(norm(h))`` (``h = x + attn(norm(x))``), kept
  non-targets ``h + mlp(norm(h))``, skipped targets ``w * x``: exactly pmod-convert's MoD layer (STRing, TanhNorm).

The output is a transformers ``LlavaForConditionalGeneration`` (``image_aspect_ratio`` pad/square) or
``LlavaNextForConditionalGeneration`` (``anyres`` with ``spatial_unpad``) checkpoint with pmod-convert's router
keys and a ``pmod`` section holding the same per-layer ratios and TanhNorm settings. The vocabulary gets the
image token (and a pad token) appended after the original vocabulary and is padded to a multiple of 64, the
layout of the llava-hf checkpoints (``<image>`` = original vocab size, ``<pad>`` = the next id), so their
processors fit; the new ``lm_head`` rows are zero and ``generation_config.json`` suppresses the new ids.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    atomic_folder,
    check_replaceable,
    copy_processor_files,
    read_config,
    require_safetensors,
)
from ..errors import CheckpointError, RecipeError, UnsupportedArchitecture
from ..mod.router import ROUTER_NAME
from ..recipe import Recipe, RouterSettings, ScheduleSettings

ORIGINAL_MODEL_TYPE = "pmod_llava_llama"
LAYOUT = "p-MoD original LLaVA layout (github.com/MCG-NJU/p-MoD)"
SCHEDULE_DIVISOR = 31  # the reference code's hard-coded L - 1
VOCAB_MULTIPLE = 64  # llava-hf pads the extended vocabulary to a multiple of 64

# Vision towers named by ``mm_vision_tower`` whose configs are known without a download (values of the public
# openai/clip-vit-large-patch14(-336) configs). Anything else needs a local folder or --vision-config.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14,
                                              hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14,
                                          hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768),
}
# Llama fields carried from the original config into text_config (others are LLaVA / MoD / trainer fields).
TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "attention_bias",
               "attention_dropout", "mlp_bias", "bos_token_id", "eos_token_id", "initializer_range", "head_dim")
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")


@dataclass
class ImportResult:
    """What ``import_pmod`` wrote: the folder, the family (``llava`` / ``llava_next``), the per-layer ratios
    (None = dense layer), the router settings, the image / pad token ids, and notes for the user."""

    path: Path
    family: str
    ratios: list[float | None]
    router: RouterSettings
    image_token_id: int
    pad_token_id: int
    vocab_size: int
    notes: list[str] = field(default_factory=list)


# ---- the original config's strings ------------------------------------------------------------------------
def parse_weight_norm(text: Any) -> RouterSettings:
    """``mod_weight_norm`` -> TanhNorm settings: ``tanh_<scale>_<bias>`` gives alpha = scale, beta = bias; a bare
    ``tanh`` gives scale 1, bias 1 (the reference code's fallback).

    Raises:
        RecipeError: another activation (softmax, sigmoid, none: not TanhNorm), or a string of another shape.
    """
    if not isinstance(text, str):
        raise RecipeError(f"mod_weight_norm must be a string such as 'tanh_0.2_1', got {text!r}")
    match = re.fullmatch(r"([a-z]+)(?:_(\d+(?:\.\d+)?)_(-?\d+(?:\.\d+)?))?", text)
    if match is None:
        raise RecipeError(f"mod_weight_norm {text!r} is not '<activation>_<scale>_<bias>' (e.g. 'tanh_0.2_1')")
    kind, scale, bias = match.group(1), match.group(2), match.group(3)
    if kind != "tanh":
        raise RecipeError(f"mod_weight_norm {text!r} uses {kind!r} weights; pmod-convert's routers are TanhNorm "
                          "(w = alpha * tanh(logit) + beta), so only tanh checkpoints can be imported")
    return RouterSettings(tanh_alpha=float(scale) if scale else 1.0, tanh_beta=float(bias) if bias else 1.0)


def schedule_ratios(text: Any, num_layers: int, factor: Any) -> list[float | None]:
    """Per-layer ratios (None = dense) of a ``mod_target_layers`` string, exactly as the reference code computes
    them (divisor 31 for the decay curves, whatever the depth; see the module docstring).

    Raises:
        RecipeError: an unknown schedule string, a non-numeric factor, or a ratio outside (0, 1].
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise RecipeError(f"mod_router_factor must be a finite number, got {factor!r}")
    if not isinstance(text, str):
        raise RecipeError(f"mod_target_layers must be a string such as 'shiftedcos_decay_0.85_0.15', got {text!r}")
    a = float(factor)
    decay = re.fullmatch(r"(shiftedcos|shiftedlinear)_decay_(\d+\.\d+)_(\d+\.\d+)", text)
    if decay is not None:
        kind, max_ratio, min_ratio = decay.group(1), float(decay.group(2)), float(decay.group(3))
        ratios: list[float | None] = []
        for i in range(num_layers):
            if kind == "shiftedcos":
                value = math.cos(i * math.pi / SCHEDULE_DIVISOR) / 2 + a
            else:
                value = (-i / SCHEDULE_DIVISOR + 0.5) + a
            ratios.append(max(value, min_ratio) if value <= max_ratio else None)
    elif text in ("deep_all", "deep_all_include_last", "interleave"):
        chosen = {"deep_all": range(2, num_layers - 1), "deep_all_include_last": range(2, num_layers),
                  "interleave": range(1, num_layers, 2)}[text]
        ratios = [a if i in chosen else None for i in range(num_layers)]
    else:
        raise RecipeError(f"mod_target_layers {text!r} is not a p-MoD schedule (known: shiftedcos_decay_<max>_<min>, "
                          "shiftedlinear_decay_<max>_<min>, deep_all, deep_all_include_last, interleave)")
    for i, r in enumerate(ratios):
        if r is not None and not 0 < r <= 1:
            raise RecipeError(f"mod_target_layers {text!r} with mod_router_factor {factor} gives layer {i} the ratio "
                              f"{r:.4f}, outside (0, 1]")
    if all(r is None for r in ratios):
        raise RecipeError(f"mod_target_layers {text!r} makes no layer of this {num_layers}-layer model an MoD layer")
    return ratios


# ---- configs ----------------------------------------------------------------------------------------------
def _family(config: dict) -> str:
    aspect = config.get("image_aspect_ratio", "square")
    merge = config.get("mm_patch_merge_type", "flat")
    if aspect == "anyres":
        if merge != "spatial_unpad":
            raise UnsupportedArchitecture(f"image_aspect_ratio anyres with mm_patch_merge_type {merge!r}: transformers' "
                                          "LLaVA-NeXT unpads and adds image_newline ('spatial_unpad') only")
        if config.get("max_num_patches") is not None:
            raise UnsupportedArchitecture(f"max_num_patches {config['max_num_patches']} (anyres_max): the original "
                                          "interpolates large grids down, transformers' LLaVA-NeXT does not")
        target = config.get("mod_target_token_type", "vision_hr")  # the reference code's default
        if target != "vision_all":
            raise UnsupportedArchitecture(f"mod_target_token_type {target!r}: pmod-convert routes every image token "
                                          "(the published checkpoints use 'vision_all'); a checkpoint that routes only "
                                          "high-resolution or also text tokens cannot be imported")
        return "llava_next"
    if aspect not in ("pad", "square") or merge != "flat":
        raise UnsupportedArchitecture(f"image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r} is neither "
                                      "LLaVA-1.5 (pad/square, flat) nor LLaVA-NeXT (anyres, spatial_unpad)")
    if config.get("mod_target_token_type") == "all":
        raise UnsupportedArchitecture("mod_target_token_type 'all' routes text tokens too; pmod-convert routes image "
                                      "tokens only")
    return "llava"


def _vision_config(config: dict, source: Path, vision_config: str | Path | None) -> tuple[dict, str]:
    """The CLIP vision config (a dict of CLIPVisionConfig fields) and where it came from."""
    if vision_config is not None:
        path = Path(vision_config)
        path = path / "config.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"--vision-config {vision_config} cannot be read as JSON ({exc})") from None
        return dict(data.get("vision_config", data)), f"--vision-config {vision_config}"
    name = config.get("mm_vision_tower")
    if not isinstance(name, str):
        raise CheckpointError(f"{source}/config.json has no mm_vision_tower; pass --vision-config CLIP_CONFIG_JSON")
    local = Path(name)
    if local.is_dir() and (local / "config.json").is_file():
        try:
            data = json.loads((local / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"the vision tower folder {name}'s config.json cannot be read as JSON ({exc}); "
                                  "fix it or pass --vision-config") from None
        return dict(data.get("vision_config", data)), f"the local vision tower folder {name}"
    if name in KNOWN_TOWERS:
        return dict(KNOWN_TOWERS[name]), f"the known config of {name}"
    raise CheckpointError(f"the vision tower {name!r} is neither a local folder nor a known tower; pass "
                          "--vision-config with its CLIP config.json")


def _check_vision_shapes(vision: dict, shapes: dict[str, tuple], where: str) -> None:
    """The vision config must match the stored CLIP weights (a wrong config would load and run wrongly)."""
    prefix = TOWER_PREFIX
    patch = shapes.get(prefix + "embeddings.patch_embedding.weight")
    positions = shapes.get(prefix + "embeddings.position_embedding.weight")
    fc1 = shapes.get(prefix + "encoder.layers.0.mlp.fc1.weight")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    if patch is None or positions is None or fc1 is None:
        raise CheckpointError("the checkpoint holds no CLIP vision tower weights (model.vision_tower.vision_tower."
                              "vision_model.*); pass --vision-tower with the local CLIP checkpoint it was trained with")
    side = int(vision.get("image_size", 224)) // int(vision.get("patch_size", 32))
    found = {"hidden_size": patch[0], "patch_size": patch[-1], "image_size": (math.isqrt(positions[0] - 1)) * patch[-1],
             "intermediate_size": fc1[0], "num_hidden_layers": len(layers)}
    for key, value in found.items():
        if int(vision.get(key, -1)) != int(value):
            raise CheckpointError(f"the vision config from {where} says {key} {vision.get(key)}, the stored vision tower "
                                  f"weights have {value}; pass the right --vision-config")
    if positions[0] != side * side + 1:
        raise CheckpointError(f"the vision config from {where} does not fit the stored position embeddings")
    if int(vision["hidden_size"]) % int(vision.get("num_attention_heads", 12)):
        raise CheckpointError(f"the vision config from {where}: hidden_size is not a multiple of num_attention_heads")


def _hf_config(config: dict, family: str, vision: dict):
    """The transformers LLaVA / LLaVA-NeXT config of the imported model, and its (image, pad) token ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    if config.get("rope_scaling"):
        raise UnsupportedArchitecture(f"rope_scaling {config['rope_scaling']!r} is not imported (the published "
                                      "checkpoints have none)")
    if config.get("tie_word_embeddings"):
        raise UnsupportedArchitecture("tie_word_embeddings true is not imported (the published checkpoints untie them)")
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise UnsupportedArchitecture(f"mm_projector_type {projector!r}: transformers' LLaVA projector is a 2-layer "
                                      "GELU MLP ('mlp2x_gelu')")
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise UnsupportedArchitecture(f"mm_vision_select_feature {select!r} (known: patch, cls_patch)")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise UnsupportedArchitecture("mm_use_im_start_end / mm_use_im_patch_token add image marker tokens that "
                                      "transformers' LLaVA classes do not have")
    vocab = int(config["vocab_size"])
    image_id, pad_id = vocab, vocab + 1
    text = {k: config[k] for k in TEXT_FIELDS if config.get(k) is not None}
    text_config = LlamaConfig(**text, vocab_size=-(-(vocab + 2) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
                              pad_token_id=pad_id, tie_word_embeddings=False)
    if int(config.get("mm_hidden_size", vision["hidden_size"])) != int(vision["hidden_size"]):
        raise CheckpointError(f"mm_hidden_size {config['mm_hidden_size']} differs from the vision tower's hidden_size "
                              f"{vision['hidden_size']}")
    vision_config = CLIPVisionConfig(**{k: v for k, v in vision.items() if k not in ("model_type", "architectures",
                                                                                       "transformers_version")})
    common = dict(text_config=text_config, vision_config=vision_config, image_token_index=image_id,
                  projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
                  vision_feature_layer=int(config.get("mm_vision_select_layer", -1)),
                  vision_feature_select_strategy="default" if select == "patch" else "full", pad_token_id=pad_id)
    dtype = config.get("torch_dtype") or config.get("dtype")
    if family == "llava":
        side = vision_config.image_size // vision_config.patch_size
        hf = LlavaConfig(**common, image_seq_length=side * side + (select == "cls_patch"))
    else:
        pinpoints = config.get("image_grid_pinpoints")
        if not isinstance(pinpoints, list) or not pinpoints:
            raise CheckpointError("an anyres checkpoint needs image_grid_pinpoints in config.json")
        hf = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints, use_image_newline_parameter=True)
    if dtype is not None:
        hf.dtype = dtype
    return hf, image_id, pad_id


# ---- weights ----------------------------------------------------------------------------------------------
def _map_key(key: str, mod_layers: set[int], family: str) -> str | None:
    """The transformers name of an original key (None: a buffer the original saved that transformers does not keep).

    Raises:
        CheckpointError: a key this layout does not have, or a layer whose keys contradict the schedule.
    """
    if IGNORED_KEYS.search(key):
        return None
    if m := re.fullmatch(r"model\.layers\.(\d+)\.router\.router\.(weight|bias)", key):
        layer = int(m.group(1))
        if layer not in mod_layers:
            raise CheckpointError(f"{key}: a router in layer {layer}, which the schedule makes dense")
        return f"model.language_model.layers.{layer}.{ROUTER_NAME}.{m.group(2)}"
    if m := re.fullmatch(r"model\.layers\.(\d+)\.decoder_layer\.(.+)", key):
        layer = int(m.group(1))
        if layer not in mod_layers:
            raise CheckpointError(f"{key}: an MoD-wrapped layer {layer}, which the schedule makes dense")
        return f"model.language_model.layers.{layer}.{m.group(2)}"
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key):
        if int(m.group(1)) in mod_layers:
            raise CheckpointError(f"{key}: layer {m.group(1)} is stored unwrapped but the schedule makes it an MoD layer")
        return f"model.language_model.layers.{m.group(1)}.{m.group(2)}"
    if key in ("model.embed_tokens.weight", "model.norm.weight"):
        return "model.language_model." + key[len("model."):]
    if key == "lm_head.weight":
        return key
    if m := re.fullmatch(r"model\.mm_projector\.(0|2)\.(weight|bias)", key):
        return f"model.multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    if key == "model.image_newline" and family == "llava_next":
        return key
    if key.startswith("model.vision_tower.vision_tower.vision_model."):
        return "model.vision_tower." + key[len("model.vision_tower.vision_tower.vision_model."):]
    raise CheckpointError(f"unexpected weight {key!r} for the {LAYOUT}; is this a p-MoD checkpoint?")


def _weight_files(source: Path, allow_pickle: bool) -> list[Path]:
    if require_safetensors(source, allow_pickle):
        return sorted(source.glob("*.safetensors"))
    return sorted(source.glob("pytorch_model*.bin"))


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} cannot be read ({exc}); the checkpoint is corrupt") from None
    try:  # --allow-pickle only: tensors, never arbitrary objects
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read ({str(exc).splitlines()[0] if str(exc) else exc})") from None


def _shapes(files: list[Path]) -> dict[str, tuple]:
    """Stored shapes by original key (safetensors headers only; pickles are read whole)."""
    from safetensors import safe_open

    out: dict[str, tuple] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    out[key] = tuple(handle.get_slice(key).get_shape())
        else:
            out.update({k: tuple(v.shape) for k, v in _load_file(file).items()})
    return out


def _extend_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` ``[vocab, hidden]`` with zero rows appended up to ``rows`` (image / pad / padding ids)."""
    extra = torch.zeros(rows - tensor.shape[0], *tensor.shape[1:], dtype=tensor.dtype)
    return torch.cat([tensor, extra], dim=0)


# ---- the import -------------------------------------------------------------------------------------------
def import_pmod(source: str | Path, out: str | Path, *, vision_config: str | Path | None = None,
                vision_tower: str | Path | None = None, processor: str | Path | None = None, overwrite: bool = False,
                allow_pickle: bool = False) -> ImportResult:
    """Convert a p-MoD checkpoint in the original LLaVA layout (``model_type: pmod_llava_llama``) into a
    pmod-convert checkpoint that ``load_pretrained`` runs with the same per-layer ratios and TanhNorm routers.

    ``source``: the folder (config.json + safetensors; pickle weights only with ``allow_pickle``, read with
    ``weights_only``). ``vision_config``: a CLIP (vision) config.json or its folder, needed when
    ``mm_vision_tower`` is neither a local folder nor a known tower. ``vision_tower``: a local CLIP checkpoint
    folder (transformers layout, ``vision_model.*`` keys in safetensors, e.g. openai/clip-vit-large-patch14-336)
    for a checkpoint saved without its tower, as the original code loads it from ``mm_vision_tower``; its
    config.json is the vision config unless ``vision_config`` is given. ``processor``: a local folder with a
    transformers LLaVA / LLaVA-NeXT processor for the same tokenizer (e.g. llava-hf/llava-1.5-7b-hf or
    llava-v1.6-vicuna-7b-hf): its files are copied after checking that its ``<image>`` token has the imported
    image id; without it the output has no processor (``load_pretrained`` works; eval / generate need one).
    ``out`` is written atomically (a temporary folder renamed into place), never replacing ``source``.

    Weights are mapped key by key (see the module docstring), checked against the shapes of the transformers
    model built on the meta device, and written shard by shard (one output shard per source file, so memory
    holds one shard at a time).

    Raises:
        CheckpointError: missing / corrupt / pickle-only files, weights that do not fit the config, ``out``
            exists (without ``overwrite``) or may not be replaced, a processor whose image token differs.
        UnsupportedArchitecture: not a ``pmod_llava_llama`` checkpoint, or settings transformers' LLaVA classes
            cannot reproduce (listed in the message).
        RecipeError: a schedule or weight-norm string this importer does not know.
    """
    from safetensors.torch import save_file

    from ..adapters import get_adapter
    from ..api import _pmod_section

    source, out = Path(source), Path(out)
    config = read_config(source)
    if config.get("model_type") != ORIGINAL_MODEL_TYPE:
        raise UnsupportedArchitecture(f"{source} has model_type {config.get('model_type')!r}, not "
                                      f"{ORIGINAL_MODEL_TYPE!r} (the {LAYOUT}); for a transformers checkpoint use "
                                      "add-routers")
    if "mod_target_layers" not in config:
        raise CheckpointError(f"{source}/config.json has no mod_target_layers: not a p-MoD checkpoint")
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or not isinstance(config.get("vocab_size"), int):
        raise CheckpointError(f"{source}/config.json lacks num_hidden_layers / vocab_size")
    family = _family(config)
    ratios = schedule_ratios(config["mod_target_layers"], num_layers, config.get("mod_router_factor", 0.5))
    mod_layers = {i for i, r in enumerate(ratios) if r is not None}
    stored = config.get("mod_target_layer_indices")
    if stored is not None and sorted(stored) != sorted(mod_layers):
        raise CheckpointError(f"config.json lists MoD layers {stored}, but {config['mod_target_layers']!r} gives "
                              f"{sorted(mod_layers)}; the checkpoint is inconsistent")
    router = parse_weight_norm(config.get("mod_weight_norm", "tanh"))
    router.bias = bool(config.get("mod_bias_enabled", False))
    router.validate()
    files = _weight_files(source, allow_pickle)
    shapes = _shapes(files)
    tower_files: list[Path] = []
    if vision_tower is not None:
        if any(k.startswith(TOWER_PREFIX) for k in shapes):
            raise CheckpointError(f"{source} holds its own vision tower weights; drop --vision-tower")
        tower_files = _weight_files(Path(vision_tower), allow_pickle)
        tower = {TOWER_PREFIX + k[len("vision_model."):]: v for k, v in _shapes(tower_files).items()
                 if k.startswith("vision_model.")}
        if not tower:
            raise CheckpointError(f"--vision-tower {vision_tower} holds no vision_model.* weights (a transformers "
                                  "CLIP checkpoint)")
        shapes.update(tower)
        if vision_config is None:
            vision_config = vision_tower
    vision, vision_from = _vision_config(config, source, vision_config)
    _check_vision_shapes(vision, shapes, vision_from)
    hf_config, image_id, pad_id = _hf_config(config, family, vision)
    recipe = Recipe(router=router, schedule=ScheduleSettings(kind="explicit", ratios=list(ratios))).validate()

    # The model transformers would build (no memory: meta device) names and shapes every weight we must write.
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaForConditionalGeneration if family == "llava" else LlavaNextForConditionalGeneration
    with torch.device("meta"):
        meta = cls(hf_config)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    vocab_rows = hf_config.text_config.vocab_size
    hidden = hf_config.text_config.hidden_size
    router_shapes = {"weight": (1, hidden), "bias": (1,)}
    mapped: dict[str, str] = {}
    for key, shape in shapes.items():
        new = _map_key(key, mod_layers, family)
        if new is None:
            continue
        if new in mapped.values():
            raise CheckpointError(f"two stored weights map to {new}; the checkpoint is inconsistent")
        kind = new.rsplit(".", 1)[-1] if f".{ROUTER_NAME}." in new else None
        want = router_shapes[kind] if kind else expected.get(new)
        if new in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            want = (config["vocab_size"], hidden)
        if want is None or tuple(shape) != tuple(want):
            raise CheckpointError(f"stored weight {key} has shape {tuple(shape)}, the imported model expects "
                                  f"{want} for {new}; the config does not fit the weights")
        mapped[key] = new
    written = set(mapped.values())
    missing = sorted(set(expected) - written)
    routers = {(int(k.split(".")[3]), k.rsplit(".", 1)[-1]) for k in written if f".{ROUTER_NAME}." in k}
    need = {(i, "weight") for i in mod_layers} | ({(i, "bias") for i in mod_layers} if router.bias else set())
    if missing or routers != need:
        what = missing[:3] if missing else sorted(need ^ routers)[:3]
        raise CheckpointError(f"the checkpoint lacks weights the imported model needs ({', '.join(map(str, what))}"
                              f"{' ...' if len(missing) > 3 else ''}); is it complete?")
    del meta

    adapter = get_adapter(hf_config)
    pmod = _pmod_section(adapter, _ConfigHolder(hf_config), ratios, recipe)
    pmod["imported_from"] = {
        "layout": LAYOUT, "source": str(source), "mod_target_layers": config["mod_target_layers"],
        "mod_router_factor": config.get("mod_router_factor"), "mod_weight_norm": config.get("mod_weight_norm"),
        "mod_target_token_type": config.get("mod_target_token_type"), "vision_config": vision_from,
        "image_token_id": image_id, "pad_token_id": pad_id, "original_vocab_size": config["vocab_size"],
    }
    notes = [f"vision config: {vision_from}"]
    if processor is None:
        notes.append("no processor written (pass --processor with a local llava-hf processor folder for the same "
                     "tokenizer); load_pretrained works, eval / generate need a processor")

    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    check_replaceable(out, protect=(source,))
    with atomic_folder(out, overwrite=overwrite, protect=(source,)) as tmp:
        weight_map: dict[str, str] = {}
        total = len(files) + len(tower_files)
        for index, file in enumerate(files + tower_files, start=1):
            tensors = {}
            loaded = _load_file(file)
            if index > len(files):  # the CLIP checkpoint: its vision_model.* keys under the original's prefix
                loaded = {TOWER_PREFIX + k[len("vision_model."):]: v for k, v in loaded.items()
                          if k.startswith("vision_model.")}
            for key, value in loaded.items():
                new = mapped.get(key)
                if new is None:
                    continue
                if new in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
                    value = _extend_rows(value, vocab_rows)
                tensors[new] = value.contiguous()
            name = "model.safetensors" if total == 1 else f"model-{index:05d}-of-{total:05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in tensors})
            del tensors
        if total > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                          indent=2, sort_keys=True))
        data = hf_config.to_dict()
        data["architectures"] = [cls.__name__]
        data["pmod"] = pmod
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        _write_generation_config(source, tmp, config, image_id, pad_id, vocab_rows)
        recipe.save(tmp / "recipe.yaml")
        if processor is not None:
            _copy_processor(Path(processor), tmp, image_id)
    return ImportResult(out, family, ratios, router, image_id, pad_id, vocab_rows, notes)


class _ConfigHolder:
    """``api._pmod_section`` reads only ``model.config``."""

    def __init__(self, config):
        self.config = config


def _write_generation_config(source: Path, dest: Path, config: dict, image_id: int, pad_id: int, rows: int) -> None:
    """The source's generation settings (when it has them), with the ids added to the vocabulary suppressed."""
    from transformers import GenerationConfig

    base: dict[str, Any] = {}
    if (source / "generation_config.json").is_file():
        try:
            base = json.loads((source / "generation_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{source / 'generation_config.json'} is not valid JSON") from None
    base = {k: v for k, v in base.items() if not k.startswith("_") and k != "transformers_version"}
    base.setdefault("bos_token_id", config.get("bos_token_id"))
    base.setdefault("eos_token_id", config.get("eos_token_id"))
    base["pad_token_id"] = pad_id
    base["suppress_tokens"] = list(range(config["vocab_size"], rows))  # image, pad and padding rows
    GenerationConfig(**base).save_pretrained(dest)


def _copy_processor(folder: Path, dest: Path, image_id: int) -> None:
    """Copy a local processor's files and check that its tokenizer puts ``<image>`` at ``image_id``."""
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise CheckpointError(f"--processor {folder} is not a folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--processor {folder}: its tokenizer cannot be loaded ({str(exc).splitlines()[0]})") from None
    got = tokenizer.convert_tokens_to_ids("<image>")
    if got != image_id:
        raise CheckpointError(f"--processor {folder} puts <image> at id {got}, the imported model at {image_id}; use "
                              "a processor for the same tokenizer (llava-hf layout)")
    copy_processor_files(folder, dest)  # never its config.json / weights: ours stay
