"""``pmod_manifest.json``: name, size and sha256 of every file of an exported folder, checked on load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..checkpoint import OUTPUT_MARKER
from ..errors import CheckpointError

MANIFEST_NAME = "pmod_manifest.json"
MANIFEST_FORMAT = 1
EXPORT_SETTINGS = "export_settings.yaml"  # written by every export (pipeline.SETTINGS_FILE)
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path) -> dict:
    """List every file under ``folder`` (except the manifest) with its size and sha256."""
    folder = Path(folder)
    files = []
    # The toolkit's own marker (see checkpoint.atomic_folder) is bookkeeping, not part of the export.
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST_NAME, OUTPUT_MARKER)):
        files.append({"name": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size,
                      "sha256": sha256_file(path)})
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_manifest(folder: str | Path) -> bool:
    """Check the files listed in ``folder/pmod_manifest.json``; False when the folder has no manifest and is
    not an export.

    Raises ``CheckpointError`` naming the first missing, truncated or corrupted file, or when a folder that says
    it is an export (it holds ``export_settings.yaml``) has no manifest: deleting the manifest does not turn the
    checks off.
    """
    folder = Path(folder)
    manifest_file = folder / MANIFEST_NAME
    if not manifest_file.is_file():
        if (folder / EXPORT_SETTINGS).is_file():
            raise CheckpointError(f"{folder} is an export ({EXPORT_SETTINGS}) but has no {MANIFEST_NAME}, so its "
                                  "files cannot be checked; export it again")
        return False
    try:
        manifest = json.loads(manifest_file.read_text())
        entries = [(str(e["name"]), int(e["bytes"]), str(e["sha256"])) for e in manifest["files"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{manifest_file} cannot be read ({type(exc).__name__}: {exc}); "
                              "the export is corrupt, export it again") from None
    if manifest.get("format", 0) > MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_file} was written by a newer pmod-convert; upgrade pmod-convert")
    for name, size, digest in entries:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST_NAME}); the export is incomplete, "
                                  "export it again")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path} is truncated or altered: {actual} bytes, {MANIFEST_NAME} says {size}; "
                                  "export it again")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path} is corrupted: its sha256 differs from {MANIFEST_NAME}; export it again")
    return True
