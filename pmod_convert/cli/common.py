"""What every command shares: the Typer app, one-line errors, schedule options, recipe building."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from ..errors import PmodError, RecipeError
from ..recipe import MAX_LAYERS, Recipe

# `pmod-convert --help` lists the commands in the order a conversion uses them; any other command follows.
PIPELINE_ORDER = ("quickstart", "add-routers", "import-pmod", "inspect", "estimate", "calibrate", "finetune", "export", "generate",
                  "eval", "bench", "compare")
HELP = """Convert dense multimodal LLMs into Mixture-of-Depths (p-MoD) models.

Pipeline: add-routers -> calibrate -> finetune -> export, then generate / eval / bench; quickstart runs it all
on a synthetic task. Terms: PRD (progressive ratio decay) is the schedule in which the share of vision tokens a
layer keeps falls with depth; ARank is a layer's attention rank measured on calibration data (low ARank =
redundant tokens, a good layer to convert)."""


def _no_bool(params: list) -> list:
    """On/off flags show no ``<bool>`` type in ``--help`` (their help says what they do)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Flags(TyperCommand):
    def get_params(self, ctx: Any) -> list:
        return _no_bool(super().get_params(ctx))


class _Pipeline(TyperGroup):
    """The command group: commands listed in pipeline order, flags without ``<bool>``."""

    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))

    def get_params(self, ctx: Any) -> list:
        return _no_bool(super().get_params(ctx))


class _App(typer.Typer):
    def command(self, *args: Any, **kwargs: Any):
        """Every command gets the flag display above, and its docstring's paragraphs as unwrapped lines (the
        rich help keeps a docstring's line breaks, which then wrap twice)."""
        kwargs.setdefault("cls", _Flags)

        def register(func: Any) -> Any:
            if kwargs.get("help") is None and func.__doc__:
                paragraphs = inspect.cleandoc(func.__doc__).split("\n\n")
                kwargs["help"] = "\n\n".join(" ".join(p.split()) for p in paragraphs)
            return typer.Typer.command(self, *args, **kwargs)(func)

        return register


from ..progress import quiet_known_noise  # noqa: E402

quiet_known_noise()  # before any command imports peft (which imports bitsandbytes)

app = _App(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Pipeline, help=HELP)
console = Console(stderr=True)
out_console = Console()

