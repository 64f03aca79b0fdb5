"""The settings of one finetune run: a dataclass with a strict YAML form (saved as ``finetune.yaml``)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from ..recipe import build_settings, read_yaml_mapping

MIXED_PRECISION = ("no", "bf16", "fp16")
LOSSES = ("kl", "ce", "mix")
DISTILL_POSITIONS = ("answer", "text")
SELECT_BY = ("accuracy", "kl")
DTYPES = ("auto", "float32", "float16", "bfloat16")

# Settings that may change when a run is resumed: none of them changes the computed weights. (max_steps
# and epochs may not: they set the length of the cosine schedule.)
RESUMABLE_CHANGES = ("save_steps", "keep_checkpoints", "log_steps", "stats_samples", "num_workers", "strict")


@dataclass
class FinetuneSettings:
    """Everything that defines a finetune run (LoRA r 8 / alpha 16; objective, lrs and batch by measurement)."""

    # LoRA on the language model (lora_r = 0: routers (and nothing else) are trained, no peft adapter)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str | None = None  # peft target_modules regex; None: the family's lora_target_regex
    train_projector: bool = False  # the vision-language projector fully trainable (peft modules_to_save)
    qlora: bool = False  # base language model quantized to 4-bit nf4 with bitsandbytes
    dtype: str = "auto"  # dtype the base weights are loaded in (QLoRA: the compute dtype)

    # Objective (see docs/finetuning.md). The teacher is the same weights run dense: routing off, LoRA off.
    # kl: KL(dense teacher || student); ce: label cross-entropy; mix: kl + ce_weight * ce. mix by measurement: on
    # the accuracy benchmark's six models at 0.55 FLOPs (2,000 dev questions each) it matched or beat kl on all
    # six, +0.9 point on oddone s1 (docs/finetuning.md, defaults table)
    loss: str = "mix"
    ce_weight: float = 0.5  # weight of the label cross-entropy in "mix"
    # Softmax temperature of teacher and student (loss scaled by T^2). 2, measured (docs/finetuning.md): a dense
    # model is near-certain on rows like its training data, so at T = 1 the KL there is ~1e-4 and says little;
    # softened, the teacher's margins carry the signal (object s3 at 0.55 FLOPs: 95.75 -> 98.25, dense 98.25).
    # T = 4 did as well on 4 of 5 models and lost 1.25 points on the fifth (oddone s4: 96.25 -> 95.0).
    distill_temperature: float = 2.0
    distill_positions: str = "answer"  # answer: labelled positions; text: every text position after the image
    router_rank_coef: float = 1.0  # teacher-attention ranking loss on every router (0: off)

    # Routing during training
    router_aux_coef: float = 0.0  # gamma-MoD router loss: BCE(router logits, top-k selection); ~0.01
    route_text: bool = False  # gamma-MoD masked routing learning: answer text is routed too, instructions never
    shared_router: bool = False  # one router (the same parameters) in every MoD layer

    # Optimisation (defaults chosen on benchmarks/accuracy.py; see docs/finetuning.md)
    lr: float | None = None  # LoRA / projector; None: sized from the hidden size (see learning_rates)
    router_lr: float | None = None  # None: half the LoRA lr, zero routers only (calibrated ones stay fixed)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    epochs: int | None = None  # None: enough epochs for about 360 optimizer steps, at most 6 (see epochs_for)
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 1  # per process
    grad_accum: int | None = None  # None: sized from the data to reach an effective batch of about 16
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False

    # Validation and model selection
    val_fraction: float = 0.1  # share of the training rows held out when no val_data is given (measured: 5% too few)
    val_min: int = 32  # held-out rows at least (fewer rows than 2 * val_min: validate on training rows)
    val_max: int = 256  # held-out rows at most
    eval_steps: int | None = None  # validate every N optimizer steps (None: about 8 times per run)
    select_by: str = "kl"  # kl: lowest KL to dense; accuracy: greedy accuracy, ties by agreement then KL
    keep_best: bool = True  # output the best validated weights (the input's when nothing beat them)
    strict: bool = False  # exit non-zero when the finetune could not beat its input on validation
    val_max_new_tokens: int = 16

    # Data
    skip_bad_rows: bool = False
    max_length: int | None = None  # longer samples are bad rows (truncating would cut image tokens)
    limit: int | None = None  # use the first N usable rows only
    num_workers: int = 0

    # Bookkeeping
    save_steps: int = 200  # a resumable checkpoint every N optimizer steps (0: none)
    keep_checkpoints: int = 2
    log_steps: int = 1
    stats_samples: int = 64  # training samples the final router statistics are measured on

    def validate(self) -> FinetuneSettings:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise RecipeError(message)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "float" in str(f.type) and isinstance(value, float):
                need(math.isfinite(value), f"{f.name} must be a finite number, got {value}")
        need(self.lora_r >= 0, f"lora_r must be >= 0 (0 trains the routers only), got {self.lora_r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None:
            try:
                re.compile(self.lora_targets)
            except re.error as exc:
                raise RecipeError(f"lora_targets is not a valid regular expression ({exc})") from None
        need(not (self.train_projector and self.lora_r == 0),
             "train_projector needs a LoRA adapter to be saved with (set lora_r >= 1)")
        need(not (self.qlora and self.lora_r == 0), "qlora trains LoRA adapters on a 4-bit base; set lora_r >= 1")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(self.router_aux_coef >= 0, f"router_aux_coef must be >= 0, got {self.router_aux_coef}")
        need(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        need(self.ce_weight >= 0, f"ce_weight must be >= 0, got {self.ce_weight}")
        need(self.distill_temperature > 0, f"distill_temperature must be > 0, got {self.distill_temperature}")
        need(self.distill_positions in DISTILL_POSITIONS,
             f"distill_positions must be one of {', '.join(DISTILL_POSITIONS)}, got {self.distill_positions!r}")
        need(self.router_rank_coef >= 0, f"router_rank_coef must be >= 0, got {self.router_rank_coef}")
        need(self.lr is None or self.lr >= 0, f"lr must be >= 0 (0 changes nothing), got {self.lr}")
        need(self.router_lr is None or self.router_lr >= 0, f"router_lr must be >= 0, got {self.router_lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be > 0 (or null for no clipping), got {self.max_grad_norm}")
        need(self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum is None or self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(0.0 <= self.val_fraction < 0.5, f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        need(self.val_min >= 1 and self.val_max >= self.val_min,
             f"need 1 <= val_min <= val_max, got {self.val_min} and {self.val_max}")
        need(self.eval_steps is None or self.eval_steps >= 1, f"eval_steps must be >= 1, got {self.eval_steps}")
        need(self.select_by in SELECT_BY, f"select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}")
        need(self.val_max_new_tokens >= 1, f"val_max_new_tokens must be >= 1, got {self.val_max_new_tokens}")
        need(self.mixed_precision in MIXED_PRECISION,
             f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        need(self.max_length is None or self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        need(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.save_steps >= 0, f"save_steps must be >= 0 (0: no intermediate checkpoints), got {self.save_steps}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.log_steps >= 1, f"log_steps must be >= 1, got {self.log_steps}")
        need(self.stats_samples >= 0, f"stats_samples must be >= 0, got {self.stats_samples}")
        return self

    def learning_rates(self, hidden_size: int) -> tuple[float, float]:
        """``(LoRA lr, router lr)`` for a language model of width ``hidden_size``.

        Default LoRA lr: ``2e-4 * sqrt(4096 / hidden_size)``. It passes through the QLoRA paper's 2e-4 for
        7B models (hidden 4096; Dettmers et al. 2023) and gives 1.3e-3-1.6e-3 at hidden 64-96, where
        ``benchmarks/accuracy.py`` measured 1e-3-2e-3 as best (docs/finetuning.md); the inverse square root of
        the width is the usual rule for Adam learning rates across widths. Default router lr: half the LoRA
        lr (measured: the router's top-k selection moves discontinuously, and a router lr as high as the
        LoRA lr raised the distillation KL later in the run).
        """
        lr = self.lr if self.lr is not None else 2e-4 * (4096 / max(int(hidden_size), 1)) ** 0.5
        return lr, (self.router_lr if self.router_lr is not None else lr / 2)

    def epochs_for(self, steps_per_epoch: int) -> int:
        """``epochs``, or when None: ``min(6, ceil(360 / steps_per_epoch))`` (at least 1).

        Measured on benchmarks/accuracy.py (1,000 rows, 57 steps an epoch at batch 16, 0.55 decoder FLOPs, test
        accuracy on 400 questions): one epoch left the odd-one-out model 12.8 points below dense, three brought
        it within 2 points; six (342 steps) against three on the calibrated checkpoints of the benchmark:
        oddone s0 96.75 -> 97.25 (dense 97.25), s1 94.5 -> 94.75 (96.5), s4 96.0 -> 96.75 (96.75), object s1
        93.5 -> 93.5 (93.25). A large dataset gets one epoch.
        """
        if self.epochs is not None:
            return self.epochs
        return max(1, min(6, -(-360 // max(int(steps_per_epoch), 1))))

    def accumulation(self, train_samples: int, num_processes: int = 1) -> int:
        """Micro-batches per optimizer step: ``grad_accum``, or sized from the data when it is None.

        Auto: an effective batch (samples per optimizer step over all processes) of 16, lowered so that a
        run over ``train_samples`` still has at least 16 optimizer steps per epoch. Batch 1 steps on two
        answer tokens per row swing the loss by three orders of magnitude; see docs/finetuning.md.
        """
        if self.grad_accum is not None:
            return self.grad_accum
        per_micro = self.batch_size * num_processes
        effective = max(1, min(16, train_samples // 16))
        return max(1, -(-effective // per_micro))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "finetune settings") -> FinetuneSettings:
        return build_settings(cls, data, where).validate()

    @classmethod
    def load(cls, path: str | Path) -> FinetuneSettings:
        return cls.from_dict(read_yaml_mapping(path, "finetune settings"), where=str(path))

    def differences(self, other: FinetuneSettings) -> list[str]:
        """Settings that differ from ``other`` and would make a resumed run differ from an uninterrupted one."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]]

    def replace(self, **changes: Any) -> FinetuneSettings:
        return dataclasses.replace(self, **changes).validate()
