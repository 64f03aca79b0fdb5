"""Checkpoint folders: reading configs, copying processor files, atomic writes, router weights."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .mod.router import ROUTER_NAME
from .recipe import MAX_LAYERS

log = logging.getLogger("pmod_convert")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WRITTEN_BY_SAVE = ("config.json", "generation_config.json", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json", "recipe.yaml")
# Files that describe one particular output (its manifest, reports, plots): never carried into a new one.
OUTPUT_MARKER = ".pmod-convert"
MARKER_TEXT = "written by pmod-convert; --overwrite may replace this folder\n"
DERIVED = ("pmod_manifest.json", "export_report.json", "export_report.png", "export_settings.yaml",
           "calibration_report.json", "calibration_layers.png", "calibration_budget.png")


def read_config(path: str | Path) -> dict:
    """``config.json`` of a checkpoint folder as a dict, with one-line errors for the usual mistakes."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a local Hugging Face checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the checkpoint folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint saved with save_pretrained?")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")
    check_config_numbers(data, config_file)
    check_pmod_section(data, config_file)
    return data


# Sizes a config may give (each an integer >= 1 up to the bound): far above any released model, far below what
# would exhaust memory while the model is built. Checked on every config.json read, before any allocation.
CONFIG_BOUNDS = {"num_hidden_layers": MAX_LAYERS, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
                 "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 4096, "vocab_size": 1 << 24}


def check_config_numbers(config: dict, where: str | Path = "config.json") -> None:
    """Refuse a config whose model sizes (top level and ``*_config`` sections) are not integers in
    ``1..CONFIG_BOUNDS[key]`` (``hidden_size: "big"``, 10^9 layers): a one-line ``CheckpointError``."""
    sections = [("", config)] + [(f"{k}.", v) for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    for prefix, section in sections:
        for key, bound in CONFIG_BOUNDS.items():
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise CheckpointError(f"{where}: {prefix}{key} must be an integer, got {value!r}; the config is corrupt")
            if not 1 <= value <= bound:
                raise CheckpointError(f"{where}: {prefix}{key} is {value}, outside 1..{bound}; the config is corrupt "
                                      "or not a model pmod-convert can build")


MAX_POSITION_PRIOR = 1e6  # far above any useful prior (router logits are O(1)), far below float32 overflow


def check_pmod_section(config: dict, where: str | Path = "config.json") -> None:
    """Refuse a stored ``pmod`` section whose ``layer_ratios`` are not a list of retention ratios in (0, 1]
    (or null for dense layers), whose ``position_prior`` (optional) is not one finite number or null per layer,
    whose ``scorer`` (optional) is not one of ``mod.scoring.SCORERS`` or null per layer,
    or whose router ``tanh_alpha`` / ``tanh_beta`` are not finite numbers."""
    pmod = config.get("pmod")
    if not isinstance(pmod, dict) or "layer_ratios" not in pmod:
        return
    ratios = pmod["layer_ratios"]
    if not isinstance(ratios, list) or not 1 <= len(ratios) <= MAX_LAYERS:
        raise CheckpointError(f"{where}: pmod.layer_ratios must be a list of 1..{MAX_LAYERS} entries, got "
                              f"{str(ratios)[:60]}; the checkpoint is corrupt")
    for i, r in enumerate(ratios):
        if r is None:
            continue
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and 0 < r <= 1):
            raise CheckpointError(f"{where}: pmod.layer_ratios[{i}] is {r!r}, not a retention ratio in (0, 1] (or "
                                  "null for a dense layer); the checkpoint is corrupt")
    priors = pmod.get("position_prior")
    if priors is not None:
        if not isinstance(priors, list) or len(priors) != len(ratios):
            raise CheckpointError(f"{where}: pmod.position_prior must be a list with one entry per layer "
                                  f"({len(ratios)}), got {str(priors)[:60]}; the checkpoint is corrupt")
        for i, p in enumerate(priors):
            if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p)
                                  or abs(p) > MAX_POSITION_PRIOR):
                raise CheckpointError(f"{where}: pmod.position_prior[{i}] is {p!r}, not a number within "
                                      f"+-{MAX_POSITION_PRIOR:g} (or null); the checkpoint is corrupt")
    scorers = pmod.get("scorer")
    if scorers is not None:
        from .mod.scoring import SCORERS

        if not isinstance(scorers, list) or len(scorers) != len(ratios) or any(
                s is not None and s not in SCORERS for s in scorers):
            raise CheckpointError(f"{where}: pmod.scorer must be a list with one of {', '.join(SCORERS)} (or null) "
                                  f"per layer ({len(ratios)}), got {str(scorers)[:60]}; the checkpoint is corrupt")
        if any(s not in (None, "router") and r is None for s, r in zip(scorers, ratios)):
            raise CheckpointError(f"{where}: pmod.scorer names a scorer for a dense layer (layer_ratios null); the "
                                  "checkpoint is corrupt")
        if pmod.get("method", "pmod") != "pmod" and any(s not in (None, "router") for s in scorers):
            raise CheckpointError(f"{where}: pmod.scorer is set on a {pmod.get('method')} checkpoint, whose layers "
                                  "rank by their scoring layer's attention; the checkpoint is corrupt")
    router = pmod.get("router") or {}
    if not isinstance(router, dict):
        raise CheckpointError(f"{where}: pmod.router must be a mapping; the checkpoint is corrupt")
    for key in ("tanh_alpha", "tanh_beta"):
        value = router.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{where}: pmod.router.{key} is {value!r}, not a finite number; the checkpoint "
                                  "is corrupt")


