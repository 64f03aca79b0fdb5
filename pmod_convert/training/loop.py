"""The training loop on accelerate: accumulation, clipping, AdamW + cosine warmup, checkpoints, resume, log.

One optimizer step = one window of ``grad_accum`` micro-batches per process. The LM loss of a window is the
summed token cross-entropy divided by the answer tokens of the window on all processes, so every answer token
weighs the same whatever micro-batch or process it lands in (DDP's gradient averaging is undone by scaling
with the number of processes).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import IGNORE, model_inputs
from ..devices import to_device
from ..errors import CheckpointError, RecipeError
from .checkpoints import (
    STATE_FILE,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .data import BatchPlan, TrainingData, iterate_windows
from .lora import load_trainable_state, parameter_groups, trainable_state
from .losses import lm_loss_sum, router_aux_loss
from .routing import RouterTaps, TextRouting
from .settings import FinetuneSettings

LOG_FILE = "log.jsonl"


@dataclass
class WindowResult:
    lm_sum: float = 0.0  # summed token CE over this process's micro-batches
    answer_tokens: int = 0
    aux_sum: float = 0.0  # summed per-micro-batch router losses
    aux_count: int = 0
    input_tokens: int = 0


def answer_token_count(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def forward_backward(model: nn.Module, micro_batches: Sequence[dict], settings: FinetuneSettings, *,
                     device: torch.device, loss_scale: float, taps: RouterTaps | None = None,
                     text_routing: TextRouting | None = None, accelerator: Any = None,
                     anchor: Sequence[torch.Tensor] = ()) -> WindowResult:
    """Forward and backward over one accumulation window; gradients are left in ``.grad``.

    ``loss_scale`` multiplies the summed LM loss (1 / answer tokens of the window, times the number of
    processes under DDP). ``anchor``: trainable parameters added to the loss with weight zero, so DDP sees a
    gradient for each of them even when a batch routes nothing (e.g. no image).
    """
    result = WindowResult()
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last or accelerator is None) else accelerator.no_sync(model)
        if text_routing is not None:
            text_routing.set_batch(batch["instruction_mask"], batch["attention_mask"])
        with sync:
            recording = taps.record() if taps is not None else contextlib.nullcontext()
            with recording:
                out = model(**model_inputs(batch), use_cache=False)
            lm_sum, count = lm_loss_sum(out.logits, batch["labels"])
            loss = lm_sum * loss_scale
            if taps is not None and settings.router_aux_coef > 0:
                aux = router_aux_loss(taps.records, batch["attention_mask"])
                if aux is not None:
                    loss = loss + settings.router_aux_coef * aux / len(micro_batches)
                    result.aux_sum += float(aux.detach())
                    result.aux_count += 1
                taps.records.clear()
            if anchor:
                loss = loss + 0.0 * sum(p.reshape(-1)[:1].sum() for p in anchor)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
        result.lm_sum += float(lm_sum.detach())
        result.answer_tokens += count
        result.input_tokens += int(batch["attention_mask"].sum())
    return result


def build_optimizer(model: nn.Module, settings: FinetuneSettings, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    groups = parameter_groups(model, settings)
    names = [g.pop("name") for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = math.ceil(settings.warmup_ratio * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler, names


def check_resumable(folder: Path, settings: FinetuneSettings) -> None:
    """A checkpoint can be resumed only with the settings that produced it (see ``RESUMABLE_CHANGES``)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"training checkpoint {folder} cannot be read ({exc}); delete it to resume from an "
                              "earlier one") from None
    saved = FinetuneSettings.from_dict(state.get("settings", {}), where=f"{folder}/{STATE_FILE}")
    changed = saved.differences(settings)
    if changed:
        raise RecipeError(f"cannot resume from {folder}: these settings differ from the interrupted run: "
                          f"{', '.join(changed)}; resume with the same settings")


@dataclass
class LoopResult:
    steps: int
    total_steps: int
    records: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    input_tokens: int = 0
    resumed_from: int | None = None


