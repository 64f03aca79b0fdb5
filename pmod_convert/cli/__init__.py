"""The ``pmod-convert`` command line: thin Typer commands over the Python API.

Each module of this package registers its commands on the shared ``app`` (``common.py``); they are
imported here, so adding a command means adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Annotated

import typer

from .. import __version__
from .common import app

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("common", "__main__"):
        importlib.import_module(f"{__name__}.{_module.name}")


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    app(prog_name="pmod-convert")


if __name__ == "__main__":
    sys.exit(main())
