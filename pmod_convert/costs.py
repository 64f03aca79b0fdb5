"""One cost figure per checkpoint: the schedule, routers and token counts that ``inspect``, ``estimate`` and
reports use for a pmod checkpoint folder.

A checkpoint's FLOPs / KV figure depends on three things, and each is taken from the checkpoint itself
unless the caller overrides it, with the source said in the result:

- the per-layer ratios: the checkpoint's ``config.json`` ``pmod.layer_ratios`` (what ``load_pretrained`` runs);
- the token counts: the calibration data's per-sample counts (``calibration_report.json``, written by
  ``calibrate`` next to the weights) when present, else one typical image of the family
  (``efficiency.default_vision_tokens``) and a fixed number of text tokens (100, or the paper's 58 under the
  paper convention);
- the convention: ``"exact"`` (default) or ``"paper"`` (see ``efficiency.estimate``).

The routers shown are those ``load_pretrained`` loads: the finetune sidecar's (``pmod_adapter/``) when present,
else the ones stored with the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_routers, router_key
from .efficiency import CONVENTIONS, PAPER_TEXT_TOKENS, Estimate, TextShape, default_vision_tokens, estimate
from .errors import CheckpointError, RecipeError

DEFAULT_TEXT_TOKENS = 100  # exact convention, when neither the caller nor the checkpoint gives a count
CALIBRATION_REPORT = "calibration_report.json"  # calibration.report.REPORT_FILE (not imported: no torch-heavy deps)


@dataclass
class Workload:
    """Per-sample token counts of a figure and where they came from (a sentence)."""

    n_vision: list[int]
    n_text: list[int]
    source: str

    def describe(self) -> str:
        """``"576 vision + 58 text tokens per sample (source)"``, means over samples when they differ."""
        n = len(self.n_vision)
        vision, text = sum(self.n_vision) / n, sum(self.n_text) / n
        fmt = lambda x: f"{x:.1f}".removesuffix(".0")  # noqa: E731
        many = f" (mean of {n} samples)" if n > 1 else ""
        return f"{fmt(vision)} vision + {fmt(text)} text tokens per sample{many}; {self.source}"


@dataclass
class CheckpointCost:
    """A checkpoint's cost figure: the estimate, the ratios and token counts behind it, and their sources."""

    estimate: Estimate
    ratios: list[float | None]
    ratios_source: str
    workload: Workload
    convention: str
    notes: list[str] = field(default_factory=list)
    # The same schedule and token counts under the other convention: {"convention", "flops_ratio", "kv_ratio"}
    # (None when it cannot be counted, e.g. the paper convention without a vocab_size).
    other: dict[str, Any] | None = None

    def other_line(self) -> str | None:
        """One sentence with the other convention's ratios, or None."""
        if self.other is None:
            return None
        return (f"same schedule and tokens, {self.other['convention']} convention: FLOPs "
                f"{100 * self.other['flops_ratio']:.1f}%, KV cache {100 * self.other['kv_ratio']:.1f}%")

    def to_dict(self) -> dict[str, Any]:
        return {"convention": self.convention, "other_convention": self.other, "ratios_source": self.ratios_source,
                "tokens": {"n_vision": self.workload.n_vision, "n_text": self.workload.n_text,
                           "source": self.workload.source, "summary": self.workload.describe()},
                "estimate": self.estimate.to_dict(), "notes": self.notes}


