"""``export``: merge the LoRA sidecar, quantize the language model, write a checked HF folder."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml
from ..progress import progress as tqdm  # ETA on a terminal, periodic lines when piped

from ..adapters import get_adapter
from ..adapters.base import unwrap
from ..checkpoint import atomic_folder, check_replaceable, copy_processor_files, read_config, scratch_folder
from ..errors import CheckpointError
from .compare import Batch, check_batches, logit_deviation, model_logits, text_positions
from .manifest import EXPORT_SETTINGS, write_manifest
from .quantize import (
    BNB_4BIT_BLOCKSIZE,
    count_linears,
    cpu_4bit_misfits,
    quantize_folder,
    quiet_int8_casts,
    resolve_skip_modules,
    skeleton,
)
from .report import ExportReport, bytes_by_part, weight_file_bytes
from .settings import ExportSettings

SETTINGS_FILE = EXPORT_SETTINGS


def _cannot_run(model, settings: ExportSettings, exc: RuntimeError, skip: list[str]) -> str:
    """One line: the written model's check forward failed; name the 4-bit linears bitsandbytes' CPU path cannot
    run (``quantize.cpu_4bit_misfits``) and what to do instead: a complete ``--skip-modules`` value (``skip``, the
    modules this export left unquantized, plus the misfits' layer names; the option replaces the defaults)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    odd = cpu_4bit_misfits(model)
    line = f"the exported --quantize {settings.quantize} model failed its check forward ({first})"
    if odd:
        name, width = odd[0]
        line += (f": bitsandbytes' 4-bit CPU kernels need every quantized linear's input width to be a multiple of "
                 f"{BNB_4BIT_BLOCKSIZE}, and {len(odd)} are not (e.g. {name}: {width}); export on a CUDA machine, "
                 f"use --quantize int8, or keep them unquantized: --skip-modules "
                 f"{','.join(dict.fromkeys([*skip, *(n.rsplit('.', 1)[-1] for n, _ in odd)]))}")
    return line + "; nothing was written"


def export(checkpoint: str | Path, out: str | Path, *, quantize: str = "none", double_quant: bool = False,
           compute_dtype: str | None = None, skip_modules: Sequence[str] | None = None, overwrite: bool = False,
           check_inputs: Batch | Sequence[Batch] | None = None, progress: bool = True,
           allow_pickle: bool = False) -> ExportReport:
    """Write CHECKPOINT (with its finetune sidecar merged) to OUT, optionally bitsandbytes-quantized.

    ``quantize``: none | int8 | nf4 | fp4. ``double_quant`` / ``compute_dtype``: 4-bit options.
    ``skip_modules``: modules left unquantized (default: the family's ``never_quantize``; routers
    always stay unquantized). ``check_inputs``: model input dicts the logits are compared on
    (default: the family's dummy inputs). OUT appears only when complete. ``overwrite`` replaces only an
    earlier pmod-convert output, never CHECKPOINT, a folder holding it or the current directory.
    ``allow_pickle``: accept ``pytorch_model.bin`` / ``adapter_model.bin`` weights (safetensors only by default).

    Raises:
        CheckpointError: CHECKPOINT is not a loadable unquantized pmod checkpoint (or is pickle-only), OUT
            exists and may not be replaced, or the written model does not load or run (e.g. 4-bit on CPU with a
            linear whose input width is not a multiple of bitsandbytes' blocksize 64).
        RecipeError: invalid export settings or module names.
    """
    started = time.perf_counter()
    settings = ExportSettings(quantize, double_quant, compute_dtype,
                              None if skip_modules is None else tuple(skip_modules)).validate()
    checkpoint, out = Path(checkpoint), Path(out)
    pmod = _check_source(checkpoint)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.resolve() == checkpoint.resolve():
        raise CheckpointError(f"--out {out} is the checkpoint itself; write the export to another folder")
    check_replaceable(out, protect=(checkpoint,))

    from ..api import load_pretrained, recipe_from_config

    if settings.skip_modules is not None:  # a typo fails here, before any weight is read
        resolve_skip_modules(skeleton(checkpoint), settings.skip_modules, strict=True)
    with tqdm(total=6, desc="loading", disable=not progress, leave=False) as steps:
        model = load_pretrained(checkpoint, allow_pickle=allow_pickle)  # applies the LoRA + router sidecar
        adapter = get_adapter(unwrap(model))
        batches = check_batches(check_inputs, adapter, unwrap(model).config)
        text = text_positions(batches, adapter.vision_token_ids(unwrap(model).config))
        _step(steps, "reference logits")
        reference = model_logits(model, batches)
        _step(steps, "merging LoRA")
        model, lora = merge_lora(model)
        skip = resolve_skip_modules(model, settings.skip_modules if settings.skip_modules is not None
                                    else adapter.never_quantize, strict=settings.skip_modules is not None)
        with atomic_folder(out, overwrite=overwrite, protect=(checkpoint,)) as tmp:
            _step(steps, f"writing ({settings.quantize})")
            unquantized, parts_before, linears = _write_weights(model, tmp, out, settings, skip)
            del model
            copy_processor_files(checkpoint, tmp)
            recipe_from_config(pmod).save(tmp / "recipe.yaml")
            _step(steps, "checking the written model")
            exported = load_pretrained(tmp)  # exactly what users will load
            try:
                with quiet_int8_casts():
                    deviation = logit_deviation(reference, model_logits(exported, batches), text)
            except RuntimeError as exc:  # a kernel refused the written model: say why, write nothing
                raise CheckpointError(_cannot_run(exported, settings, exc, skip)) from None
            del exported
            # Written after the check: a folder with export settings must carry a manifest to load.
            (tmp / SETTINGS_FILE).write_text(yaml.safe_dump(
                {**settings.to_dict(), "resolved_skip_modules": skip, "source": str(checkpoint), "lora_merged": lora},
                sort_keys=False))
            _step(steps, "report + manifest")
            parts_after = bytes_by_part(tmp)
            report = ExportReport(
                checkpoint=str(checkpoint), out=str(out), settings=settings.to_dict(), skip_modules=skip,
                lora_merged=lora, linears=linears, weight_bytes=weight_file_bytes(tmp),
                unquantized_weight_bytes=unquantized,
                parts={p: {"unquantized": parts_before.get(p, 0), "exported": parts_after.get(p, 0)}
                       for p in sorted(set(parts_before) | set(parts_after))},
                logits=deviation.to_dict(), seconds=time.perf_counter() - started, versions=_versions())
            report.save(tmp, deviation)
            write_manifest(tmp)
            _step(steps, "done")
    return report


def _write_weights(model, tmp: Path, out: Path, settings: ExportSettings, skip: list[str]):
    """Save ``model`` into ``tmp``, quantized per ``settings``: (unquantized bytes, bytes per part, linear counts)."""
    if not settings.quantized:
        model.save_pretrained(tmp, safe_serialization=True)
        return weight_file_bytes(tmp), bytes_by_part(tmp), count_linears(model)
    with _staging(out) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        unquantized, parts = weight_file_bytes(stage), bytes_by_part(stage)
        quantized = quantize_folder(stage, settings, skip)
        quantized.save_pretrained(tmp, safe_serialization=True)
        return unquantized, parts, count_linears(quantized)


def merge_lora(model):
    """``(plain transformers model, whether a LoRA adapter was merged)``; routers stay as trained."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload().eval(), True
    return model, False


def _check_source(checkpoint: Path) -> dict:
    config = read_config(checkpoint)
    pmod = config.get("pmod")
    if not isinstance(pmod, dict) or "layer_ratios" not in pmod:
        raise CheckpointError(f"{checkpoint} is not a pmod-convert checkpoint (no 'pmod' section in config.json); "
                              "create one with `pmod-convert add-routers`")
    quant = config.get("quantization_config")
    if quant:
        raise CheckpointError(f"{checkpoint} is already quantized ({quant.get('quant_method', 'unknown method')}); "
                              "export from the unquantized checkpoint")
    get_adapter(config)
    return pmod


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A scratch folder beside OUT for the unquantized merged model, removed whatever happens."""
    with scratch_folder(out, "stage") as stage:  # marked and locked: a killed run's stage is cleaned next time
        yield stage


def _step(bar, description: str) -> None:
    bar.update()
    bar.set_description(description)


def _versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    from .. import __version__

    return {"pmod_convert": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