class TrainingLoop:
    """Runs the optimizer steps of one finetune on an already prepared model (see ``finetune.py``)."""

    def __init__(self, accelerator, model: nn.Module, data: TrainingData, settings: FinetuneSettings,
                 run_dir: Path, *, callbacks: Sequence[Callable[[dict, nn.Module], None]] = (),
                 show_progress: bool = True):
        self.accelerator = accelerator
        self.show_progress = show_progress
        self.data, self.settings, self.run_dir = data, settings, run_dir
        self.callbacks = list(callbacks)
        self.plan = BatchPlan(len(data), settings.batch_size, settings.grad_accum, accelerator.num_processes,
                              settings.seed)
        self.total_steps = self.plan.total_steps(settings.epochs, settings.max_steps)
        optimizer, self.scheduler, self.group_names = build_optimizer(model, settings, self.total_steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.trainable = [p for p in self._unique_trainable()]

    def _unique_trainable(self):
        seen: set[int] = set()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    # ---- resume ------------------------------------------------------------------------------------------------
    def resume_point(self, resume: bool) -> tuple[int, dict | None]:
        found = list_checkpoints(self.run_dir)
        if not resume:
            return 0, None
        if not found:
            raise CheckpointError(f"--resume: {self.run_dir} holds no training checkpoint; run without --resume "
                                  "(checkpoints are written every --save-steps steps)")
        folder = found[-1]
        ckpt = read_checkpoint(folder, self.accelerator.process_index, self.accelerator.num_processes)
        state = ckpt["state"]
        check_resumable(folder, self.settings)
        if state["data_fingerprint"] != self.data.fingerprint():
            raise RecipeError(f"cannot resume from {folder}: the training data differs from the interrupted run's "
                              f"({state['num_samples']} samples then, {len(self.data)} now)")
        load_trainable_state(self.model, ckpt["trainable"], where=str(folder))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        return int(state["step"]), ckpt

    def _read_log(self, upto: int) -> list[dict]:
        path = self.run_dir / LOG_FILE
        if not path.is_file():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in records if r["step"] <= upto]

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> LoopResult:
        acc, settings = self.accelerator, self.settings
        start, ckpt = self.resume_point(resume)
        records = self._read_log(start) if ckpt is not None else []
        train_seconds = float(ckpt["state"]["train_seconds"]) if ckpt else 0.0
        tokens_seen = int(ckpt["state"]["input_tokens"]) if ckpt else 0
        log_path = self.run_dir / LOG_FILE
        if acc.is_main_process:
            log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        if ckpt is not None:
            set_rng_state(ckpt["rng"])

        taps = RouterTaps(self.model) if settings.router_aux_coef > 0 else contextlib.nullcontext()
        text = TextRouting(self.model) if settings.route_text else contextlib.nullcontext()
        anchor = self.trainable if acc.num_processes > 1 else ()
        bar = tqdm(total=self.total_steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True,
                   disable=not (acc.is_main_process and self.show_progress))
        self.model.train()
        with taps as tap, text as text_routing, bar:
            t0 = time.perf_counter()  # step time includes reading and encoding its batches
            for step, epoch, window in iterate_windows(self.data, self.plan, start, self.total_steps,
                                                       acc.process_index, settings.num_workers):
                local = torch.tensor([sum(answer_token_count(b) for b in window)], dtype=torch.float64,
                                     device=acc.device)
                global_answers = float(acc.reduce(local, reduction="sum").item())
                scale = acc.num_processes / max(global_answers, 1.0)
                res = forward_backward(self.model, window, settings, device=acc.device, loss_scale=scale,
                                       taps=tap, text_routing=text_routing, accelerator=acc, anchor=anchor)
                grad_norm = None
                if settings.max_grad_norm is not None:
                    grad_norm = float(acc.clip_grad_norm_(self.trainable, settings.max_grad_norm))
                lrs = [g["lr"] for g in self.optimizer.param_groups]
                self.optimizer.step()
                if not acc.optimizer_step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                totals = acc.reduce(torch.tensor([res.lm_sum, res.aux_sum, res.aux_count, res.input_tokens],
                                                 dtype=torch.float64, device=acc.device), reduction="sum").tolist()
                seconds = time.perf_counter() - t0
                train_seconds += seconds
                tokens_seen += int(totals[3])
                record = {
                    "step": step + 1, "epoch": epoch, "loss": totals[0] / max(global_answers, 1.0),
                    "router_aux_loss": totals[1] / totals[2] if totals[2] else None,
                    "grad_norm": grad_norm, "answer_tokens": int(global_answers), "input_tokens": int(totals[3]),
                    "tokens_per_s": totals[3] / seconds if seconds > 0 else None, "step_seconds": seconds,
                    "elapsed_seconds": train_seconds,
                    **{f"lr_{name}": lr for name, lr in zip(self.group_names, lrs)},
                }
                records.append(record)
                if acc.is_main_process and ((step + 1) % settings.log_steps == 0 or step + 1 == self.total_steps):
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s'] or 0:.0f}")
                done = step + 1
                if settings.save_steps and done % settings.save_steps == 0 and done < self.total_steps:
                    self._save(done, epoch, train_seconds, tokens_seen)
                for callback in self.callbacks:
                    callback(record, acc.unwrap_model(self.model))
                t0 = time.perf_counter()
        return LoopResult(steps=len(records), total_steps=self.total_steps, records=records,
                          train_seconds=train_seconds, input_tokens=tokens_seen,
                          resumed_from=start if ckpt is not None else None)

    def _save(self, step: int, epoch: int, train_seconds: float, tokens_seen: int) -> None:
        acc = self.accelerator
        state = {
            "step": step, "epoch": epoch, "total_steps": self.total_steps,
            "next_micro_batch": self.plan.window(step)[1].start if step < self.total_steps else None,
            "settings": self.settings.to_dict(), "data_fingerprint": self.data.fingerprint(),
            "num_samples": len(self.data), "num_processes": acc.num_processes,
            "train_seconds": train_seconds, "input_tokens": tokens_seen,
        }
        save_checkpoint(acc, self.run_dir, step, trainable=trainable_state(self.model) if acc.is_main_process else {},
                        optimizer=self.optimizer, scheduler=self.scheduler, state=state,
                        keep=self.settings.keep_checkpoints)
