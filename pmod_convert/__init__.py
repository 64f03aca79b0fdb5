"""pmod-convert: turn dense multimodal LLMs into Mixture-of-Depths models (p-MoD)."""

__version__ = "0.1.0"

from .api import add_routers, convert, is_pmod_model, layer_infos, load_dense, load_pretrained, save_pretrained  # noqa: E402
from .errors import CheckpointError, PmodError, RecipeError, UnsupportedArchitecture  # noqa: E402
from .recipe import Recipe, RouterSettings, ScheduleSettings  # noqa: E402

__all__ = [
    "__version__", "add_routers", "convert", "is_pmod_model", "layer_infos", "load_dense", "load_pretrained",
    "save_pretrained", "Recipe", "RouterSettings", "ScheduleSettings", "PmodError", "RecipeError",
    "CheckpointError", "UnsupportedArchitecture",
]
