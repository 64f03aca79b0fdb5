"""``generate``: one greedy answer from a pmod checkpoint (plain, finetuned or exported) for an image + prompt."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..devices import resolve_device, to_device
from ..errors import DataError, RecipeError
from .quantize import quiet_int8_casts
from .retention import LayerRetention, RetentionRecorder


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    retention: list[LayerRetention] = field(default_factory=list)  # filled when asked for


def generate_answer(checkpoint: str | Path, prompt: str, image: str | Path | None = None, *,
                    max_new_tokens: int = 32, retention: bool = False, device: str | None = None,
                    dtype: str | None = None, allow_pickle: bool = False) -> Generation:
    """Greedy answer to ``prompt`` about ``image``, formatted with the checkpoint's own chat template.

    Dense checkpoints answer too (for comparisons). ``retention``: also count the vision tokens each MoD layer
    kept during the prefill. ``device``: cpu / cuda (default: cuda when available); ``dtype``: float32 /
    float16 / bfloat16 (default: the checkpoint's). ``allow_pickle``: accept ``pytorch_model.bin`` /
    ``adapter_model.bin`` weights (safetensors only by default).

    Raises:
        RecipeError: bad options. DataError: missing image or processor files.
        CheckpointError / UnsupportedArchitecture: the checkpoint cannot be loaded (see ``load_pretrained``).
    """
    from ..api import load_any
    from ..data import SampleEncoder

    if max_new_tokens < 1:
        raise RecipeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not prompt.strip():
        raise RecipeError("the prompt is empty; pass --prompt TEXT")
    if image is not None and not Path(image).is_file():
        raise DataError(f"image {image} does not exist; pass an image file with --image")
    run_device = resolve_device(device)
    encoder = SampleEncoder.from_pretrained(checkpoint)
    model = load_any(checkpoint, dtype=dtype, device=run_device, allow_pickle=allow_pickle)
    inputs = encoder.encode_prompt(images=[image] if image is not None else [], prompt=prompt)
    device = next(p.device for p in model.parameters())
    inputs = to_device(inputs, device)
    recorder = RetentionRecorder(model) if retention else None
    with torch.no_grad(), quiet_int8_casts(), (recorder or contextlib.nullcontext()):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=encoder.pad_token_id)
    n_prompt = inputs["input_ids"].shape[1]
    new = out[0, n_prompt:]
    return Generation(text=encoder.decode(new), prompt_tokens=n_prompt, new_tokens=int(new.numel()),
                      retention=recorder.results() if recorder else [])
