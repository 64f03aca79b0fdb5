"""The model to train: base (optionally 4-bit), peft LoRA on the language model, trainable routers."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..adapters import ArchitectureAdapter, get_adapter
from ..api import load_pretrained, resolve_dtype
from ..checkpoint import read_config, router_key
from ..errors import CheckpointError, RecipeError
from ..mod.router import ROUTER_NAME
from ..sidecar import peft_quietly
from .routing import routers, tie_routers
from .settings import FinetuneSettings


def load_base(checkpoint: Any, settings: FinetuneSettings, device: torch.device | str = "cpu", *,
              allow_pickle: bool = False) -> nn.Module:
    """The MoD model of a pmod checkpoint with its base routers, ignoring any finetune sidecar.

    ``--qlora``: the language model's linears are quantized to 4-bit nf4 by bitsandbytes while loading
    (vision tower, projector, lm_head and routers stay in ``dtype``), on ``device``. ``allow_pickle``: accept
    ``pytorch_model.bin`` weights (safetensors only by default).
    """
    if not settings.qlora:
        return load_pretrained(checkpoint, dtype=settings.dtype, adapter=False, allow_pickle=allow_pickle)
    from transformers import BitsAndBytesConfig

    config = read_config(checkpoint)
    _check_cpu_4bit(config, device)
    adapter, compute = get_adapter(config), _compute_dtype(settings.dtype, config)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute,
                               llm_int8_skip_modules=_kept_unquantized(checkpoint, adapter))
    try:
        return load_pretrained(checkpoint, dtype=compute, adapter=False, quantization_config=quant,
                               device_map={"": torch.device(device)}, allow_pickle=allow_pickle)
    except ImportError as exc:
        raise RecipeError(f"--qlora needs bitsandbytes ({str(exc).splitlines()[0]})") from None


def _check_cpu_4bit(config: dict, device: Any) -> None:
    """bitsandbytes' CPU 4-bit kernels pack weights in blocks of 64 input features: refuse other widths up front.

    Raises:
        RecipeError: QLoRA on the CPU with a hidden or intermediate size that is not a multiple of 64.
    """
    if torch.device(device).type != "cpu":
        return
    text = config.get("text_config") or config
    sizes = {k: text.get(k) for k in ("hidden_size", "intermediate_size") if isinstance(text.get(k), int)}
    bad = {k: v for k, v in sizes.items() if v % 64}
    if bad:
        raise RecipeError(f"--qlora on the CPU needs the language model's widths to be multiples of 64 "
                          f"(bitsandbytes' 4-bit CPU kernels); this model has {bad}: run on CUDA or without --qlora")


def _kept_unquantized(checkpoint: Any, adapter: ArchitectureAdapter) -> list[str]:
    """Full names of the family's ``never_quantize`` modules (the rule export uses too)."""
    from ..quantization import resolve_skip_modules, skeleton

    return resolve_skip_modules(skeleton(checkpoint), adapter.never_quantize, strict=False)


def _compute_dtype(name: str, config: dict) -> torch.dtype:
    """``name`` as a torch dtype; ``auto``: the checkpoint's stored dtype (float32 when it names none)."""
    if name != "auto":
        return resolve_dtype(name)
    stored = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    try:
        resolved = resolve_dtype(stored)
    except RecipeError:  # a dtype this toolkit does not train in (e.g. float8): compute in float32
        return torch.float32
    return resolved if isinstance(resolved, torch.dtype) else torch.float32


def prepare_for_training(model: nn.Module, settings: FinetuneSettings) -> nn.Module:
    """Freeze the base, add LoRA (unless ``lora_r == 0``), make routers (and the projector) trainable.

    With ``settings.router_lr`` None (the default) only zero routers are trained; calibrated ones stay as
    calibration chose them (:func:`is_calibrated`). An explicit ``router_lr`` trains every router.

    Routers are trained by ``requires_grad`` rather than peft ``modules_to_save``: peft would copy them (which
    breaks a shared router's tied parameters) and they are saved separately, in the sidecar's routers file.
    """
    adapter = get_adapter(model)
    if settings.qlora:
        from peft import prepare_model_for_kbit_training

        # Checkpointing is enabled below, non-reentrant; peft's own default would be reentrant.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad_(False)
    if settings.shared_router:
        tie_routers(model)
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    if settings.lora_r > 0:
        model = _add_lora(model, settings, adapter)
    for _, router in routers(model):
        train = settings.router_lr is not None or not is_calibrated(router)
        for param in router.parameters():
            param.requires_grad_(train)
    model.train()
    return model


