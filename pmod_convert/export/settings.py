"""What an export does: the quantization mode and its options, validated before any weight is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError

QUANT_MODES = ("none", "int8", "nf4", "fp4")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
FOUR_BIT = ("nf4", "fp4")


@dataclass(frozen=True)
class ExportSettings:
    """How to export. Validated as a whole; options that do not apply to the mode are errors.

    quantize:      none | int8 (bitsandbytes LLM.int8) | nf4 | fp4 (bitsandbytes 4-bit).
    double_quant:  4-bit only: also quantize the per-block scales (QLoRA's double quantization).
    compute_dtype: 4-bit only: dtype the 4-bit matmuls run in (default float32).
    skip_modules:  module names left unquantized; None means the family's ``never_quantize`` list.
                   An entry matches a module whose dotted name contains it as whole components
                   (``vision_tower`` matches ``model.vision_tower``, ``mlp.down_proj`` every layer's).
    """

    quantize: str = "none"
    double_quant: bool = False
    compute_dtype: str | None = None
    skip_modules: tuple[str, ...] | None = None

    @property
    def quantized(self) -> bool:
        return self.quantize != "none"

    @property
    def four_bit(self) -> bool:
        return self.quantize in FOUR_BIT

    def validate(self) -> ExportSettings:
        if self.quantize not in QUANT_MODES:
            raise RecipeError(f"unknown quantization {self.quantize!r}; choose one of {', '.join(QUANT_MODES)}")
        if self.double_quant and not self.four_bit:
            raise RecipeError(f"double quantization only applies to nf4/fp4, not to --quantize {self.quantize}")
        if self.compute_dtype is not None:
            if self.compute_dtype not in COMPUTE_DTYPES:
                raise RecipeError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}")
            if not self.four_bit:
                raise RecipeError(f"a compute dtype only applies to nf4/fp4, not to --quantize {self.quantize}")
        if self.skip_modules is not None:
            bad = [name for name in self.skip_modules if not name or name != name.strip() or name.strip(".") != name]
            if bad:
                raise RecipeError(f"skip-module names must be dotted module names like 'vision_tower' or "
                                  f"'mlp.down_proj'; got {bad[0]!r}")
        return self

    def effective_compute_dtype(self) -> str | None:
        return (self.compute_dtype or "float32") if self.four_bit else None

    def to_dict(self) -> dict:
        return {"quantize": self.quantize, "double_quant": self.double_quant,
                "compute_dtype": self.effective_compute_dtype(),
                "skip_modules": None if self.skip_modules is None else list(self.skip_modules)}


def parse_skip_modules(text: str | None) -> tuple[str, ...] | None:
    """``"a,b"`` -> ``("a", "b")``; None stays None (use the family's defaults)."""
    if text is None:
        return None
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise RecipeError("--skip-modules needs at least one module name, e.g. 'vision_tower,lm_head'")
    return names
