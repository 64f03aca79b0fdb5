"""``import-pmod``: the authors' p-MoD checkpoints (original LLaVA layout) as pmod-convert checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import AllowPickleOpt, app, console, one_line_errors


@app.command("import-pmod")
@one_line_errors
def import_pmod_cmd(
    source: Annotated[Path, typer.Argument(help="A p-MoD checkpoint folder in the original LLaVA layout "
                                                "(model_type pmod_llava_llama, e.g. MCG-NJU/p-MoD-LLaVA-NeXT-7B).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist unless --overwrite).")],
    vision_config: Annotated[Optional[Path], typer.Option(
        "--vision-config", help="CLIP vision config.json (or its folder) when mm_vision_tower is neither a local "
                                "folder nor openai/clip-vit-large-patch14(-336).")] = None,
    vision_tower: Annotated[Optional[Path], typer.Option(
        "--vision-tower", help="Local transformers CLIP checkpoint (e.g. openai/clip-vit-large-patch14-336) for a "
                               "p-MoD checkpoint saved without its vision tower.")] = None,
    processor: Annotated[Optional[Path], typer.Option(
        "--processor", help="Local transformers LLaVA / LLaVA-NeXT processor folder for the same tokenizer "
                            "(e.g. llava-hf/llava-v1.6-vicuna-7b-hf) to copy into OUT.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace OUT if it is an earlier pmod-convert output (never the source).")] = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Convert a p-MoD checkpoint of the authors' code base into a transformers LLaVA / LLaVA-NeXT pmod checkpoint
    with the same per-layer ratios and TanhNorm routers (load_pretrained, eval, finetune, export then apply)."""
    from ..interop import import_pmod

    with console.status(f"importing {source} ..."):
        result = import_pmod(source, out, vision_config=vision_config, vision_tower=vision_tower, processor=processor,
                             overwrite=overwrite,
                             allow_pickle=allow_pickle)
    mod = [(i, r) for i, r in enumerate(result.ratios) if r is not None]
    console.print(f"wrote {result.path} ({result.family}): {len(mod)} of {len(result.ratios)} decoder layers are MoD "
                  f"layers ({', '.join(f'{i}:{r:.3f}' for i, r in mod)}); TanhNorm alpha={result.router.tanh_alpha}, "
                  f"beta={result.router.tanh_beta}; <image> = id {result.image_token_id}, vocabulary {result.vocab_size}",
                  highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(note, highlight=False, soft_wrap=True)
