"""A seeded synthetic visual question-answering dataset: a few small shapes on a plain background.

Each image is ``size`` x ``size`` pixels with one to three shapes (circle, square, triangle) in pure
colours on a plain background, so most image patches are background and the answer always depends
on the few foreground patches -- the situation Mixture-of-Depths routing is made for.

Questions have one-word answers (colour, shape, count, left/right, top/bottom, yes/no) or are multiple
choice answered by a letter; ``kinds`` chooses among them. A scene's only shape is "the object" in its questions
(the quickstart asks about single-shape scenes: colour and position, each answer needing the image). Splits are
written as LLaVA-style JSON files next to an ``images/`` folder::

    DIR/images/train_00000.png ...
    DIR/train.json   several questions per image (a multi-turn conversation: more supervision per image)
    DIR/val.json     one question per image
    DIR/test.json    one question per image
    DIR/dataset.json the settings, counts and vocabulary

Every row carries its scene (``"scene"``) and question kinds (``"kinds"``) besides the usual ``id``,
``image`` and ``conversations``, so answers can be checked and accuracy broken down by question kind.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PmodError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle")
# The CLIP image processor's mean colour: after normalisation the background is exactly zero, so background
# patches embed to (almost) nothing but their position and the few foreground patches stand out from the start.
BACKGROUND = (123, 117, 104)
COUNT_WORDS = ("zero", "one", "two", "three")
LETTERS = ("A", "B", "C")
QUESTION_KINDS = ("colour", "shape", "count", "horizontal", "vertical", "exists", "choice")
MC_SUFFIX = "answer with the letter"
SPLITS = ("train", "val", "test")


class DatasetSettingsError(PmodError):
    """Invalid settings for the synthetic dataset."""


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    cx: int  # centre, pixels
    cy: int
    radius: int  # half of the bounding box side

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)


@dataclass(frozen=True)
class Question:
    kind: str  # one of QUESTION_KINDS
    text: str
    answer: str


@dataclass
class DatasetInfo:
    root: Path
    image_size: int
    counts: dict[str, int]  # images per split
    questions: dict[str, int]  # questions per split
    vocabulary: list[str]

    def split(self, name: str) -> Path:
        return self.root / f"{name}.json"

    @property
    def image_folder(self) -> Path:
        return self.root / "images"


# ------------------------------------------------------------------------------------------------
# Scenes
# ------------------------------------------------------------------------------------------------


CELL = 16  # shapes sit in a grid of 16 px cells, aligned with the vision tower's 8 px patches


def draw_scene(rng: random.Random, size: int = 64, max_shapes: int = 3) -> list[Shape]:
    """One to ``max_shapes`` shapes, each filling its own grid cell, no two in neighbouring cells.

    A shape's 15 px box lies inside its 16 px cell (so wholly on one side of both midlines), and cells that
    share an edge or a corner are never both used (so shapes stand apart). Aligning cells with the patch grid
    keeps each shape's patches alike from image to image: a tower trained from scratch for a few minutes
    learns to tell circles from squares and triangles.
    """
    side = size // CELL
    free = [(cx, cy) for cy in range(side) for cx in range(side)]
    shapes = []
    for _ in range(rng.randint(1, max_shapes)):
        gx, gy = rng.choice(free)
        free = [(x, y) for x, y in free if max(abs(x - gx), abs(y - gy)) > 1]
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), gx * CELL + CELL // 2,
                            gy * CELL + CELL // 2, CELL // 2 - 1))
        if not free:
            break
    return shapes


def _apart(a: Shape, b: Shape, gap: int) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + gap < bx0 or bx1 + gap < ax0 or ay1 + gap < by0 or by1 + gap < ay0


def render(shapes: list[Shape], size: int = 64):
    """The scene as an RGB PIL image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x0, y0, x1, y1 = s.box
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


# ------------------------------------------------------------------------------------------------
# Questions
# ------------------------------------------------------------------------------------------------


# A scene's only shape is "the object": naming it by its kind or colour would give away the answer to the other
# questions of the same conversation (and a model would learn to copy it from the text instead of the image).


