"""LLaVA-style conversation datasets: JSON or JSONL rows with images and human/gpt turns.

A row looks like ``{"id": ..., "image": "rel/path.png" | ["a.png", ...], "conversations": [{"from": "human",
"value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}``. Image paths are relative to an
image folder. ``<image>`` markers say where an image goes (``Sample.parts``); rows without markers get their
images at the start of the first human turn (LLaVA's convention). Images may only appear in the first human turn.
Video rows (a ``video`` / ``videos`` key or a ``<video>`` marker) are refused: no video processor is used, and a
dangling ``<video>`` token without video features would train on inputs the row did not mean.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    """One conversation: resolved image paths and ``(role, text)`` turns with image markers removed.

    ``parts``: where the row's ``<image>`` markers put its images in the first human turn, as that turn's
    text pieces (stripped, empty ones dropped) with ``None`` for each image, in order; ``None`` when the row
    has no markers (the images go at the start of the first human turn).
    """

    id: str
    images: list[Path]
    turns: list[tuple[str, str]]
    row: int  # 1-based row number in the source file (line number for JSONL)
    parts: list[str | None] | None = None


def split_markers(text: str) -> list[str | None]:
    """``text`` as its pieces between ``<image>`` markers (stripped, empty ones dropped), ``None`` per marker."""
    out: list[str | None] = []
    for k, piece in enumerate(text.split(IMAGE_MARKER)):
        if k:
            out.append(None)
        if piece.strip():
            out.append(piece.strip())
    return out


@dataclass
class Dataset:
    samples: list[Sample]
    source: Path
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def read_samples(path: str | Path, image_folder: str | Path | None = None, *, skip_bad_rows: bool = False,
                 limit: int | None = None, allow_outside_images: bool = False) -> Dataset:
    """Read and check every row (images exist, decode and lie inside the image folder).

    Image paths must stay inside ``image_folder`` (no ``..``, absolute paths or links leading out of it)
    unless ``allow_outside_images`` (the CLI's ``--allow-outside-images``).

    Raises:
        DataError: the file or image folder is missing, the file is not JSON / JSONL, or a row is bad (a
            missing, unreadable or outside image, malformed turns, a video row); bad rows are skipped and counted
            instead
            with ``skip_bad_rows``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; pass a LLaVA-style .json or .jsonl file")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    folder = Path(image_folder) if image_folder is not None else path.parent
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; pass --image-folder DIR")
    data = Dataset(samples=[], source=path)
    for row, record in _records(path):
        try:
            data.samples.append(_parse(record, row, folder, allow_outside_images))
        except DataError as exc:
            if not skip_bad_rows:
                raise DataError(f"{path} {exc}; fix the row or pass --skip-bad-rows") from None
            data.skipped += 1
            data.skipped_reasons.append(str(exc))
        if limit is not None and len(data.samples) >= limit:
            break
    if not data.samples:
        raise DataError(f"{path} has no usable rows ({data.skipped} skipped)")
    return data


def _records(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; pass a LLaVA-style .json or .jsonl file") from None
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped and stripped[0] == "{"):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path} must hold a JSON list of rows (or be JSONL, one row per line)")
    yield from enumerate(rows, 1)


def _parse(record: object, row: int, folder: Path, allow_outside_images: bool = False) -> Sample:
    if not isinstance(record, dict):
        raise DataError(f"row {row} is not a JSON object")
    sid = str(record.get("id", row))
    where = f"row {row} (id {sid!r})"
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where} has no conversations")
    names = record.get("image", [])
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    if not allow_outside_images:
        for name in names:
            _check_inside(folder, name, where)
    videos = [key for key in ("video", "videos") if key in record]
    if videos or any(isinstance(t, dict) and VIDEO_MARKER in str(t.get("value", "")) for t in conversations):
        what = f"a {videos[0]!r} key" if videos else "a <video> marker"
        raise DataError(f"{where} is a video row ({what}); video rows are not supported (images only), drop the "
                        "row or pass --skip-bad-rows to skip it")
    images = [_check_image(folder / name, where) for name in names]

    turns: list[tuple[str, str]] = []
    parts: list[str | None] | None = None
    markers = 0
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {i} needs 'from' and a string 'value'")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(f"{where}: turn {i} has unknown speaker {turn.get('from')!r} (use human/gpt)")
        count = turn["value"].count(IMAGE_MARKER)
        if count and (role != "user" or any(r == "user" for r, _ in turns)):
            raise DataError(f"{where}: <image> may only appear in the first human turn")
        markers += count
        if count:
            parts = split_markers(turn["value"])
        turns.append((role, turn["value"].replace(IMAGE_MARKER, "").strip()))
    if markers not in (0, len(images)):
        raise DataError(f"{where} has {markers} <image> markers but {len(images)} images")
    if images and not any(r == "user" for r, _ in turns):
        raise DataError(f"{where} has images but no human turn to show them in")
    if not any(r == "assistant" for r, _ in turns):
        raise DataError(f"{where} has no gpt answer")
    if turns[0][0] == "assistant":
        raise DataError(f"{where} starts with a gpt turn; the first turn must be human (or system)")
    return Sample(id=sid, images=images, turns=turns, row=row, parts=parts)


def _check_inside(folder: Path, name: str, where: str) -> None:
    """Raises DataError when image ``name`` (relative to ``folder``) leads out of it, by its path or by a link."""
    base = folder.resolve()
    lexical = Path(os.path.normpath(base / name))
    try:
        resolved = (folder / name).resolve()
    except (OSError, RuntimeError):
        resolved = lexical
    if not (lexical.is_relative_to(base) and resolved.is_relative_to(base)):
        raise DataError(f"{where}: image {name!r} lies outside the image folder {folder}; keep images inside it "
                        "or pass --allow-outside-images")


def _check_image(path: Path, where: str) -> Path:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: image {path} cannot be read ({exc})") from None
    return path.resolve()