def link_stays_inside(item: Path, root: Path) -> bool:
    """Whether ``item`` (a file in folder ``root``) is a regular file, or a symlink whose target stays inside
    ``root`` or is a blob of the Hugging Face cache repository that ``root`` is a snapshot of
    (``models--org--name/snapshots/<rev>/file -> ../../blobs/<sha>``)."""
    if not item.is_symlink():
        return True
    try:
        target, base = item.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling or looping link
        return False
    if target.is_relative_to(base):
        return True
    return base.parent.name == "snapshots" and target.parent == base.parent.parent / "blobs"


def copy_processor_files(source: str | Path, dest: str | Path) -> list[str]:
    """Copy tokenizer / processor / chat-template files (every top-level non-weight file we do not write).

    Never copied, each with a warning on the ``pmod_convert`` logger: Python files (a checkpoint's custom
    code) and symlinks pointing outside ``source`` (the Hugging Face cache's snapshot -> blob links are
    followed). ``auto_map`` entries (references to custom code) are removed from the JSON files of ``dest``.
    """
    source, dest = Path(source), Path(dest)
    copied, skipped = [], []
    for item in sorted(source.iterdir()):
        if item.name in WRITTEN_BY_SAVE + DERIVED + (OUTPUT_MARKER,) or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        if item.name.endswith((".py", ".pyc")) or not link_stays_inside(item, source):
            skipped.append(item.name)
            continue
        if not item.is_file():
            continue
        if (dest / item.name).exists():
            continue
        shutil.copy2(item, dest / item.name)
        copied.append(item.name)
    if skipped:
        log.warning("not copied from %s: %s (custom code, or links that point outside the folder)",
                    source, ", ".join(skipped))
    drop_remote_code(dest)
    return copied


def drop_remote_code(folder: str | Path) -> list[str]:
    """Remove ``auto_map`` (pointers to a checkpoint's own Python code) from the top-level JSON files of
    ``folder``; returns the names of the files changed (a warning on the ``pmod_convert`` logger names them)."""
    changed = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            del data["auto_map"]
            path.write_text(json.dumps(data, indent=2, sort_keys=path.name == "config.json") + "\n")
            changed.append(path.name)
    if changed:
        log.warning("removed auto_map (custom code references) from %s", ", ".join(changed))
    return changed


