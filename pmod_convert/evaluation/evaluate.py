"""Generate an answer for every question of a dataset with a dense or MoD checkpoint and score it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ..progress import progress as tqdm  # ETA on a terminal, periodic lines when piped

from ..checkpoint import atomic_folder
from ..data import SampleEncoder, collate, read_samples
from ..devices import resolve_device, to_device
from ..costs import stored_scorers
from ..efficiency import TextShape, estimate
from ..errors import DataError, RecipeError
from .scoring import is_correct

PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class EvalSummary:
    checkpoint: str
    data: str
    samples: int
    skipped: int
    accuracy: float
    exact_accuracy: float | None  # over open questions (normalised exact match)
    choice_accuracy: float | None  # over multiple-choice questions (letter match)
    is_mod: bool
    layer_ratios: list[float | None] | None
    decoder_flops_ratio: float  # estimated prefill FLOPs vs the dense model on these samples' token counts
    kv_ratio: float
    seconds: float
    generated_tokens: int
    predictions: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("predictions")
        return out


def evaluate(checkpoint: str | Path, data: str | Path, image_folder: str | Path | None = None, *,
             model: nn.Module | None = None, out: str | Path | None = None, batch_size: int = 8,
             max_new_tokens: int = 16, limit: int | None = None, skip_bad_rows: bool = False,
             overwrite: bool = False, progress: bool = True, device: str | None = None,
             dtype: str | None = None, allow_pickle: bool = False,
             allow_outside_images: bool = False) -> EvalSummary:
    """Answer the last question of every sample greedily and score it against the sample's last answer.

    ``model``: an already loaded model for ``checkpoint`` (skips loading). ``out``: a folder that receives
    ``predictions.jsonl`` and ``summary.json`` (written atomically). ``device``: cpu / cuda (default: cuda
    when available); ``dtype``: float32 / float16 / bfloat16 (default: the checkpoint's). ``allow_pickle``:
    accept ``pytorch_model.bin`` / ``adapter_model.bin`` weights (safetensors only by default);
    ``allow_outside_images``: accept image paths that lead outside ``image_folder`` (refused by default).

    Raises:
        RecipeError: invalid options, or ``out`` exists without ``overwrite``.
        DataError: unusable data (an image outside ``image_folder`` included), or no sample could be evaluated.
        CheckpointError / UnsupportedArchitecture: as :func:`pmod_convert.load_any`.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise RecipeError("batch_size and max_new_tokens must be >= 1")
    if out is not None and Path(out).exists() and not overwrite:
        raise RecipeError(f"{out} already exists; choose another --out or pass --overwrite")
    run_device = resolve_device(device) if model is None else next(model.parameters()).device
    dataset = read_samples(data, image_folder, skip_bad_rows=skip_bad_rows, limit=limit,
                           allow_outside_images=allow_outside_images)
    encoder = SampleEncoder.from_pretrained(checkpoint)
    if model is None:
        from ..api import load_any

        model = load_any(checkpoint, dtype=dtype, device=run_device, allow_pickle=allow_pickle)
    model.eval()
    skipped = dataset.skipped
    start = time.perf_counter()
    answers = answer_samples(model, encoder, dataset.samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             skip_bad_rows=skip_bad_rows, source=dataset.source, progress=progress)
    records, counts, generated = answers.records, answers.counts, answers.generated_tokens
    skipped += answers.skipped
    if not records:
        raise DataError(f"{dataset.source}: no sample could be evaluated ({skipped} bad rows skipped)")
    seconds = time.perf_counter() - start

    config = model.config
    pmod = getattr(config, "pmod", None)
    shape = TextShape.from_config(config)
    ratios = list(pmod["layer_ratios"]) if isinstance(pmod, dict) else [None] * shape.num_layers
    cost = estimate(shape, ratios, [c[0] for c in counts], [c[1] for c in counts], scorers=stored_scorers(config))
    summary = EvalSummary(
        checkpoint=str(checkpoint), data=str(data), samples=len(records), skipped=skipped,
        accuracy=_mean([r["correct"] for r in records]),
        exact_accuracy=_mean([r["correct"] for r in records if r["kind"] == "exact"]),
        choice_accuracy=_mean([r["correct"] for r in records if r["kind"] == "choice"]),
        is_mod=isinstance(pmod, dict), layer_ratios=ratios if isinstance(pmod, dict) else None,
        decoder_flops_ratio=cost.decoder_flops_ratio, kv_ratio=cost.kv_ratio, seconds=seconds,
        generated_tokens=generated, predictions=records,
    )
    if out is not None:
        write(summary, out, overwrite=overwrite)
    return summary


@dataclass
class Answers:
    records: list[dict[str, Any]]  # id, question, reference, prediction, correct, kind
    counts: list[tuple[int, int]]  # (vision tokens, text tokens) of each answered prompt
    generated_tokens: int
    skipped: int

    @property
    def accuracy(self) -> float | None:
        return _mean([r["correct"] for r in self.records])


def answer_samples(model: nn.Module, encoder: SampleEncoder, samples: list, *, batch_size: int = 8,
                   max_new_tokens: int = 16, skip_bad_rows: bool = False, source: Any = "data",
                   progress: bool = True) -> Answers:
    """Greedy answers of ``model`` (dense, MoD or peft-wrapped, already on its device) to the last question of
    each sample, in left-padded batches of ``batch_size``, scored against the sample's last answer.

    Raises :class:`DataError` for a sample that cannot be encoded unless ``skip_bad_rows`` (then counted).
    """
    was_training = model.training
    model.eval()
    vision_ids = torch.tensor(sorted(encoder.vision_ids))
    records, counts, generated, skipped = [], [], 0, 0
    bar = tqdm(total=len(samples), desc="eval", unit="sample", disable=not progress, leave=False)
    try:
        for first in range(0, len(samples), batch_size):
            chunk, encoded = [], []
            for sample in samples[first:first + batch_size]:
                try:
                    encoded.append(encoder.encode_for_generation(sample))
                    chunk.append(sample)
                except DataError as exc:
                    if not skip_bad_rows:
                        raise DataError(f"{source} row {sample.row} (id {sample.id!r}) {exc}; fix the row or "
                                        "pass --skip-bad-rows") from None
                    skipped += 1
            bar.update(len(samples[first:first + batch_size]) - len(chunk))
            if not chunk:
                continue
            answers = generate_batch(model, encoder, [e[0] for e in encoded], max_new_tokens=max_new_tokens)
            for sample, (inputs, reference), answer in zip(chunk, encoded, answers):
                prediction = encoder.decode(answer)
                correct, kind = is_correct(prediction, reference)
                n_vision = int(torch.isin(inputs["input_ids"][0], vision_ids).sum())
                counts.append((n_vision, inputs["input_ids"].shape[1] - n_vision))
                generated += len(answer)
                question = next(text for role, text in reversed(sample.turns[:-1]) if role == "user") \
                    if len(sample.turns) > 1 else ""
                records.append({"id": sample.id, "question": question, "reference": reference,
                                "prediction": prediction, "correct": correct, "kind": kind})
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / max(len(records), 1):.3f}")
    finally:
        bar.close()
        model.train(was_training)
    return Answers(records=records, counts=counts, generated_tokens=generated, skipped=skipped)


