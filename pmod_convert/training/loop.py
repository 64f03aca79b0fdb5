"""The training loop on accelerate: accumulation, clipping, AdamW + cosine warmup, validation, checkpoints, log.

One optimizer step = one window of micro-batches per process (``FinetuneSettings.accumulation``). The loss of
a window is a sum over tokens divided by the tokens of the window on all processes, so every token weighs the
same whatever micro-batch or process it lands in (DDP's gradient averaging is undone by scaling with the
number of processes). The objective (``settings.loss``):

* ``kl``: KL(dense teacher || student) at the distilled positions (``distill.Teacher``: same weights, routing
  and LoRA off), divided by the window's distilled positions;
* ``ce``: label cross-entropy divided by the window's answer tokens;
* ``mix``: ``kl + ce_weight * ce``.

Routers also get ``router_rank_coef`` times the teacher-attention ranking loss (``losses.router_rank_loss``),
averaged over micro-batches. After the steps of ``validation.eval_schedule`` the main process validates the
model and keeps the best trainable state (the input's counts as step 0) in ``RUN_DIR/best.safetensors``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import IGNORE, model_inputs, routed_model_inputs
from ..devices import to_device
from ..errors import CheckpointError, RecipeError
from ..progress import Progress
from .checkpoints import (
    STATE_FILE,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .data import BatchPlan, TrainingData, iterate_windows
from .lora import load_trainable_state, parameter_groups, trainable_state
from .losses import (
    distill_loss_sum,
    distill_positions,
    lm_loss_sum,
    logit_positions,
    rank_terms,
    router_aux_loss,
    router_rank_loss,
)
from .routing import RouterTaps, TextRouting
from .settings import FinetuneSettings

LOG_FILE = "log.jsonl"
VALIDATION_LOG = "validation.jsonl"
BEST_FILE = "best.safetensors"


@dataclass
class WindowResult:
    lm_sum: float = 0.0  # summed token CE over this process's micro-batches
    answer_tokens: int = 0
    kl_sum: float = 0.0  # summed distillation KL over the distilled positions
    distill_tokens: int = 0
    aux_sum: float = 0.0  # summed per-micro-batch router losses
    aux_count: int = 0
    rank_sum: float = 0.0  # summed per-micro-batch router ranking losses
    rank_count: int = 0
    input_tokens: int = 0


def answer_token_count(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@dataclass
class Scales:
    """Per-token weights of one window's summed losses (1 / tokens of the window on all processes, times
    the number of processes under DDP); 0 for a loss the objective does not use."""

    ce: float
    kl: float
    rank: float = 0.0

    @classmethod
    def for_window(cls, settings: FinetuneSettings, answers: float, distilled: float, ranked: float, *,
                   use_kl: bool, use_rank: bool, processes: int = 1) -> "Scales":
        """The weights of a window with ``answers`` answer tokens, ``distilled`` distilled positions and
        ``ranked`` (layer, row) ranking terms summed over ``processes``: the label cross-entropy weighs
        1 (``ce``, or no teacher), ``ce_weight`` (``mix``) or 0 (``kl``): :meth:`label_weight`."""
        return cls(ce=cls.label_weight(settings, use_kl) * processes / max(answers, 1.0),
                   kl=processes / max(distilled, 1.0) if use_kl else 0.0,
                   rank=processes / max(ranked, 1.0) if use_rank else 0.0)

    @staticmethod
    def label_weight(settings: FinetuneSettings, use_kl: bool) -> float:
        """Weight of the label cross-entropy next to the distillation term (1 without a teacher)."""
        return {"ce": 1.0, "mix": settings.ce_weight, "kl": 0.0}[settings.loss] if use_kl else 1.0


def forward_backward(model: nn.Module, micro_batches: Sequence[dict], settings: FinetuneSettings, *,
                     device: torch.device, scales: Scales, taps: RouterTaps | None = None,
                     text_routing: TextRouting | None = None, accelerator: Any = None,
                     anchor: Sequence[torch.Tensor] = (), teacher: Any = None,
                     vision_ids: Sequence[int] = ()) -> WindowResult:
    """Forward and backward over one accumulation window; gradients are left in ``.grad``.

    ``scales`` weigh the summed CE and KL (see :class:`Scales`). ``teacher``: a ``distill.Teacher`` (needed
    for ``kl``/``mix`` and the router ranking loss; its pass runs first, without gradient). ``anchor``:
    trainable parameters added to the loss with weight zero, so DDP sees a gradient for each of them even
    when a batch routes nothing (e.g. no image).
    """
    result = WindowResult()
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last or accelerator is None) else accelerator.no_sync(model)
        inputs = model_inputs(batch)
        distilled = teacher is not None and scales.kl > 0
        where = distill_positions(batch["labels"], batch["input_ids"], batch["attention_mask"], vision_ids,
                                  settings.distill_positions) if distilled else None
        # logits only where a loss reads them (answer / distilled positions): no lm_head on prompt and image
        kept = logit_positions(batch["labels"], where)
        # (a teacher kept only for the ranking targets computes no logits: an empty selection)
        teacher_logits = None if teacher is None else teacher.forward(
            inputs, where if where is not None else torch.zeros_like(kept[:, :-1]))
        if text_routing is not None:
            text_routing.set_batch(batch["instruction_mask"], batch["attention_mask"])
        with sync:
            recording = taps.record() if taps is not None else contextlib.nullcontext()
            with recording:
                out = model(**routed_model_inputs(batch), use_cache=False, logits_to_keep=kept)
            lm_sum, count = lm_loss_sum(out.logits, batch["labels"], kept)
            loss = lm_sum * scales.ce
            if distilled:
                kl_sum, n_kl = distill_loss_sum(out.logits, teacher_logits, where, settings.distill_temperature,
                                                kept)
                loss = loss + kl_sum * scales.kl
                result.kl_sum += float(kl_sum.detach())
                result.distill_tokens += n_kl
            if taps is not None and settings.router_aux_coef > 0:
                aux = router_aux_loss(taps.records, batch["attention_mask"])
                if aux is not None:
                    loss = loss + settings.router_aux_coef * aux / len(micro_batches)
                    result.aux_sum += float(aux.detach())
                    result.aux_count += 1
            if taps is not None and teacher is not None and scales.rank > 0:
                vision = torch.isin(batch["input_ids"], torch.tensor(list(vision_ids), device=device))
                rank, n_rank = router_rank_loss(taps.records, teacher.received, vision)
                if rank is not None:
                    loss = loss + settings.router_rank_coef * rank * scales.rank
                    result.rank_sum += float(rank.detach())
                    result.rank_count += n_rank
            if taps is not None:
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
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)  # every group sets its own lr
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
        was, now = saved.to_dict(), settings.to_dict()
        what = ", ".join(f"{k} (run: {was[k]!r}, now: {now[k]!r})" for k in changed)
        raise RecipeError(f"cannot resume from {folder}: these settings differ from the interrupted run: {what}; "
                          "resume with the run's values (a default may have changed since: pass it explicitly)")


@dataclass
class LoopResult:
    steps: int
    total_steps: int
    records: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    input_tokens: int = 0
    resumed_from: int | None = None
    validations: list[dict] = field(default_factory=list)  # validation records, step 0 = the input model
    best: dict | None = None  # the best validation record (its weights are in RUN_DIR/best.safetensors)
    grad_accum: int = 1
    epochs: int = 1


def save_best(run_dir: Path, state: dict[str, torch.Tensor], record: dict) -> None:
    """The best trainable state so far and its validation record (written via a temporary name)."""
    from safetensors.torch import save_file

    tmp = run_dir / (BEST_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"record": json.dumps(record)})
    os.replace(tmp, run_dir / BEST_FILE)


def load_best(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / BEST_FILE))


class TrainingLoop:
    """Runs the optimizer steps of one finetune on an already prepared model (see ``finetune.py``).

    ``teacher``: a ``distill.Teacher`` of ``model`` (None: label cross-entropy only, no ranking loss).
    ``validator``: a ``validation.Validator`` (main process only; None elsewhere or without validation).
    """

    def __init__(self, accelerator, model: nn.Module, data: TrainingData, settings: FinetuneSettings,
                 run_dir: Path, *, callbacks: Sequence[Callable[[dict, nn.Module], None]] = (),
                 show_progress: bool = True, teacher: Any = None, validator: Any = None,
                 vision_ids: Sequence[int] = ()):
        self.accelerator = accelerator
        self.show_progress = show_progress
        self.data, self.settings, self.run_dir = data, settings, run_dir
        self.callbacks = list(callbacks)
        self.teacher, self.validator, self.vision_ids = teacher, validator, list(vision_ids)
        self.grad_accum = settings.accumulation(len(data), accelerator.num_processes)
        self.plan = BatchPlan(len(data), settings.batch_size, self.grad_accum, accelerator.num_processes,
                              settings.seed)
        self.epochs = settings.epochs_for(self.plan.steps_per_epoch)
        self.total_steps = self.plan.total_steps(self.epochs, settings.max_steps)
        optimizer, self.scheduler, self.group_names = build_optimizer(model, settings, self.total_steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.trainable = [p for p in self._unique_trainable()]
        self.validations: list[dict] = []
        self.best: dict | None = None  # the best validation record so far

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

    def _read_log(self, name: str, upto: int) -> list[dict]:
        path = self.run_dir / name
        if not path.is_file():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in records if r["step"] <= upto]

    # ---- validation --------------------------------------------------------------------------------------------
    def validate(self, step: int) -> None:
        """Validate on the main process; a new best's trainable state goes to ``RUN_DIR/best.safetensors``."""
        from .validation import ValidationResult, better

        acc = self.accelerator
        if self.validator is not None and acc.is_main_process:
            result = self.validator.run(acc.unwrap_model(self.model), step)
            record = result.to_dict()
            previous = ValidationResult.from_dict(self.best) if self.best is not None else None
            start = next((ValidationResult.from_dict(v) for v in self.validations if v["step"] == 0), None)
            record["best"] = previous is None or better(result, previous, self.settings.select_by, start)
            if record["best"]:
                self.best = record
                save_best(self.run_dir, trainable_state(self.model), record)
            self.validations.append(record)
            with (self.run_dir / VALIDATION_LOG).open("a") as f:
                f.write(json.dumps(record) + "\n")
        acc.wait_for_everyone()

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> LoopResult:
        from .validation import eval_schedule

        acc, settings = self.accelerator, self.settings
        start, ckpt = self.resume_point(resume)
        records = self._read_log(LOG_FILE, start) if ckpt is not None else []
        self.validations = self._read_log(VALIDATION_LOG, start) if ckpt is not None else []
        best = [v for v in self.validations if v.get("best")]
        self.best = best[-1] if best else None
        train_seconds = float(ckpt["state"]["train_seconds"]) if ckpt else 0.0
        tokens_seen = int(ckpt["state"]["input_tokens"]) if ckpt else 0
        log_path = self.run_dir / LOG_FILE
        if acc.is_main_process:
            log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
            (self.run_dir / VALIDATION_LOG).write_text("".join(json.dumps(r) + "\n" for r in self.validations))
        if ckpt is None:
            self.validate(0)  # the input model: what the finetune must beat
        if ckpt is not None:
            saved_best = list_checkpoints(self.run_dir)[-1] / BEST_FILE
            if acc.is_main_process and saved_best.is_file():  # a killed run may have found a later best
                shutil.copyfile(saved_best, self.run_dir / BEST_FILE)
            set_rng_state(ckpt["rng"])
        checks = eval_schedule(self.total_steps, settings.eval_steps)

        need_taps = settings.router_aux_coef > 0 or (
            self.teacher is not None and self.teacher.attention and settings.router_rank_coef > 0)
        taps = RouterTaps(self.model) if need_taps else contextlib.nullcontext()
        text = TextRouting(self.model) if settings.route_text else contextlib.nullcontext()
        anchor = self.trainable if acc.num_processes > 1 else ()
        use_kl = settings.loss in ("kl", "mix") and self.teacher is not None
        use_rank = self.teacher is not None and self.teacher.attention and settings.router_rank_coef > 0
        n_mod = len(self.teacher.layers) if self.teacher is not None else 0
        ce_weight = Scales.label_weight(settings, use_kl)
        bar = Progress(total=self.total_steps, initial=start, desc="finetune", unit="step",
                       disable=not (acc.is_main_process and self.show_progress))
        self.model.train()
        with taps as tap, text as text_routing, bar:
            t0 = time.perf_counter()  # step time includes reading and encoding its batches
            for step, epoch, window in iterate_windows(self.data, self.plan, start, self.total_steps,
                                                       acc.process_index, settings.num_workers):
                local = torch.tensor([sum(answer_token_count(b) for b in window),
                                      sum(int(distill_positions(b["labels"], b["input_ids"], b["attention_mask"],
                                                                self.vision_ids, settings.distill_positions).sum())
                                          for b in window) if use_kl else 0,
                                      sum(rank_terms(b["input_ids"], self.vision_ids, n_mod) for b in window)
                                      if use_rank else 0],
                                     dtype=torch.float64, device=acc.device)
                global_answers, global_distill, global_rank = acc.reduce(local, reduction="sum").tolist()
                scales = Scales.for_window(settings, global_answers, global_distill, global_rank, use_kl=use_kl,
                                           use_rank=use_rank, processes=acc.num_processes)
                res = forward_backward(self.model, window, settings, device=acc.device, scales=scales,
                                       taps=tap, text_routing=text_routing, accelerator=acc, anchor=anchor,
                                       teacher=self.teacher, vision_ids=self.vision_ids)
                grad_norm = float(acc.clip_grad_norm_(self.trainable, settings.max_grad_norm or float("inf")))
                totals = acc.reduce(torch.tensor([res.lm_sum, res.aux_sum, res.aux_count, res.input_tokens,
                                                  res.kl_sum, res.rank_sum, res.rank_count],
                                                 dtype=torch.float64, device=acc.device), reduction="sum").tolist()
                if not all(math.isfinite(v) for v in (*totals, grad_norm)):
                    self._stop_non_finite(step + 1, totals, grad_norm)
                lrs = [g["lr"] for g in self.optimizer.param_groups]
                self.optimizer.step()
                if not acc.optimizer_step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - t0
                train_seconds += seconds
                tokens_seen += int(totals[3])
                ce = totals[0] / max(global_answers, 1.0)
                kl = totals[4] / max(global_distill, 1.0) if use_kl else None
                record = {
                    "step": step + 1, "epoch": epoch,
                    "loss": (kl + ce_weight * ce) if use_kl else ce, "ce": ce, "kl": kl,
                    "router_rank_loss": totals[5] / totals[6] if totals[6] else None,  # per (layer, row)
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
                if done in checks:
                    self.validate(done)
                    if self.best is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", val_acc=f"{self.validations[-1]['accuracy']:.3f}")
                if settings.save_steps and done % settings.save_steps == 0 and done < self.total_steps:
                    self._save(done, epoch, train_seconds, tokens_seen)
                for callback in self.callbacks:
                    callback(record, acc.unwrap_model(self.model))
                t0 = time.perf_counter()
        return LoopResult(steps=len(records), total_steps=self.total_steps, records=records,
                          train_seconds=train_seconds, input_tokens=tokens_seen,
                          resumed_from=start if ckpt is not None else None, validations=self.validations,
                          best=self.best, grad_accum=self.grad_accum, epochs=self.epochs)

    def _stop_non_finite(self, step: int, totals: list[float], grad_norm: float) -> None:
        """Raise before a non-finite update reaches the weights (every process sees the same reduced totals)."""
        found = list_checkpoints(self.run_dir)
        where = (f"the last resumable checkpoint is {found[-1]}" if found else
                 "no resumable checkpoint was written yet")
        what = "gradient norm" if all(math.isfinite(v) for v in totals) else "loss"
        raise RecipeError(f"training stopped at step {step}: the {what} is not finite "
                          f"(loss sums {totals[0]:.4g} CE / {totals[4]:.4g} KL, gradient norm {grad_norm:.4g}); "
                          f"no output was written and {where}; lower --lr / --router-lr (or --distill-temperature, "
                          f"now {self.settings.distill_temperature:g}) or check the data")

    def _save(self, step: int, epoch: int, train_seconds: float, tokens_seen: int) -> None:
        acc = self.accelerator
        state = {
            "step": step, "epoch": epoch, "total_steps": self.total_steps,
            "next_micro_batch": self.plan.window(step)[1].start if step < self.total_steps else None,
            "settings": self.settings.to_dict(), "data_fingerprint": self.data.fingerprint(),
            "num_samples": len(self.data), "num_processes": acc.num_processes,
            "train_seconds": train_seconds, "input_tokens": tokens_seen,
        }
        final = save_checkpoint(acc, self.run_dir, step,
                                trainable=trainable_state(self.model) if acc.is_main_process else {},
                                optimizer=self.optimizer, scheduler=self.scheduler, state=state,
                                keep=self.settings.keep_checkpoints)
        best = self.run_dir / BEST_FILE
        if acc.is_main_process and best.is_file():  # the best state as of this step, for --resume
            shutil.copyfile(best, final / (BEST_FILE + ".tmp"))
            os.replace(final / (BEST_FILE + ".tmp"), final / BEST_FILE)
        acc.wait_for_everyone()