def written_by_pmod(folder: str | Path) -> bool:
    """Whether ``folder`` is an output of this toolkit: it holds the ``.pmod-convert`` marker that every folder
    written through :func:`atomic_folder` carries, or (outputs of versions before the marker) a config.json
    with a ``pmod`` section, a finetune sidecar's ``sidecar.json``, a finetune report or an eval output."""
    folder = Path(folder)
    if (folder / OUTPUT_MARKER).is_file() or (folder / "sidecar.json").is_file():
        return True
    if (folder / "summary.json").is_file() and ((folder / "log.jsonl").is_file()
                                                 or (folder / "predictions.jsonl").is_file()):
        return True
    try:
        return isinstance(json.loads((folder / "config.json").read_text()).get("pmod"), dict)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def check_replaceable(out: str | Path, protect: Iterable[str | Path] = ()) -> None:
    """Check that an existing ``out`` may be replaced by ``--overwrite`` (nothing to check when it is absent).

    Raises:
        CheckpointError: ``out`` is not a folder, is the current directory or one of its parents, is one of
            ``protect`` (the command's sources), a folder holding one or a folder inside one (existing or not),
            or is a non-empty folder that this
            toolkit did not write (see :func:`written_by_pmod`), or its folder is read-only, or its disk has
            less free space than the sources in ``protect`` take (see :func:`check_free_space`).
    """
    out = Path(out)
    inside = out.resolve()
    for source in protect:
        source = Path(source).resolve()
        if inside != source and inside.is_relative_to(source):
            raise CheckpointError(f"--out {out} is inside the source {source}; outputs never go into a source "
                                  "folder (its finetune sidecar or other files could be replaced): choose a folder "
                                  "outside it")
    check_writable(out)  # commands call this before their expensive work
    check_free_space(out, sum(_tree_bytes(Path(p)) for p in protect))
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder (a file or a link); choose another --out")
    target, cwd = out.resolve(), Path.cwd().resolve()
    if cwd == target or cwd.is_relative_to(target):
        raise CheckpointError(f"--out {out} is the current directory or holds it; --overwrite never replaces it, "
                              "choose another --out")
    for source in protect:
        source = Path(source).resolve()
        if source == target or source.is_relative_to(target):
            raise CheckpointError(f"--out {out} is the source {source} or a folder holding it; --overwrite never "
                                  "replaces a source, choose another --out")
    if any(target.iterdir()) and not written_by_pmod(target):
        raise CheckpointError(f"{out} exists and was not written by pmod-convert (no {OUTPUT_MARKER} file); "
                              "--overwrite only replaces pmod-convert's own outputs: choose another --out or "
                              "remove the folder yourself")