def calibration_workload(folder: str | Path) -> Workload | None:
    """The per-sample token counts ``calibrate`` measured on its data (``calibration_report.json`` in
    ``folder``), or None when the folder has no such report. A report without token lists is ignored."""
    path = Path(folder) / CALIBRATION_REPORT
    if not path.is_file():
        return None
    try:
        tokens = json.loads(path.read_text()).get("tokens") or {}
        n_vision, n_text = [int(v) for v in tokens["n_vision"]], [int(v) for v in tokens["n_text"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not n_vision or len(n_vision) != len(n_text) or min(n_vision + n_text) < 0:
        return None
    return Workload(n_vision, n_text, f"the calibration data's token counts ({path.name})")


def choose_workload(config: dict, folder: str | Path | None, vision_tokens: int | None, text_tokens: int | None,
                    convention: str = "exact") -> Workload:
    """Token counts for a figure: the caller's (``--vision-tokens`` / ``--text-tokens``, either may be None),
    then the checkpoint's calibration data (only when the caller gave neither), then the defaults (one typical
    image of the family; 100 text tokens, or the paper's 58 under the paper convention).

    Raises:
        RecipeError: a negative count, or no default vision-token count for the family (pass one).
    """
    for name, value in (("--vision-tokens", vision_tokens), ("--text-tokens", text_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise RecipeError(f"{name} must be an integer >= 0, got {value!r}")
    if vision_tokens is None and text_tokens is None and folder is not None:
        found = calibration_workload(folder)
        if found is not None:
            return found
    parts = []
    if vision_tokens is None:
        vision_tokens = default_vision_tokens(config)
        parts.append("vision: one typical image of the family")
    else:
        parts.append("vision: given")
    if text_tokens is None:
        text_tokens = PAPER_TEXT_TOKENS if convention == "paper" else DEFAULT_TEXT_TOKENS
        parts.append(f"text: {'the paper convention' if convention == 'paper' else 'default'} {text_tokens}")
    else:
        parts.append("text: given")
    return Workload([vision_tokens], [text_tokens], ", ".join(parts))


def stored_ratios(config: dict) -> list[float | None] | None:
    """The checkpoint's own per-layer ratios (``pmod.layer_ratios``), or None for a dense config."""
    pmod = config.get("pmod")
    if isinstance(pmod, dict) and isinstance(pmod.get("layer_ratios"), list):
        return list(pmod["layer_ratios"])
    return None


def stored_scorers(config) -> list[str | None] | None:
    """The checkpoint's per-layer scorers (``pmod.scorer``; None: every MoD layer ranks with its router), for
    ``efficiency.estimate(..., scorers=)``. ``config``: a config.json dict or a transformers config."""
    pmod = config.get("pmod") if isinstance(config, dict) else getattr(config, "pmod", None)
    if isinstance(pmod, dict) and isinstance(pmod.get("scorer"), list):
        return list(pmod["scorer"])
    return None


def checkpoint_cost(config: dict, folder: str | Path | None = None, *, ratios: list[float | None] | None = None,
                    ratios_source: str | None = None, vision_tokens: int | None = None,
                    text_tokens: int | None = None, convention: str = "exact") -> CheckpointCost:
    """The cost figure of a checkpoint (``config``: its config.json dict; ``folder``: where to look for its
    calibration report, or None for a bare config).

    ``ratios``: per-layer ratios to use instead of the checkpoint's own (``ratios_source`` says where they came
    from); without them the checkpoint's ``pmod.layer_ratios`` are used. FLOPs and KV are those of one prefill
    (``efficiency.estimate``), summed over the workload's samples.

    Raises:
        RecipeError: unknown convention, no schedule (a dense config and no ``ratios``), bad token counts.
    """
    if convention not in CONVENTIONS:
        raise RecipeError(f"--convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    notes = []
    own = stored_ratios(config)
    if ratios is None:
        if own is None:
            raise RecipeError("this config has no pmod schedule; pass schedule options (--schedule, --ratio, "
                              "--recipe, ...) or a pmod checkpoint")
        ratios, ratios_source = own, "the checkpoint's own schedule (config.json pmod.layer_ratios)"
    elif own is not None and list(ratios) != own:
        notes.append("the schedule options differ from the checkpoint's own schedule; this figure is NOT the "
                     "checkpoint's (drop the schedule options to see it)")
    workload = choose_workload(config, folder, vision_tokens, text_tokens, convention)
    shape = TextShape.from_config(config)
    scorers = stored_scorers(config) if own is not None and list(ratios) == own else None
    est = estimate(shape, list(ratios), workload.n_vision, workload.n_text, convention=convention, scorers=scorers)
    other_convention = next(c for c in CONVENTIONS if c != convention)
    try:
        alt = estimate(shape, list(ratios), workload.n_vision, workload.n_text, convention=other_convention,
                       scorers=scorers)
        other = {"convention": other_convention, "flops_ratio": alt.flops_ratio, "kv_ratio": alt.kv_ratio}
    except RecipeError:  # e.g. no vocab_size for the paper convention
        other = None
    return CheckpointCost(est, list(ratios), ratios_source or "given", workload, convention, notes, other)


@dataclass
class RouterView:
    """The routers ``load_pretrained`` will run, keyed ``(layer, "weight" | "bias")``, and their origin."""

    tensors: dict[tuple[int, str], torch.Tensor]
    source: str
    finetuned: bool


def effective_routers(folder: str | Path) -> RouterView:
    """The routers ``load_pretrained(folder)`` loads: the finetune sidecar's ``pmod_adapter/routers.safetensors``
    when the folder has a sidecar (they replace the stored ones), else those stored with the weights.

    Raises:
        CheckpointError: the sidecar's routers file is missing or unreadable.
    """
    from safetensors.torch import load_file

    from .sidecar import ROUTERS_FILE, SIDECAR_DIR, SIDECAR_FILE, has_sidecar

    folder = Path(folder)
    if has_sidecar(folder):
        path = folder / SIDECAR_DIR / ROUTERS_FILE
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} cannot be read ({exc}); the adapter sidecar is corrupt") from None
        tensors = {router_key(k): v for k, v in state.items() if router_key(k) is not None}
        try:
            lora = bool(json.loads((folder / SIDECAR_DIR / SIDECAR_FILE).read_text()).get("lora"))
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            raise CheckpointError(f"{folder / SIDECAR_DIR / SIDECAR_FILE} cannot be read; the adapter sidecar is "
                                  "corrupt") from None
        extra = f"; its LoRA adapter ({SIDECAR_DIR}/) is applied on load too" if lora else ""
        return RouterView(tensors, f"finetuned: {SIDECAR_DIR}/{ROUTERS_FILE} (replaces the routers stored with the "
                                   f"weights, as load_pretrained does){extra}", True)
    return RouterView(read_routers(folder), "stored with the weights (no finetune sidecar)", False)