def _unique(values: list[str]) -> list[str]:
    return sorted(v for v in set(values) if values.count(v) == 1)


def _named_by(rng, shapes, attribute: str) -> tuple[str, Shape] | None:
    """A value of ``attribute`` ("kind" or "colour") that names exactly one shape, and that shape."""
    values = _unique([getattr(s, attribute) for s in shapes])
    if not values:
        return None
    value = rng.choice(values)
    return value, next(s for s in shapes if getattr(s, attribute) == value)


def _colour_q(rng, shapes):
    if len(shapes) == 1:
        return Question("colour", "what colour is the object?", shapes[0].colour)
    named = _named_by(rng, shapes, "kind")
    return None if named is None else Question("colour", f"what colour is the {named[0]}?", named[1].colour)


def _shape_q(rng, shapes):
    if len(shapes) == 1:
        return Question("shape", "what shape is the object?", shapes[0].kind)
    named = _named_by(rng, shapes, "colour")
    return None if named is None else Question("shape", f"what shape is the {named[0]} object?", named[1].kind)


def _count_q(rng, shapes):
    # Half of the time a kind that is in the scene, else one that is not (if any): "zero" is not a blind answer.
    present = sorted({s.kind for s in shapes})
    absent = [k for k in SHAPES if k not in present]
    kind = rng.choice(present if rng.random() < 0.5 or not absent else absent)
    count = sum(s.kind == kind for s in shapes)
    return Question("count", f"how many {kind}s are there?", COUNT_WORDS[count])


def _position_q(rng, shapes, size, horizontal):
    named = ("object", shapes[0]) if len(shapes) == 1 else _named_by(rng, shapes, "kind")
    if named is None:
        return None
    kind, shape = named
    if horizontal:
        return Question("horizontal", f"is the {kind} on the left or the right?",
                        "left" if shape.cx < size / 2 else "right")
    return Question("vertical", f"is the {kind} at the top or the bottom?", "top" if shape.cy < size / 2 else "bottom")


def _exists_q(rng, shapes):
    present = {(s.colour, s.kind) for s in shapes}
    if rng.random() < 0.5:
        colour, kind = rng.choice(sorted(present))
    else:
        absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
        # Half of the "no" cases share the colour or the shape of an object: no shortcut on one attribute.
        near = [(c, k) for c, k in absent if any(c == pc or k == pk for pc, pk in present)]
        colour, kind = rng.choice(near if near and rng.random() < 0.5 else absent)
    return Question("exists", f"is there a {colour} {kind}?", "yes" if (colour, kind) in present else "no")


def _choice_q(rng, shapes):
    base = _colour_q(rng, shapes) if rng.random() < 0.5 else _shape_q(rng, shapes)
    if base is None:
        base = _colour_q(rng, shapes) or _shape_q(rng, shapes)
    if base is None:
        return None
    pool = list(COLOURS) if base.kind == "colour" else list(SHAPES)
    options = [base.answer] + rng.sample([p for p in pool if p != base.answer], len(LETTERS) - 1)
    rng.shuffle(options)
    listed = " ".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
    text = f"{base.text} {listed} {MC_SUFFIX}."
    return Question("choice", text, LETTERS[options.index(base.answer)])


CAPTION_PROMPT = "describe the image."


def describe(shapes: list[Shape], size: int = 64) -> str:
    """A caption listing every shape in reading order: "red circle top left, blue square bottom right."."""
    ordered = sorted(shapes, key=lambda s: (s.cy >= size / 2, s.cx, s.cy))
    parts = [f"{s.colour} {s.kind} {'top' if s.cy < size / 2 else 'bottom'} {'left' if s.cx < size / 2 else 'right'}"
             for s in ordered]
    return ", ".join(parts) + "."


def ask(rng: random.Random, shapes: list[Shape], kind: str, size: int = 64) -> Question | None:
    """A question of ``kind`` about the scene with its correct answer (None if the scene cannot support it)."""
    makers: dict[str, Callable] = {
        "colour": lambda: _colour_q(rng, shapes),
        "shape": lambda: _shape_q(rng, shapes),
        "count": lambda: _count_q(rng, shapes),
        "horizontal": lambda: _position_q(rng, shapes, size, True),
        "vertical": lambda: _position_q(rng, shapes, size, False),
        "exists": lambda: _exists_q(rng, shapes),
        "choice": lambda: _choice_q(rng, shapes),
    }
    if kind not in makers:
        raise DatasetSettingsError(f"unknown question kind {kind!r}; choose from {', '.join(QUESTION_KINDS)}")
    return makers[kind]()