def is_calibrated(router: nn.Module) -> bool:
    """Whether a router carries a calibrated ranking (non-zero weights, a position prior, or the attention scorer
    chosen for its layer), which the default
    finetune keeps fixed; a zero router (the fresh p-MoD start, or where calibration found nothing better than
    keeping the first k tokens) is trained.

    Measured (docs/finetuning.md): on a zoo model whose calibration chose last-k and fitted routers, training
    them at half the LoRA lr took validation accuracy from 92% to 36% within 22 steps (frozen: 92% -> 94%, test
    93.8% against dense 96.5%); on one whose calibration kept zero routers, training them lowered the
    validation KL to dense 5x more than freezing them.
    """
    if getattr(router, "position_prior", 0.0) or getattr(router, "scorer", "router") != "router":
        return True  # a position prior, or a layer ranking by its own attention: the router does not rank
    return any(bool(p.detach().ne(0).any()) for p in router.parameters())


def enable_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def lora_targets(settings: FinetuneSettings, adapter: ArchitectureAdapter) -> str:
    return settings.lora_targets if settings.lora_targets is not None else adapter.lora_target_regex


def _add_lora(model: nn.Module, settings: FinetuneSettings, adapter: ArchitectureAdapter) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    regex = lora_targets(settings, adapter)
    names = [n for n, _ in model.named_modules()]
    hits = [n for n in names if re.fullmatch(regex, n)]
    if not hits:
        raise RecipeError(f"--lora-targets {regex!r} matches no module of the model; it must match whole module "
                          "names such as model.language_model.layers.0.self_attn.q_proj")
    if any(ROUTER_NAME in n for n in hits):
        raise RecipeError(f"--lora-targets {regex!r} matches routers; routers are trained fully, not with LoRA")
    to_save = [adapter.projector] if settings.train_projector else None
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=regex, modules_to_save=to_save, bias="none")
    try:
        with peft_quietly():
            return get_peft_model(model, config)
    except ValueError as exc:
        raise RecipeError(f"peft cannot add LoRA to {regex!r}: {str(exc).splitlines()[0]}") from None


def parameter_groups(model: nn.Module, settings: FinetuneSettings) -> list[dict]:
    """AdamW groups: LoRA/projector weights (lr, weight decay) and routers (router_lr, no decay); the default
    learning rates are sized from the language model's hidden size (``FinetuneSettings.learning_rates``)."""
    lora_lr, router_lr = settings.learning_rates(text_hidden_size(model))
    router_params, other = [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (router_params if router_key(name) is not None else other).append(param)
    groups = []
    if other:
        groups.append({"params": other, "lr": lora_lr, "weight_decay": settings.weight_decay, "name": "lora"})
    if router_params:
        groups.append({"params": router_params, "lr": router_lr, "weight_decay": 0.0,
                       "name": "routers"})
    if not groups:
        raise RecipeError("nothing to train: no LoRA adapter (--lora-r 0) and no router to train (calibrated "
                          "routers stay as calibrate chose them unless --router-lr is given)")
    return groups


def text_hidden_size(model: nn.Module) -> int:
    """Hidden size of the language model (``text_config.hidden_size``, or the config's own)."""
    from .routing import bare_model

    config = bare_model(model).config
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "hidden_size", None) or config.hidden_size)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (a shared router appears once), detached CPU copies."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in bare_named(model) if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    params = {n: p for n, p in bare_named(model) if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise CheckpointError(f"{where} does not match this model's trainable parameters "
                              f"(missing {missing[:2]}, unexpected {extra[:2]}); resume with the same settings")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(device=param.device, dtype=param.dtype))


def bare_named(model: nn.Module):
    """``named_parameters`` of the model inside a DDP wrapper (names stay the same with or without DDP)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.named_parameters()


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = trainable = routers_n = 0
    seen: set[int] = set()
    for name, p in bare_named(model):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)  # 4-bit packs two values a byte
        total += n
        if p.requires_grad:
            trainable += n
            if router_key(name) is not None:
                routers_n += n
    return {"total": total, "trainable": trainable, "routers": routers_n}
