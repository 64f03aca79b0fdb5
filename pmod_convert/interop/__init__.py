"""Reading checkpoints written by other code bases into pmod-convert's format."""

from .pmod_original import ImportResult, import_pmod

__all__ = ["ImportResult", "import_pmod"]