def questions_for(rng: random.Random, shapes: list[Shape], n: int, size: int = 64,
                  kinds: Sequence[str] = QUESTION_KINDS) -> list[Question]:
    """Up to ``n`` questions of distinct kinds among ``kinds`` (drawn uniformly among those the scene supports)."""
    kinds = list(kinds)
    rng.shuffle(kinds)
    out = []
    for kind in kinds:
        q = ask(rng, shapes, kind, size)
        if q is not None:
            out.append(q)
        if len(out) == n:
            break
    return out


def vocabulary() -> list[str]:
    """Every word the generator can produce (questions, answers, options), punctuation split off."""
    words = set(COLOURS) | set(SHAPES) | {f"{s}s" for s in SHAPES} | set(COUNT_WORDS) | set(LETTERS)
    words |= set("what colour is the shape object how many are there on left or right at top bottom a".split())
    words |= {"yes", "no", "?", ".", ",", "answer", "with", "letter", "describe", "image"}
    return sorted(words)


def split_words(text: str) -> list[str]:
    """Whitespace split with ``?``, ``.`` and ``,`` as separate words (how the demo tokenizer splits)."""
    out = []
    for word in text.split():
        token = ""
        for ch in word:
            if ch in "?.,":
                if token:
                    out.append(token)
                out.append(ch)
                token = ""
            else:
                token += ch
        if token:
            out.append(token)
    return out


# ------------------------------------------------------------------------------------------------
# Writing splits
# ------------------------------------------------------------------------------------------------


def _row(sid: str, image: str, shapes: list[Shape], questions: list[Question]) -> dict:
    conversations = []
    for i, q in enumerate(questions):
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q.text})
        conversations.append({"from": "gpt", "value": q.answer})
    return {"id": sid, "image": image, "conversations": conversations,
            "kinds": [q.kind for q in questions], "scene": [asdict(s) for s in shapes]}


def iter_split(name: str, n_images: int, questions_per_image: int, seed: int, size: int = 64,
               max_shapes: int = 3, caption: bool = False, kinds: Sequence[str] = QUESTION_KINDS):
    """Yield ``(row, PIL image)`` for one split; the same (name, seed, settings) always gives the same split.

    ``caption``: end every conversation with "describe the image." and the scene's caption (dense supervision
    of every shape's colour, kind and position: it teaches a model from scratch to look at the image).
    """
    rng = random.Random(f"{seed}-{name}")
    for i in range(n_images):
        shapes = draw_scene(rng, size, max_shapes)
        questions = questions_for(rng, shapes, questions_per_image, size, kinds)
        if not questions:  # only kinds that need a uniquely named shape, and none is: ask for the count instead
            questions = [_count_q(rng, shapes)]
        if caption:
            questions.append(Question("caption", CAPTION_PROMPT, describe(shapes, size)))
        yield _row(f"{name}-{i:05d}", f"{name}_{i:05d}.png", shapes, questions), render(shapes, size)


