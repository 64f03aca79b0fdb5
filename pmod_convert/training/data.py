"""Training data: the shared loader (``pmod_convert.data``), a checking pass, and a resumable batch order.

The order of micro-batches is a pure function of (seed, epoch, batch size, number of processes), so a
resumed run can start at any micro-batch without replaying a sampler, and every process gets the same
number of micro-batches (the epoch is padded by wrapping around, as distributed samplers do).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from ..progress import progress as tqdm  # ETA on a terminal, periodic lines when piped

from ..data import IGNORE, DataError, Sample, SampleEncoder, collate, read_samples
from .settings import FinetuneSettings

PADDING_SIDE = "right"
CACHE_BYTES = 256 * 2**20  # encoded samples are kept in memory when all of them fit in this


@dataclass
class TrainingData:
    samples: list[Sample]
    encoder: SampleEncoder
    source: Path
    lengths: list[int]  # tokens per sample
    answer_tokens: list[int]  # labelled tokens per sample
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    cache: list[dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """Identifies the usable samples and their order (a resumed run must see the same data)."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(json.dumps([s.id, s.row, [p.name for p in s.images], s.turns]).encode())
        return h.hexdigest()[:16]

    def encode(self, index: int) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            return self.cache[index]
        return self.encoder.encode(self.samples[index])

    def subset(self, indices: list[int]) -> TrainingData:
        """The samples at ``indices`` (in that order), sharing encoder and cache entries."""
        return TrainingData(samples=[self.samples[i] for i in indices], encoder=self.encoder, source=self.source,
                            lengths=[self.lengths[i] for i in indices],
                            answer_tokens=[self.answer_tokens[i] for i in indices], skipped=self.skipped,
                            skipped_reasons=self.skipped_reasons,
                            cache=[self.cache[i] for i in indices] if self.cache is not None else None)


def split_validation(data: TrainingData, settings: FinetuneSettings) -> tuple[TrainingData, TrainingData, str]:
    """``(train, validation, how)``: a seeded held-out share of the rows, or training rows when too few.

    Held out: ``clamp(round(val_fraction * n), val_min, val_max)`` rows when ``n >= 2 * val_min`` and
    ``val_fraction > 0``; the rest train. Otherwise nothing is held out and the first ``min(n, val_min)``
    training rows are validated on (``how`` says so; the finetune's summary and last line repeat it).
    """
    n = len(data)
    if settings.val_fraction > 0 and n >= 2 * settings.val_min:
        k = min(settings.val_max, max(settings.val_min, round(settings.val_fraction * n)))
        g = torch.Generator().manual_seed(settings.seed * 7_919 + 17)
        order = torch.randperm(n, generator=g).tolist()
        held = sorted(order[:k])
        chosen = set(held)
        return data.subset([i for i in range(n) if i not in chosen]), data.subset(held), \
            f"{k} held-out training rows"
    k = min(n, settings.val_min)
    why = "--val-fraction 0: none held out" if settings.val_fraction == 0 else \
        "too few rows to hold any out; pass --val-data"
    return data, data.subset(list(range(k))), f"{k} training rows ({why})"


def load_training_data(data: str | Path, image_folder: str | Path | None, checkpoint: str | Path,
                       settings: FinetuneSettings, *, show_progress: bool = True,
                       allow_outside_images: bool = False) -> TrainingData:
    """Read the rows and encode every sample once, so bad rows fail (or are skipped) before training starts.

    Image paths must stay inside ``image_folder`` unless ``allow_outside_images``."""
    dataset = read_samples(data, image_folder, skip_bad_rows=settings.skip_bad_rows,
                           allow_outside_images=allow_outside_images)
    encoder = SampleEncoder.from_pretrained(checkpoint)
    kept: list[Sample] = []
    lengths, answers, reasons = [], [], list(dataset.skipped_reasons)
    items: list[dict[str, torch.Tensor]] = []
    size = 0
    for sample in tqdm(dataset.samples, desc="checking samples", unit="sample", disable=not show_progress,
                       leave=False):
        try:
            item = encoder.encode_checked(sample, settings.max_length)
        except DataError as exc:
            message = f"{dataset.source} row {sample.row} (id {sample.id!r}): {exc}"
            if not settings.skip_bad_rows:
                raise DataError(f"{message}; fix the row or pass --skip-bad-rows") from None
            reasons.append(message)
            continue
        kept.append(sample)
        lengths.append(int(item["input_ids"].shape[-1]))
        answers.append(int((item["labels"] != IGNORE).sum()))
        if size <= CACHE_BYTES:
            items.append(item)
            size += sum(v.numel() * v.element_size() for v in item.values())
        if settings.limit is not None and len(kept) >= settings.limit:
            break
    if not kept:
        raise DataError(f"{dataset.source} has no usable samples ({len(reasons)} bad rows skipped)")
    cache = items if size <= CACHE_BYTES else None
    return TrainingData(samples=kept, encoder=encoder, source=dataset.source, lengths=lengths, answer_tokens=answers,
                        skipped=len(reasons), skipped_reasons=reasons, cache=cache)


# ---- batch order ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """Which samples each process reads, micro-batch by micro-batch, epoch by epoch."""

    num_samples: int
    batch_size: int
    grad_accum: int
    num_processes: int
    seed: int

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / (self.batch_size * self.num_processes))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.grad_accum)

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else epochs * self.steps_per_epoch

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        need = self.micro_batches_per_epoch * self.batch_size * self.num_processes
        return (order * math.ceil(need / len(order)))[:need]

    def micro_batch(self, order: list[int], micro: int, rank: int) -> list[int]:
        """Global micro-batch ``micro`` covers ``batch_size * num_processes`` samples; rank r reads its slice."""
        start = (micro * self.num_processes + rank) * self.batch_size
        return order[start:start + self.batch_size]

    def window(self, step: int) -> tuple[int, range]:
        """(epoch, micro-batch indices) of optimizer step ``step`` (0-based)."""
        epoch, w = divmod(step, self.steps_per_epoch)
        first = w * self.grad_accum
        return epoch, range(first, min(first + self.grad_accum, self.micro_batches_per_epoch))


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, data: TrainingData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.data.encode(index)


def _collate(items: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    return collate(items, pad_token_id=pad_token_id, padding_side=PADDING_SIDE)


def iterate_windows(data: TrainingData, plan: BatchPlan, start_step: int, total_steps: int, rank: int,
                    num_workers: int = 0) -> Iterator[tuple[int, int, list[dict[str, torch.Tensor]]]]:
    """Yield ``(step, epoch, micro-batches)`` for optimizer steps ``start_step .. total_steps - 1`` of ``rank``."""
    dataset = _Encoded(data)
    collate_fn = partial(_collate, pad_token_id=data.encoder.pad_token_id)
    step = start_step
    while step < total_steps:
        epoch, _ = plan.window(step)
        order = plan.epoch_order(epoch)
        last = min(total_steps, (epoch + 1) * plan.steps_per_epoch)  # steps of this epoch still to run
        windows = [plan.window(s)[1] for s in range(step, last)]
        batches = [plan.micro_batch(order, m, rank) for w in windows for m in w]
        # Its own generator: iter(DataLoader) draws a worker base seed, which from the global RNG would shift
        # every later random number (LoRA dropout) of a run resumed mid-epoch against an uninterrupted one.
        seed = torch.Generator().manual_seed(plan.seed * 1_000_003 + epoch * 7_919)
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=num_workers,
                            generator=seed)
        it = iter(loader)
        for w in windows:
            yield step, epoch, [next(it) for _ in w]
            step += 1