def generate_batch(model: nn.Module, encoder: SampleEncoder, inputs: list[dict[str, torch.Tensor]], *,
                   max_new_tokens: int = 16, **generate_kwargs: Any) -> list[list[int]]:
    """The answers of ``model`` to prompts encoded one by one (each ``input_ids`` of shape ``[1, n]``), generated
    together in one left-padded batch: per prompt, the new token ids up to (without) the first end-of-turn, EOS
    or pad token. Greedy unless ``generate_kwargs`` says otherwise (passed to ``model.generate``).

    Used by ``eval``, finetune's validation and the lmms-eval model, so every caller decodes the same way.
    """
    device = next(model.parameters()).device
    batch = to_device(collate(inputs, encoder.pad_token_id, padding_side="left"), device)
    generate_kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=encoder.pad_token_id,
                                **generate_kwargs)
    new = output[:, batch["input_ids"].shape[1]:].cpu()
    return [_until_eos(tokens, encoder) for tokens in new]


def write(summary: EvalSummary, out: str | Path, overwrite: bool = False) -> Path:
    with atomic_folder(out, overwrite=overwrite) as tmp:
        with open(tmp / PREDICTIONS_FILE, "w") as f:
            for record in summary.predictions:
                f.write(json.dumps(record) + "\n")
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2))
    return Path(out)


def _until_eos(tokens: torch.Tensor, encoder: SampleEncoder) -> list[int]:
    ids = tokens.tolist()
    stops = encoder.special_ids | ({encoder.eos_token_id, encoder.pad_token_id} - {None})  # end of turn, eos, pad
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None