def _tree_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (0 for a missing folder or a file)."""
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def check_free_space(out: str | Path, need: int) -> None:
    """Refuse, before any expensive work, an ``out`` whose disk has less than ``need`` bytes (plus 5% and
    16 MiB) free; ``need`` is the size of the command's source folders, which its output is about the size of.

    Raises:
        CheckpointError: too little free space.
    """
    if need <= 0:
        return
    parent = Path(out).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    want = int(need * 1.05) + 16 * 2**20
    if free < want:
        raise CheckpointError(f"cannot write {out}: {parent} has {free / 2**20:.0f} MiB free and the output needs about "
                              f"{want / 2**20:.0f} MiB (the size of its source); free space or choose another --out")


def check_writable(out: str | Path) -> None:
    """Refuse, before any expensive work, an ``out`` whose folder (or nearest existing ancestor) cannot be written.

    Raises:
        CheckpointError: that folder is read-only for this process (or not a folder).
    """
    parent = Path(out).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out}: {parent} is read-only for this user; choose another --out")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(folder: Path) -> None:
    """Give ``folder`` and everything under it the modes a plain ``mkdir`` / ``open`` would under the umask
    (``mkdtemp`` makes 0700 folders, some writers 0600 files): folders and executables ``0o777 & ~umask``,
    other files ``0o666 & ~umask``. Links are left alone."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the C library, kernel or filesystem lacks it (the caller
    falls back), an ``OSError`` for any other failure (``FileExistsError`` when ``dst`` exists)."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd = -100
    if func(at_fdcwd, os.fsencode(str(src)), at_fdcwd, os.fsencode(str(dst)), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_no_replace(src: str | Path, dst: str | Path) -> None:
    """Move folder ``src`` to ``dst`` atomically, failing with ``FileExistsError`` if ``dst`` exists (even when it
    appears at the last moment): ``renameat2(RENAME_NOREPLACE)``, else claiming ``dst`` with ``mkdir`` (atomic
    and exclusive) and renaming over that empty folder."""
    src, dst = Path(src), Path(dst)
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise
    os.mkdir(dst)  # FileExistsError when another writer holds it
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise


_SCRATCH = ("tmp", "old", "stage")


def _scratch_name(out: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(out.name)}\.({'|'.join(_SCRATCH)})-[A-Za-z0-9_]+$")


@contextlib.contextmanager
def scratch_folder(out: str | Path, kind: str = "tmp", keep: bool = False) -> Iterator[Path]:
    """A folder ``.OUT.<kind>-XXXX`` beside ``out`` carrying the ``.pmod-convert`` marker and an exclusive
    ``flock`` for as long as the block runs: :func:`clean_stale` removes it only once no live process holds it
    (after a crash or kill -9). Removed at the end unless ``keep`` (then the caller has moved it away).

    Raises:
        CheckpointError: the folder cannot be created (read-only or missing parent, full disk).
    """
    out = Path(out)
    assert kind in _SCRATCH
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-", dir=out.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write beside {out} ({exc.strerror or exc}); choose another --out") from None
    fd = -1
    try:
        (folder / OUTPUT_MARKER).write_text(MARKER_TEXT)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise CheckpointError(f"cannot write {out} ({exc.strerror}); nothing was changed there") from None
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        if not keep or folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def clean_stale(out: str | Path) -> list[str]:
    """Remove this toolkit's own leftovers beside ``out`` from runs that crashed or were killed: folders named
    ``.OUT.tmp-*``, ``.OUT.old-*`` or ``.OUT.stage-*`` that carry the ``.pmod-convert`` marker and that no live
    process holds (see :func:`scratch_folder`). When ``out`` is missing and an ``.OUT.old-*`` folder holds the
    previous OUT (a crash between the two renames of a replace), it is moved back first. Returns the names
    removed (a warning on the ``pmod_convert`` logger lists them)."""
    out = Path(out)
    pattern, removed = _scratch_name(out), []
    if not out.parent.is_dir():
        return removed
    for item in sorted(out.parent.iterdir()):
        match = pattern.match(item.name)
        if not match or item.is_symlink() or not item.is_dir() or not (item / OUTPUT_MARKER).is_file():
            continue
        try:
            fd = os.open(item, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it
            os.close(fd)
            continue
        try:
            previous = item / out.name
            if match.group(1) == "old" and previous.is_dir() and not out.exists() and not out.is_symlink():
                rename_no_replace(previous, out)
                log.warning("restored %s from %s (an earlier replace was interrupted)", out, item.name)
            shutil.rmtree(item, ignore_errors=True)
            removed.append(item.name)
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        log.warning("removed leftovers of interrupted pmod-convert runs beside %s: %s", out, ", ".join(removed))
    return removed


def _replace(tmp: Path, out: Path, protect: Iterable[str | Path]) -> None:
    """Put folder ``tmp`` in place of the existing ``out`` so that ``out`` is never missing: an atomic exchange
    where the filesystem has one, else two renames with the old folder moved back on failure (and by
    :func:`clean_stale` after a crash between them)."""
    check_replaceable(out, protect)
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old OUT
        return
    with scratch_folder(out, "old") as old:
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / out.name, out)
            raise


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; move it to ``out`` only if the block completes.

    The folder carries the ``.pmod-convert`` marker from the start. Before the block: leftovers of our own
    interrupted runs beside ``out`` are removed (:func:`clean_stale`), and an unwritable parent is refused.
    The commit honours the umask (the folder gets ``0o777 & ~umask``, as ``mkdir`` would give it). Without
    ``overwrite`` the commit is a no-replace rename: if ``out`` appeared meanwhile (another writer), this
    writer fails and leaves it as it is. With ``overwrite``, an existing ``out`` is replaced only when
    :func:`check_replaceable` allows it (checked before the block runs and again before the move), never
    leaving ``out`` missing; ``protect``: source folders that must never be replaced.

    Raises:
        CheckpointError: ``out`` exists and ``overwrite`` is false (before or at the commit), it may not be
            replaced, or its folder cannot be written.
    """
    out = Path(out)
    clean_stale(out)  # first: it may move back an OUT that an interrupted replace left beside it
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    check_replaceable(out, protect)
    check_writable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create {out.parent} ({exc.strerror or exc}); choose another --out") from None
    with scratch_folder(out, "tmp", keep=True) as tmp:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(MARKER_TEXT)
        _honour_umask(tmp)
        try:
            rename_no_replace(tmp, out)
        except FileExistsError:
            if not overwrite:
                raise CheckpointError(f"{out} appeared while it was being written (another writer?) and was left "
                                      "as it is; choose another --out or pass --overwrite") from None
            _replace(tmp, out, protect)


UPDATE_NAME = "pmod-update"  # in-place scratch folders are named .pmod-update.tmp-XXXX


@contextlib.contextmanager
def update_in_place(folder: str | Path, written: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder inside ``folder``; when the block completes, move the files written there into
    ``folder`` one by one (each replace is atomic; ``config.json`` goes last), leaving every other file and
    subfolder of ``folder`` (``.git/``, notes, unknown files) untouched. Files equal to the ones already there
    are not moved. ``written``: names of files an earlier save may have written that the new one no longer
    writes (for example other weight shards); those are removed after the move.

    Raises:
        CheckpointError: ``folder`` is not an existing folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass an existing checkpoint folder")
    # A scratch folder inside the checkpoint (``.pmod-update.tmp-*``: marker + lock), so the next in-place run
    # removes what a killed one left, and never a live run's folder or anything else in the checkpoint.
    clean_stale(folder / UPDATE_NAME)
    with scratch_folder(folder / UPDATE_NAME) as tmp:
        yield tmp
        new = sorted((p for p in tmp.iterdir() if p.is_file()), key=lambda p: (p.name == "config.json", p.name))
        for item in new:
            dest = folder / item.name
            if dest.is_file() and not dest.is_symlink() and _same_bytes(item, dest):
                continue
            if dest.is_dir() and not dest.is_symlink():
                raise CheckpointError(f"{dest} is a folder where a file is written; move it away and run again")
            os.replace(item, dest)
        names = {p.name for p in new}
        for name in written:
            stale = folder / name
            if name not in names and stale.is_file() and not stale.is_symlink():
                stale.unlink()


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(1 << 20)
            if chunk != fb.read(1 << 20):
                return False
            if not chunk:
                return True


def copy_checkpoint_tree(source: str | Path, dest: str | Path, ignore: Iterable[str] = ()) -> None:
    """Copy a checkpoint folder's tree (``shutil.copytree``) without following links that point outside it
    (see :func:`link_stays_inside`), without Python files, and without the top-level names in ``ignore``."""
    root = Path(source)
    skip = set(ignore)

    def _ignored(directory: str, names: list[str]) -> set[str]:
        here = Path(directory)
        out = {n for n in names if n.endswith((".py", ".pyc")) or not link_stays_inside(here / n, root)}
        if here.resolve() == root.resolve():
            out |= skip & set(names)
        return out

    shutil.copytree(root, dest, dirs_exist_ok=True, ignore=_ignored)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(path: str | Path, allow_pickle: bool = False, what: str = "checkpoint",
                        flag: str = "--allow-pickle") -> bool:
    """Check that ``path`` holds its weights as safetensors; returns False when it holds pickle weights that
    ``allow_pickle`` lets through (the caller then loads them with ``weights_only`` pickling).

    Raises:
        CheckpointError: no weight file at all, or only pickle weights (``pytorch_model.bin``,
            ``adapter_model.bin``, ...) and ``allow_pickle`` is false.
    """
    path = Path(path)
    found = sorted(path.glob("*.safetensors"))
    if found:
        for file in found:
            check_safetensors_file(file, what)
        return True
    pickles = sorted(p.name for p in path.glob("*") if p.name.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise CheckpointError(f"{path} has no weights (*.safetensors); pass a complete {what} folder")
    if not allow_pickle:
        raise CheckpointError(f"{path} holds only pickle weights ({pickles[0]}), which pmod-convert does not load; "
                              f"convert the {what} to safetensors, or pass {flag} if you trust the file")
    return False


def check_safetensors_file(file: str | Path, what: str = "checkpoint") -> None:
    """Cheap integrity check of a safetensors file (its header, and that the data it lists fits the file):
    a one-line ``CheckpointError`` for a truncated or garbled file instead of a loader traceback."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= length <= min(size - 8, 1 << 27):
                raise ValueError("header too short or too large")
            header = json.loads(handle.read(length))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        if 8 + length + max(ends, default=0) > size:
            raise ValueError(f"{size} bytes, the header lists {8 + length + max(ends)}")
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{file} is truncated or not a safetensors file ({str(exc)[:120]}); the {what} is "
                              "corrupt") from None


