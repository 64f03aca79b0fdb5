"""A tiny LLaVA-1.5-style model for the quickstart: small CLIP tower + small Llama decoder, pretrained dense.

The checkpoint is written with the same machinery as the test models (``pmod_convert.tiny``): a LlavaConfig,
safetensors weights, a word-level tokenizer whose vocabulary is the synthetic dataset's words (nothing is
downloaded), the PIL image processor and the LlavaProcessor with a chat template that closes assistant turns
with ``</s>``. Vision tokens dominate the sequence (64 image tokens for a 64 px image and 8 px patches, against
about 15 text tokens per question), so which of them a layer processes is what decides its cost.

``pretrain`` trains every parameter from random initialisation with AdamW on the answer tokens (labels from
``pmod_convert.data.SampleEncoder``), then writes the trained checkpoint atomically.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_folder, copy_processor_files
from ..errors import RecipeError

PADDING_SIDE = "right"


@dataclass
class TinyLlavaSettings:
    """Shape of the demo model. Defaults: 64 image tokens, a 6-layer decoder of width 128."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    vision_feature_layer: int = -1  # which tower output the projector reads (-1: the last layer)
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    mlp_ratio: int = 2

    def validate(self) -> TinyLlavaSettings:
        if self.image_size % self.patch_size:
            raise RecipeError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise RecipeError("hidden must be divisible by heads, and heads by kv_heads")
        if self.vision_hidden % self.vision_heads:
            raise RecipeError("vision_hidden must be divisible by vision_heads")
        if min(self.layers, self.vision_layers) < 1:
            raise RecipeError("the model needs at least one decoder and one vision layer")
        return self

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def overrides(self, vocab_size: int) -> dict[str, Any]:
        """``pmod_convert.tiny`` overrides for the llava family."""
        return dict(
            vocab_size=vocab_size, hidden_size=self.hidden, intermediate_size=self.mlp_ratio * self.hidden,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=512, vision_image_size=self.image_size, vision_patch_size=self.patch_size,
            vision_hidden_size=self.vision_hidden, vision_intermediate_size=4 * self.vision_hidden,
            vision_num_hidden_layers=self.vision_layers, vision_num_attention_heads=self.vision_heads,
            vision_projection_dim=self.vision_hidden,
            vision_feature_layer=self.vision_feature_layer,
        )


def vocab_size_for(words: Sequence[str]) -> int:
    from ..tiny import RESERVED

    return int(math.ceil((RESERVED + len(words)) / 16) * 16)


def build_checkpoint(path: str | Path, words: Sequence[str], settings: TinyLlavaSettings | None = None, *,
                     seed: int = 0, overwrite: bool = False) -> Path:
    """Write a randomly initialised demo checkpoint (weights, config, tokenizer over ``words``, processor)."""
    from ..tiny import save_tiny_checkpoint

    settings = (settings or TinyLlavaSettings()).validate()
    with atomic_folder(path, overwrite=overwrite) as tmp:
        save_tiny_checkpoint("llava", tmp, seed=seed, words=list(words), end_of_turn=True,
                             **settings.overrides(vocab_size_for(words)))
    return Path(path)


@dataclass
class PretrainSettings:
    """Dense pretraining: full parameters, AdamW, linear warm-up then cosine decay, answer-token loss."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3  # 2e-3 measured worse on the quickstart data (53.0% vs 55.5% dense test accuracy)
    min_lr_ratio: float = 0.05
    warmup_steps: int = 25
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0

    def validate(self) -> PretrainSettings:
        if self.steps < 1 or self.batch_size < 1:
            raise RecipeError("pretraining needs steps >= 1 and batch_size >= 1")
        if not self.lr > 0:
            raise RecipeError(f"pretraining lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise RecipeError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        return self

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _draw(order: list[int], size: int, n: int, rng: random.Random) -> list[int]:
    """The next ``n`` indices of a dataset of ``size`` samples, epoch after epoch in fresh random orders."""
    while len(order) < n:
        fresh = list(range(size))
        rng.shuffle(fresh)
        order += fresh
    chosen = order[:n]
    del order[:n]
    return chosen


@dataclass
class PretrainResult:
    path: Path
    steps: int
    losses: list[float]
    seconds: float
    samples: int
    settings: dict


def pretrain(checkpoint: str | Path, data: str | Path, image_folder: str | Path | None = None, *,
             out: str | Path, settings: PretrainSettings | None = None, overwrite: bool = False,
             progress: Callable[[int, int, float], None] | None = None) -> PretrainResult:
    """Train every parameter of CHECKPOINT on the answers of DATA (LLaVA-style) and write the result to OUT.

    ``progress(step, total, loss)`` is called after every optimizer step.
    """
    from ..api import load_dense
    from ..data import SampleEncoder, collate, model_inputs, read_samples

    settings = (settings or PretrainSettings()).validate()
    start = time.perf_counter()
    encoder = SampleEncoder.from_pretrained(checkpoint)
    items = [encoder.encode(s) for s in read_samples(data, image_folder).samples]
    torch.manual_seed(settings.seed)
    model = load_dense(checkpoint, dtype="float32")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, settings.lr_factor)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses = []
    for step in range(settings.steps):
        chosen = _draw(order, len(items), settings.batch_size, rng)
        batch = collate([items[i] for i in chosen], pad_token_id=encoder.pad_token_id, padding_side=PADDING_SIDE)
        loss = model(**model_inputs(batch), labels=batch["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, settings.steps, losses[-1])
    model.eval()
    with atomic_folder(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_processor_files(checkpoint, tmp)
    return PretrainResult(path=Path(out), steps=settings.steps, losses=losses, seconds=time.perf_counter() - start,
                          samples=len(items), settings=asdict(settings))
