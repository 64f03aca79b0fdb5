import copy
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pmod_convert import Recipe, ScheduleSettings
from pmod_convert.adapters import adapter_by_family, all_adapters
from pmod_convert.cli import app
from pmod_convert.mod.router import ROUTER_NAME
from pmod_convert.tiny import build_tiny_model

FAMILIES = [a.family for a in all_adapters()]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_periodic_progress(monkeypatch):
    """Piped progress lines (pmod_convert.progress) appear once a stage has run PMOD_PROGRESS_INTERVAL seconds;
    on a slow shared machine they must not join outputs that tests read line by line (tests of those lines set
    the interval themselves)."""
    monkeypatch.setenv("PMOD_PROGRESS_INTERVAL", "3600")


_MODEL_CACHE: dict = {}


def tiny_model(family: str, attn: str = "sdpa", **overrides):
    """A fresh copy of a cached tiny dense model (building is the slow part)."""
    key = (family, attn, tuple(sorted(overrides.items())))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = build_tiny_model(family, attn_implementation=attn, **overrides)
    model, config = _MODEL_CACHE[key]
    return copy.deepcopy(model), config


def batch_inputs(family: str, config, batch_size: int = 2, seed: int = 0):
    """Left-padded batch whose rows differ in text length and in vision tokens (the adapter's ``tiny_varied``)."""
    adapter = adapter_by_family(family)
    extra = dict(adapter.tiny_varied) if batch_size == 2 else {}
    return adapter.dummy_inputs(config, batch_size=batch_size, seed=seed, **extra)


def single_rows(family: str, config):
    """Two single-row samples that differ in text length and vision tokens (the adapter's ``tiny_rows``)."""
    adapter = adapter_by_family(family)
    return [adapter.dummy_inputs(config, batch_size=1, seed=i, **kw) for i, kw in enumerate(adapter.tiny_rows)]


# ---- helpers shared by several test modules (``from conftest import ...``) ----

runner = CliRunner()
CONSTANT = Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5))


def constant(ratio, layers=None):
    return Recipe(schedule=ScheduleSettings(kind="constant", ratio=ratio, layers=layers))


def randomize_routers(model, seed=1, std=0.5):
    """Give every router of ``model`` seeded random weights (so the selection depends on the tokens)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ROUTER_NAME in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def run(*args):
    """Run the CLI in-process: ``(exit code, output)``."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    """The single ``error:`` line of a failed command (and no traceback)."""
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes (to prove nothing changed)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny dense LLaVA checkpoint (4 decoder layers) saved with ``save_pretrained``."""
    from pmod_convert.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("dense")
    save_tiny_checkpoint("llava", root / "llava", num_hidden_layers=4)
    return root / "llava"


@pytest.fixture(scope="module")
def mod(dense, tmp_path_factory):
    """``dense`` converted with routers at a constant ratio of 0.5 in every layer."""
    from pmod_convert import convert

    return convert(dense, tmp_path_factory.mktemp("mod") / "mod", CONSTANT)


def copy_tree(src: Path, dst: Path) -> Path:
    """A copy of the files directly in ``src`` (no subfolders) into a new folder ``dst``."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst
