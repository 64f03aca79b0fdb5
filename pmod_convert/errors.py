"""Errors raised by pmod-convert. The CLI prints them as one line and exits non-zero."""


class PmodError(Exception):
    """Base class: a problem the user can fix (bad input, unsupported model, corrupt file)."""

    exit_code = 2


class UnsupportedArchitecture(PmodError):
    """The model family has no adapter."""


class RecipeError(PmodError):
    """A recipe / schedule / option value is invalid."""


class CheckpointError(PmodError):
    """A checkpoint folder is missing, incomplete or corrupt."""


class DataError(PmodError):
    """A dataset file or row is missing, malformed or references an unreadable image."""
