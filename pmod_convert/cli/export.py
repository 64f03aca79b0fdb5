"""``export`` and ``generate``: quantized checkpoints and one answer from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import AllowPickleOpt, DeviceOpt, DtypeOpt, app, console, one_line_errors, out_console


@app.command("export")
@one_line_errors
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A pmod-convert checkpoint folder (its LoRA sidecar is merged).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist unless --overwrite).")],
    quantize: Annotated[Optional[str], typer.Option(
        "--quantize", "-q", help="none | int8 | nf4 | fp4 (bitsandbytes); required unless --dense.")] = None,
    dense: Annotated[bool, typer.Option(
        "--dense", help="Write a plain dense folder for serving engines (vLLM, SGLang, ...): LoRA merged, routers "
                        "and the config's pmod section removed. It runs every token through every layer: the MoD "
                        "savings are lost.")] = False,
    double_quant: Annotated[bool, typer.Option("--double-quant", help="nf4/fp4: also quantize the block scales.")] = False,
    compute_dtype: Annotated[Optional[str], typer.Option(
        "--compute-dtype", help="nf4/fp4: float32 | float16 | bfloat16 for the 4-bit matmuls (default float32).")] = None,
    skip_modules: Annotated[Optional[str], typer.Option(
        "--skip-modules", help="Comma-separated module names to leave unquantized, replacing the family's "
                               "defaults (vision tower, projector, lm_head); routers are never quantized.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace OUT if it is an earlier pmod-convert output (never the checkpoint).")] = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Merge the finetune sidecar, quantize the language model with bitsandbytes and write a checked folder
    (or, with --dense, a plain dense folder for serving engines)."""
    from ..errors import RecipeError
    from ..export import export, export_dense, parse_skip_modules

    if dense:
        if quantize not in (None, "none") or double_quant or compute_dtype or skip_modules:
            raise RecipeError("--dense writes an unquantized plain folder; drop --quantize/--double-quant/"
                              "--compute-dtype/--skip-modules (or drop --dense)")
        result = export_dense(checkpoint, out, overwrite=overwrite, allow_pickle=allow_pickle)
        console.print(f"wrote {out}: dense, {result.router_tensors_removed} router tensors and the pmod section "
                      f"removed{', LoRA merged' if result.lora_merged else ''}; {result.weight_bytes / 2**20:.2f} MiB "
                      f"of weights; logits equal the MoD model with routing off (max diff "
                      f"{result.max_abs_logit_diff:.2g}). Engines run it dense: the MoD savings are lost.",
                      highlight=False)
        return
    if quantize is None:
        raise RecipeError("give --quantize none|int8|nf4|fp4 (or --dense for a plain dense folder)")
    report = export(checkpoint, out, quantize=quantize, double_quant=double_quant, compute_dtype=compute_dtype,
                    skip_modules=parse_skip_modules(skip_modules), overwrite=overwrite, allow_pickle=allow_pickle)
    out_console.print(report.table())
    console.print(f"wrote {out} ({report.weight_bytes / 2**20:.2f} MiB of weights, "
                  f"{report.size_ratio:.3f}x the unquantized model)", highlight=False)


@app.command("generate")
@one_line_errors
def generate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A pmod-convert checkpoint folder (plain, finetuned or exported).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question, formatted with the checkpoint's chat template.")],
    image: Annotated[Optional[Path], typer.Option("--image", "-i", help="Image file the prompt is about.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.")] = 32,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show the vision tokens each MoD layer kept.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Print one greedy answer; with --verbose, the retained vision tokens per MoD layer during the prefill."""
    from ..export import generate_answer

    result = generate_answer(checkpoint, prompt, image, max_new_tokens=max_new_tokens, retention=verbose,
                             device=device, dtype=dtype, allow_pickle=allow_pickle)
    typer.echo(result.text)
    if verbose:
        table = Table(title=f"prefill: {result.prompt_tokens} prompt tokens; {result.new_tokens} new tokens")
        for col in ("layer", "ratio", "vision tokens", "kept", "kept share"):
            table.add_column(col, justify="right")
        for row in result.retention:
            share = f"{row.kept / row.vision_tokens:.3f}" if row.vision_tokens else "-"
            table.add_row(str(row.layer), f"{row.ratio:.3f}", str(row.vision_tokens), str(row.kept), share)
        console.print(table)