def make_dataset(root: str | Path, *, train: int = 3000, val: int = 200, test: int = 400,
                 train_questions: int = 3, train_captions: bool = True, seed: int = 0, size: int = 64,
                 max_shapes: int = 3, kinds: Sequence[str] = QUESTION_KINDS,
                 progress: Callable[[str, int, int], None] | None = None) -> DatasetInfo:
    """Write the splits under ``root`` (train: ``train_questions`` turns per image, then a caption turn with
    ``train_captions``; val/test: one question each), questions drawn among ``kinds``.

    ``max_shapes=1`` gives single-object scenes: every question is about the one shape, so answering needs the
    image but never "which object does the question name" (a tiny model learns it in a few hundred steps).

    ``progress(split, done, total)`` is called after every image (for progress bars).
    """
    if size < 2 * CELL or size % (2 * CELL):
        raise DatasetSettingsError(f"image size must be a multiple of {2 * CELL} px, got {size}")
    if min(train, val, test) < 1:
        raise DatasetSettingsError("every split needs at least one image")
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in QUESTION_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise DatasetSettingsError(f"question kinds must be distinct and among {', '.join(QUESTION_KINDS)}, "
                                   f"got {', '.join(kinds) or 'none'}")
    if not 1 <= train_questions <= len(kinds):
        raise DatasetSettingsError(f"train_questions must be in 1..{len(kinds)}, got {train_questions}")
    if not 1 <= max_shapes <= 3:
        raise DatasetSettingsError(f"max_shapes must be in 1..3, got {max_shapes}")
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    counts, questions = {}, {}
    for name, n, per_image in (("train", train, train_questions), ("val", val, 1), ("test", test, 1)):
        rows = []
        caption = train_captions and name == "train"
        for i, (row, image) in enumerate(iter_split(name, n, per_image, seed, size, max_shapes, caption, kinds)):
            image.save(images / row["image"])
            rows.append(row)
            if progress is not None:
                progress(name, i + 1, n)
        (root / f"{name}.json").write_text(json.dumps(rows, indent=1))
        counts[name], questions[name] = n, sum(len(r["kinds"]) for r in rows)
    info = DatasetInfo(root=root, image_size=size, counts=counts, questions=questions, vocabulary=vocabulary())
    meta = {"seed": seed, "image_size": size, "max_shapes": max_shapes, "kinds": list(kinds),
            "train_questions": train_questions,
            "train_captions": train_captions,
            "images": counts, "questions": questions, "vocabulary": info.vocabulary,
            "colours": {k: list(v) for k, v in COLOURS.items()}, "background": list(BACKGROUND)}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return info


def blind_baseline(train_rows: list[dict], test_rows: list[dict]) -> float:
    """Accuracy of answering without the image: the "chance" a model must clearly beat to show it reads the image.

    Two blind strategies, the better one per question kind: the most common training answer to the same
    question text (unseen texts: of their kind), or the most common training answer of the question's kind.
    The first exploits priors such as "circles are often counted zero"; the second does not overfit question
    texts that are rare in training (per text, "is there a red circle?" is a coin toss; per kind, "no" wins).
    """
    hits = _blind_hits(train_rows, test_rows)
    return sum(h for h, _ in hits.values()) / max(sum(n for _, n in hits.values()), 1)


def blind_baseline_by_kind(train_rows: list[dict], test_rows: list[dict]) -> dict[str, float]:
    """``blind_baseline`` per question kind of the test rows."""
    return {kind: h / n for kind, (h, n) in sorted(_blind_hits(train_rows, test_rows).items())}


def _blind_hits(train_rows: list[dict], test_rows: list[dict]) -> dict[str, tuple[int, int]]:
    """Per kind: (correct blind answers of the better strategy, questions)."""
    from collections import Counter

    by_text: dict[str, Counter] = {}
    by_kind: dict[str, Counter] = {}
    for row in train_rows:
        conv = row["conversations"]
        for i, kind in enumerate(row["kinds"]):
            text = conv[2 * i]["value"].replace("<image>", "").strip()
            answer = conv[2 * i + 1]["value"]
            by_text.setdefault(text, Counter())[answer] += 1
            by_kind.setdefault(kind, Counter())[answer] += 1

    def guess(counter: Counter | None) -> str:
        return counter.most_common(1)[0][0] if counter else ""

    tallies: dict[str, list[int]] = {}  # kind -> [per-text hits, per-kind hits, questions]
    for row in test_rows:
        conv, kind = row["conversations"], row["kinds"][-1]
        text, answer = conv[-2]["value"].replace("<image>", "").strip(), conv[-1]["value"]
        tally = tallies.setdefault(kind, [0, 0, 0])
        tally[0] += guess(by_text.get(text) or by_kind.get(kind)) == answer
        tally[1] += guess(by_kind.get(kind)) == answer
        tally[2] += 1
    return {kind: (max(t[0], t[1]), t[2]) for kind, t in tallies.items()}
