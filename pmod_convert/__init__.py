"""pmod-convert: turn dense multimodal LLMs into Mixture-of-Depths models (p-MoD)."""

__version__ = "0.1.0"

from .progress import quiet_known_noise  # noqa: E402

quiet_known_noise()  # one exact library notice users cannot act on (see progress.QUIETED), also for API users

from .api import add_routers, convert, is_pmod_model, layer_infos, load_dense, load_pretrained, save_pretrained, set_scorers  # noqa: E402
from .errors import CheckpointError, DataError, PmodError, RecipeError, UnsupportedArchitecture  # noqa: E402
from .recipe import Recipe, RouterSettings, ScheduleSettings  # noqa: E402

# The functions behind the pipeline commands, imported on first use (they pull in peft, bitsandbytes,
# accelerate and matplotlib, which plain conversion does not need).
_LAZY = {
    "calibrate": ("calibration", "calibrate"),
    "finetune": ("training", "finetune"),
    "FinetuneSettings": ("training", "FinetuneSettings"),
    "export_checkpoint": ("export", "export"),
    "evaluate": ("evaluation", "evaluate"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__", "add_routers", "convert", "is_pmod_model", "layer_infos", "load_dense", "load_pretrained",
    "save_pretrained", "set_scorers", "Recipe", "RouterSettings", "ScheduleSettings", "PmodError", "RecipeError",
    "CheckpointError", "DataError", "UnsupportedArchitecture", *_LAZY,
]
