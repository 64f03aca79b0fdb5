"""``export --dense``: a plain dense folder for serving engines and loaders that reject unknown keys.

What it writes: the checkpoint's weights with the finetune sidecar's LoRA merged, every router tensor
(``*.pmod_router.*``) removed from the safetensors files (and from ``model.safetensors.index.json`` when the
weights are sharded), and ``config.json`` without its ``pmod`` section; the processor, tokenizer, chat template
and generation config as in the checkpoint. No ``recipe.yaml``, export settings or manifest: the folder is an
ordinary transformers checkpoint of the original family (``LlavaForConditionalGeneration``, ...), which
vLLM / SGLang / TGI and plain ``from_pretrained`` load as they load the dense model.

What it computes: exactly the dense fallback, every vision token through every layer. The MoD savings (fewer
FLOPs, a smaller KV cache) are gone; what the folder keeps from the conversion is the finetuned weights (LoRA
merged). The written folder is checked before it appears: plain transformers loads it with no missing or
unexpected weight, and its logits equal those of the merged MoD model run with routing off
(:func:`pmod_convert.mod.context.routing_disabled`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..adapters import get_adapter
from ..adapters.base import unwrap
from ..checkpoint import atomic_folder, check_replaceable, copy_processor_files
from ..errors import CheckpointError
from ..mod.context import routing_disabled
from ..mod.router import ROUTER_NAME
from .compare import Batch, check_batches, model_logits

INDEX_FILE = "model.safetensors.index.json"


@dataclass
class DenseExport:
    """What ``export --dense`` wrote: the folder, how many router tensors it dropped (and their bytes), whether
    a LoRA adapter was merged, the largest logit difference against the MoD model with routing off (must be
    0 up to float rounding), and the seconds it took."""

    checkpoint: str
    out: str
    lora_merged: bool
    router_tensors_removed: int
    router_bytes_removed: int
    weight_bytes: int
    max_abs_logit_diff: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_dense(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False,
                 check_inputs: Batch | Sequence[Batch] | None = None, progress: bool = True,
                 allow_pickle: bool = False) -> DenseExport:
    """Write CHECKPOINT as a plain dense transformers folder OUT (routers and the ``pmod`` section removed,
    LoRA sidecar merged); see the module docstring for what engines get from it.

    ``check_inputs``: model input dicts the logits are compared on (default: the family's dummy inputs).
    OUT appears only when complete; ``overwrite`` replaces only an earlier pmod-convert output.

    Raises:
        CheckpointError: CHECKPOINT is not an unquantized pmod checkpoint, OUT exists and may not be replaced,
            or the written folder does not load strictly with plain transformers or computes other logits than
            the dense fallback.
    """
    from .pipeline import _check_source, merge_lora
    from ..api import load_pretrained
    from ..progress import Progress

    started = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    _check_source(checkpoint)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.resolve() == checkpoint.resolve():
        raise CheckpointError(f"--out {out} is the checkpoint itself; write the export to another folder")
    check_replaceable(out, protect=(checkpoint,))
    with Progress(total=4, desc="export --dense", unit="step", disable=not progress) as bar:
        model = load_pretrained(checkpoint, allow_pickle=allow_pickle)
        adapter = get_adapter(unwrap(model))
        model, lora = merge_lora(model)
        batches = check_batches(check_inputs, adapter, model.config)
        with routing_disabled(model):
            reference = model_logits(model, batches)
        bar.update(1)
        with atomic_folder(out, overwrite=overwrite, protect=(checkpoint,)) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            del model
            copy_processor_files(checkpoint, tmp)  # never recipe.yaml, reports or manifests
            removed, removed_bytes = strip_routers(tmp)
            bar.update(1)
            dense = load_plain(tmp, adapter)
            bar.update(1)
            diff = max(float((r - c).abs().max()) if r.numel() else 0.0
                       for r, c in zip(reference, model_logits(dense, batches)))
            del dense
            if not diff <= 1e-4 * max(1.0, max(float(r.abs().max()) for r in reference)):
                raise CheckpointError(f"the dense folder's logits differ from the MoD model with routing off by up to "
                                      f"{diff:.3g}; nothing was written")
            weight_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
            bar.update(1)
    return DenseExport(checkpoint=str(checkpoint), out=str(out), lora_merged=lora, router_tensors_removed=removed,
                       router_bytes_removed=removed_bytes, weight_bytes=weight_bytes, max_abs_logit_diff=diff,
                       seconds=time.perf_counter() - started)


def strip_routers(folder: str | Path) -> tuple[int, int]:
    """Remove every router tensor (a key with a ``pmod_router`` part) from the safetensors files of ``folder``
    and from its shard index, and the ``pmod`` section from its ``config.json``: ``(tensors removed, bytes)``.

    Files are rewritten one shard at a time (peak memory: one shard); the safetensors metadata is kept.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    removed, removed_bytes = 0, 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            drop = [k for k in keys if ROUTER_NAME in k.split(".")]
            if not drop:
                continue
            metadata = handle.metadata()
            kept = {k: handle.get_tensor(k) for k in keys if k not in drop}
            for k in drop:
                t = handle.get_tensor(k)
                removed_bytes += t.numel() * t.element_size()
        removed += len(drop)
        save_file(kept, str(path), metadata=metadata)
    index = folder / INDEX_FILE
    if index.exists():
        data = json.loads(index.read_text())
        weight_map = {k: v for k, v in data.get("weight_map", {}).items() if ROUTER_NAME not in k.split(".")}
        data["weight_map"] = weight_map
        if isinstance(data.get("metadata"), dict) and "total_size" in data["metadata"]:
            data["metadata"]["total_size"] = max(int(data["metadata"]["total_size"]) - removed_bytes, 0)
        index.write_text(json.dumps(data, indent=2) + "\n")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("pmod", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return removed, removed_bytes


def load_plain(folder: str | Path, adapter: Any = None) -> torch.nn.Module:
    """Load ``folder`` with plain transformers (the family's class, no pmod code) and refuse any missing or
    unexpected weight, as a strict loader would.

    Raises:
        CheckpointError: transformers cannot load the folder, or reports missing / unexpected weights.
    """
    folder = Path(folder)
    if adapter is None:
        from ..checkpoint import read_config

        adapter = get_adapter(read_config(folder))
    try:
        model, info = adapter.model_cls().from_pretrained(str(folder), output_loading_info=True,
                                                          trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"plain transformers cannot load {folder}: {str(exc).splitlines()[0]}") from None
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"plain transformers loads {folder} with {bad}; the dense folder is not complete")
    return model.eval()