MAX_THREADS = 4096
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", help="CPU threads torch uses for this command (default: torch's choice, usually every core).")]


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` after checking the value (None: leave torch's default).

    Raises:
        RecipeError: ``threads`` is not in 1..4096.
    """
    if threads is None:
        return
    if not 1 <= threads <= MAX_THREADS:
        raise RecipeError(f"--threads must be in 1..{MAX_THREADS}, got {threads}")
    import torch

    torch.set_num_threads(threads)


def one_line_errors(func):
    """Library errors become ``error: <message>`` on stderr and a non-zero exit code.

    Every command decorated with it also gets ``--threads`` (torch's CPU threads for the command), and runs
    with transformers' own loading bars off, so only the toolkit's progress shows (``pmod_convert.progress``).
    """

    own_threads = "threads" in inspect.signature(func).parameters  # e.g. bench pins CPUs with it itself

    @functools.wraps(func)
    def wrapper(*args, threads: int | None = None, **kwargs):
        from ..progress import quiet_library_bars

        try:
            set_threads(threads)
            if own_threads:
                kwargs["threads"] = threads
            with quiet_library_bars():
                return func(*args, **kwargs)
        except PmodError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    signature = inspect.signature(func, eval_str=True)
    if "threads" not in signature.parameters:
        extra = inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ThreadsOpt)
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
        wrapper.__annotations__ = {**getattr(func, "__annotations__", {}), "threads": ThreadsOpt}
    return wrapper


# ---- shared schedule options -------------------------------------------------------------------
RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", help="YAML recipe; options below override its values.")]
ScheduleOpt = Annotated[Optional[str], typer.Option(
    "--schedule", help="shiftedcos | shiftedlinear | constant | explicit (default: shiftedcos, the published p-MoD PRD).")]
AvgOpt = Annotated[Optional[float], typer.Option("--avg-ratio", help="Average factor a of the shifted curves (0.5).")]
MaxOpt = Annotated[Optional[float], typer.Option("--max-ratio", help="Layers whose curve is <= this become MoD (0.85).")]
MinOpt = Annotated[Optional[float], typer.Option("--min-ratio", help="Lowest retention ratio (0.15).")]
RatioOpt = Annotated[Optional[float], typer.Option("--ratio", help="Retention ratio of a constant schedule, in (0, 1].")]
LayersOpt = Annotated[Optional[str], typer.Option(
    "--layers", help="Only these layers become MoD: '8,9,12' or '8-31'.")]
RatiosOpt = Annotated[Optional[str], typer.Option(
    "--ratios", help="Explicit schedule, one entry per layer: '1,1,dense,0.5,...' ('dense' = no router).")]
AlphaOpt = Annotated[Optional[float], typer.Option("--tanh-alpha", help="TanhNorm alpha (0.2).")]
BetaOpt = Annotated[Optional[float], typer.Option("--tanh-beta", help="TanhNorm beta (1.0).")]


# ---- shared safety options ---------------------------------------------------------------------
AllowPickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle", help="Also load pickle weights (pytorch_model.bin, adapter_model.bin); only for files you "
                           "trust (default: safetensors only).")]
AllowOutsideImagesOpt = Annotated[bool, typer.Option(
    "--allow-outside-images", help="Accept dataset image paths that lead outside the image folder (absolute paths, "
                                   "'..', links out of it); default: refused.")]


# ---- shared run options ------------------------------------------------------------------------
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu | cuda (default: cuda when available).")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="auto | float32 | float16 | bfloat16 (default: the checkpoint's).")]


def parse_layers(text: str) -> list[int]:
    layers: list[int] = []
    try:
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise RecipeError(f"--layers range {part!r} is empty (its end is below its start); "
                                      f"write it as '{hi}-{lo}'")
                if hi >= MAX_LAYERS:
                    raise RecipeError(f"--layers range {part!r} goes past layer {MAX_LAYERS - 1}, more than any "
                                      "supported model has")
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(part))
            if len(layers) > MAX_LAYERS:
                raise RecipeError(f"--layers lists more than {MAX_LAYERS} layers")
    except ValueError:
        raise RecipeError(f"--layers must look like '8,9,12' or '8-31', got {text!r}") from None
    if not layers:
        raise RecipeError(f"--layers {text!r} names no layer; give at least one, e.g. '8,9,12' or '8-31'")
    return layers


def parse_ratios(text: str) -> list[float | None]:
    out: list[float | None] = []
    for part in text.replace(" ", "").split(","):
        if part.lower() in ("dense", "none", "-"):
            out.append(None)
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise RecipeError(f"--ratios entries must be numbers or 'dense', got {part!r}") from None
    return out


def build_recipe(recipe: Path | None, schedule: str | None, avg_ratio: float | None, max_ratio: float | None,
                 min_ratio: float | None, ratio: float | None, layers: str | None, ratios: str | None,
                 tanh_alpha: float | None, tanh_beta: float | None, dtype: str | None = None) -> Recipe:
    base = Recipe.load(recipe) if recipe is not None else Recipe()
    s, r = base.schedule, base.router
    if ratios is not None and schedule is None:
        schedule = "explicit"
    if ratio is not None and schedule is None:
        schedule = "constant"
    overrides = {"kind": schedule, "avg_ratio": avg_ratio, "max_ratio": max_ratio, "min_ratio": min_ratio,
                 "ratio": ratio, "layers": parse_layers(layers) if layers else None,
                 "ratios": parse_ratios(ratios) if ratios else None}
    for key, value in overrides.items():
        if value is not None:
            setattr(s, key, value)
    if tanh_alpha is not None:
        r.tanh_alpha = tanh_alpha
    if tanh_beta is not None:
        r.tanh_beta = tanh_beta
    if dtype is not None:
        base.dtype = dtype
    return base.validate()