def weight_files(path: str | Path) -> list[Path]:
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no .safetensors weights; save the model with safe_serialization")
    return files


_ROUTER_KEY = re.compile(rf"(?:^|\.)layers\.(\d+)\.{ROUTER_NAME}\.(weight|bias)$")


def router_key(key: str) -> tuple[int, str] | None:
    """``(layer index, "weight" | "bias")`` of a router parameter name, else None.

    Matching on the layer-relative suffix makes the name independent of where transformers puts the
    text model on disk (5.x saves LLaVA as ``language_model.model.layers.N`` while the module tree
    has ``model.language_model.layers.N``).
    """
    match = _ROUTER_KEY.search(key)
    return (int(match.group(1)), match.group(2)) if match else None


def read_routers(path: str | Path) -> dict[tuple[int, str], torch.Tensor]:
    """Router tensors of a checkpoint keyed by ``(layer index, "weight" | "bias")``."""
    out = {}
    for key, value in read_router_tensors(path).items():
        parsed = router_key(key)
        if parsed is not None:
            out[parsed] = value
    return out


def read_router_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every ``*.pmod_router.*`` tensor stored in the checkpoint's safetensors files (with ``allow_pickle``, in
    its ``pytorch_model*.bin`` files when it has no safetensors; read with ``weights_only`` unpickling)."""
    tensors: dict[str, torch.Tensor] = {}
    marker = f".{ROUTER_NAME}."
    if allow_pickle and not any(Path(path).glob("*.safetensors")):
        for file in sorted(Path(path).glob("pytorch_model*.bin")):
            try:
                state = torch.load(str(file), map_location="cpu", weights_only=True)
            except Exception as exc:  # a truncated file, or a pickle weights_only refuses
                raise CheckpointError(f"{file} cannot be read ({str(exc).splitlines()[0] if str(exc) else exc}); "
                                      "the checkpoint is corrupt") from None
            tensors.update({k: v for k, v in state.items() if marker in k})
        return tensors
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if marker in key:
                        tensors[key] = handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(f"{file} cannot be read ({exc}); the checkpoint is corrupt") from None
    return tensors
