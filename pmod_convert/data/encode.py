"""Samples -> model inputs with the checkpoint's own processor and chat template, plus training labels.

``input_ids`` are what transformers' ``processor.apply_chat_template(..., tokenize=True)`` builds for the same
conversation: the rendered prompt goes through the processor in one piece, with the tokenizer's special tokens
(BOS) added only when the template did not already write BOS. Images go where the row's ``<image>`` markers put
them; a row whose order the chat template cannot render (LLaVA-1.5's template writes every image first) is
refused, as is text that writes a vision placeholder token. Images are decoded as transformers' ``load_image``
does (EXIF orientation applied), with 16-bit images scaled to 8 bits rather than clipped.

Labels keep only the assistant answers (the template's text for that turn, with its end-of-turn marker or,
where the template has none, the tokenizer's EOS appended): everything else is -100. ``instruction_mask``
marks the user/system text tokens (not vision tokens), which masked routing learning never skips.

Family quirks come from the family's adapter: processors taking one list of images per text
(``nested_images``), M-RoPE token types (``mm_token_types``), and what to do when the processor class cannot be
built here because its video processor needs torchvision: build it without a video processor
(``processor_without_video``; video rows are refused anyway), or expand the image placeholder from the image
processor's outputs (``fallback_image_tokens``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import re

import torch

from ..adapters import get_adapter
from ..checkpoint import read_config
from ..errors import DataError
from .conversations import IMAGE_MARKER, Sample, split_markers

IGNORE = -100
PER_TOKEN = ("mm_token_type_ids", "token_type_ids")


class SampleEncoder:
    """Turns :class:`Sample` rows into tensors for one checkpoint (``from_pretrained``)."""

    def __init__(self, config: Any, tokenizer: Any, processor: Any = None, image_processor: Any = None):
        self.config = config
        self.adapter = get_adapter(config)
        self.tokenizer = tokenizer
        self.processor = processor
        self.image_processor = image_processor if processor is None else getattr(processor, "image_processor", None)
        self.vision_ids = set(self.adapter.vision_token_ids(config))
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.adapter.pad_token_id(config))
        self.eos_token_id = tokenizer.eos_token_id
        owner = processor if processor is not None and getattr(processor, "chat_template", None) else tokenizer
        if getattr(owner, "chat_template", None) is None:
            raise DataError("the checkpoint has no chat template (chat_template.jinja or in tokenizer_config.json); "
                            "add one so prompts are formatted the way the model was trained")
        self._template = owner
        self._layouts: dict[tuple[bool, ...], str] = {}  # image/text order -> "" or why the template cannot

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path) -> "SampleEncoder":
        """The encoder of a checkpoint folder: its config, processor (or tokenizer + image processor).

        The family is checked on ``config.json`` before any transformers ``Auto*`` call, and every call passes
        ``trust_remote_code=False``: a checkpoint's own Python code (``auto_map``) is never run or offered.

        Raises:
            CheckpointError: the folder or its config.json is missing or invalid.
            UnsupportedArchitecture: the checkpoint's ``model_type`` is not a supported family.
            DataError: the processor, tokenizer, image processor or chat template is missing or unusable.
        """
        import transformers as tf

        adapter = get_adapter(read_config(checkpoint))  # one-line errors for a missing folder / config / family
        safe = {"trust_remote_code": False}
        config = tf.AutoConfig.from_pretrained(str(checkpoint), **safe)
        model_type = config.model_type
        needs_video = None  # why AutoProcessor could not be built here, when its video processor needs torchvision
        try:
            processor = tf.AutoProcessor.from_pretrained(str(checkpoint), **safe)
        except ImportError as exc:  # the processor class needs torchvision
            needs_video, processor = (str(exc).strip().splitlines() or ["torchvision missing"])[0], None
        except RecursionError:  # transformers 5.24 recurses looking up a video processor class without torchvision
            needs_video, processor = "its video processor class cannot be looked up without torchvision", None
        except (OSError, ValueError) as exc:  # no processor / tokenizer files, or unreadable ones
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if "torchvision" not in first:
                raise DataError(f"{checkpoint} has no usable processor ({first[:160]}); copy the processor and "
                                "tokenizer files of the original model into it") from None
            needs_video, processor = first, None  # some processor classes say so with an OSError
        if processor is not None and not hasattr(processor, "image_processor"):
            processor = None  # AutoProcessor fell back to a bare tokenizer
        try:
            tokenizer = (processor.tokenizer if processor is not None
                         else tf.AutoTokenizer.from_pretrained(str(checkpoint), **safe))
            image_processor = (None if processor is not None
                               else tf.AutoImageProcessor.from_pretrained(str(checkpoint), **safe))
        except (OSError, ValueError) as exc:
            raise DataError(f"{checkpoint} lacks its tokenizer or image processor files ({str(exc).splitlines()[0]})") from None
        if processor is None:
            processor = adapter.processor_without_video(str(checkpoint), tokenizer, image_processor)
        if processor is None and not adapter.placeholder_fallback:
            if needs_video:
                raise DataError(f"the {model_type} processor cannot be built here ({needs_video}); install torchvision")
            raise DataError(f"{checkpoint} has no processor files (processor_config.json); save the processor with "
                            "the checkpoint")
        return cls(config, tokenizer, processor, image_processor)

    # ---- prompts ------------------------------------------------------------------------------------
    def messages(self, turns: list[tuple[str, str]], n_images: int,
                 parts: list[str | None] | None = None) -> list[dict]:
        """Chat-template messages: the images go into the first user turn, where ``parts`` puts them (text
        pieces and ``None`` per image, see :class:`Sample`) or, without ``parts``, before its text."""
        out, placed = [], False
        for role, text in turns:
            content: list[dict] = []
            if role == "user" and not placed:
                placed = True
                if parts is not None:
                    out.append({"role": role, "content": [_part(p) for p in parts]})
                    continue
                content = [{"type": "image"} for _ in range(n_images)]
            content.append({"type": "text", "text": text})
            out.append({"role": role, "content": content})
        return out

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self._template.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def sample_messages(self, turns: list[tuple[str, str]], n_images: int,
                        parts: list[str | None] | None = None) -> list[dict]:
        """``messages`` after checking that the template can place the images where ``parts`` says and that no
        turn writes a vision placeholder token as text.

        Raises:
            DataError: the chat template moves images away from their ``<image>`` markers (e.g. LLaVA-1.5's
                template renders every image first), or a turn's text holds a vision placeholder token.
        """
        texts = [text for _, text in turns] + [p for p in parts or [] if p is not None]
        for token in self.vision_placeholders:
            if any(token in text for text in texts):
                raise DataError(f"a turn's text holds the vision placeholder {token!r}, which would become a vision "
                                "token without image features; mark images with <image> (images only) instead")
        if parts is not None:
            self._check_layout(parts)
        return self.messages(turns, n_images, parts)

    @property
    def vision_placeholders(self) -> list[str]:
        """The token strings of the family's vision placeholders (image and video), as the template writes them."""
        names = self.tokenizer.convert_ids_to_tokens(sorted(self.vision_ids))
        return [n for n in names if n and n != self.tokenizer.unk_token]

    def _check_layout(self, parts: list[str | None]) -> None:
        """Raises DataError when the chat template renders images and text in another order than ``parts``."""
        key = tuple(p is None for p in parts)
        if key in self._layouts:
            if self._layouts[key]:
                raise DataError(self._layouts[key])
            return
        image = self.adapter.template_image_token(self.config, self.tokenizer)
        sentinels = [f"pmodprobe{k}q" for k in range(len(parts))]
        content = [_part(None if p is None else sentinels[k]) for k, p in enumerate(parts)]
        rendered = self.render([{"role": "user", "content": content}], generation_prompt=True)
        expected = ["<image>" if p is None else sentinels[k] for k, p in enumerate(parts)]
        pattern = re.compile("|".join(re.escape(t) for t in [image, *sentinels]))
        found = ["<image>" if m.group() == image else m.group() for m in pattern.finditer(rendered)]
        message = ""
        if found != expected:
            order = " ".join("<image>" if p is None else "text" for p in parts)
            message = (f"the {self.config.model_type} chat template cannot place images where this row's <image> "
                       f"markers put them ({order}): it renders them elsewhere; put the <image> markers at the start "
                       "of the human turn (or drop them), or use a checkpoint whose template keeps the order")
        self._layouts[key] = message
        if message:
            raise DataError(message)

    # ---- encoding -----------------------------------------------------------------------------------
    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Training inputs of one sample: model inputs + ``labels`` + ``instruction_mask`` (batch dim 1).

        ``input_ids`` are exactly what the checkpoint's processor builds from the rendered conversation (the
        same path as ``processor.apply_chat_template(..., tokenize=True)``), except that an answer the template
        does not close with a special token gets the tokenizer's EOS after it (so the model learns to stop).

        Raises:
            DataError: the template does not render turn by turn, moves images away from their markers, a
                turn holds a vision placeholder, or the processor tokenizes the answers differently from the
                tokenizer (answers cannot be located).
        """
        msgs = self.sample_messages(sample.turns, len(sample.images), sample.parts)
        full = self.render(msgs)
        spans = []
        for i, (role, _) in enumerate(sample.turns):
            if role != "assistant":
                continue
            before, upto = self.render(msgs[:i], generation_prompt=True), self.render(msgs[:i + 1])
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError("the chat template does not render conversations turn by turn (a prefix changes "
                                "when a turn is added); answers cannot be located for the labels")
            spans.append((len(before), len(upto)))

        extra = self._process(full, sample.images)
        ids = extra.pop("input_ids")[0].tolist()
        extra.pop("attention_mask", None)
        # Answer boundaries in tokens: the plain tokenizer on the same text (no image expansion), then shifted by
        # the expansion, which lies wholly before the first answer (images only in the first human turn).
        special = self._add_special_tokens(full)
        plain = self.tokenizer(full, add_special_tokens=special)["input_ids"]
        shift = len(ids) - len(plain)
        bounds = [(self._token_index(full, plain, a, special), self._token_index(full, plain, b, special))
                  for a, b in spans]
        first = bounds[0][0] if bounds else len(plain)
        if shift < 0 or ids[first + shift:] != plain[first:]:
            raise DataError("the processor tokenizes the answers differently from the tokenizer; answers cannot be "
                            "located for the labels")

        out_ids, labels, positions = [], [], []  # positions: index into ids, or -1 for an added EOS
        cursor = 0
        for a, b in bounds:
            a, b = a + shift, b + shift
            out_ids += ids[cursor:a]
            labels += [IGNORE] * (a - cursor)
            positions += range(cursor, a)
            out_ids += ids[a:b]
            labels += ids[a:b]
            positions += range(a, b)
            if self.eos_token_id is not None and (a == b or ids[b - 1] not in self.special_ids):
                out_ids.append(int(self.eos_token_id))
                labels.append(int(self.eos_token_id))
                positions.append(-1)
            cursor = b
        out_ids += ids[cursor:]
        labels += [IGNORE] * (len(ids) - cursor)
        positions += range(cursor, len(ids))
        instruction = [label == IGNORE and t not in self.vision_ids for t, label in zip(out_ids, labels)]

        out = {"input_ids": torch.tensor([out_ids]), "attention_mask": torch.ones(1, len(out_ids), dtype=torch.long)}
        index = torch.tensor([max(p, 0) for p in positions])
        added = torch.tensor([p < 0 for p in positions])
        for key, value in extra.items():  # per-token extras follow the tokens; an added EOS is text (0)
            out[key] = value[..., index].masked_fill(added, 0) if key in PER_TOKEN else value
        out["labels"] = torch.tensor([labels])
        out["instruction_mask"] = torch.tensor([instruction])
        return out

    def _token_index(self, text: str, plain: list[int], char: int, special: bool) -> int:
        """The token index in ``plain`` (the tokens of ``text``) where ``text[:char]`` ends (a token that
        straddles the boundary counts as after it)."""
        if char >= len(text):
            return len(plain)
        prefix = self.tokenizer(text[:char], add_special_tokens=special)["input_ids"]
        n = 0
        for x, y in zip(prefix, plain):
            if x != y:
                break
            n += 1
        return n

    def encode_checked(self, sample: Sample, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``encode`` with processor failures, over-long samples and samples without answer tokens as DataError.

        An empty answer (every assistant turn blank) counts as none: it would leave only the end-of-turn token to
        learn, so the finetune would train the model to answer nothing."""
        if not any(text.strip() for role, text in sample.turns if role == "assistant"):
            raise DataError("has an empty answer (nothing but the end of the turn to learn)")
        try:
            item = self.encode(sample)
        except DataError:
            raise
        except (ValueError, RuntimeError, OSError, KeyError, IndexError) as exc:  # processor errors on odd inputs
            raise DataError(f"cannot be encoded ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from None
        n = int(item["input_ids"].shape[-1])
        if max_length is not None and n > max_length:
            raise DataError(f"has {n} tokens, more than max_length {max_length} (truncating would cut image tokens)")
        if int((item["labels"][:, 1:] != IGNORE).sum()) == 0:
            raise DataError("has no answer tokens to learn from")
        return item

    def encode_for_generation(self, sample: Sample) -> tuple[dict[str, torch.Tensor], str]:
        """Inputs up to the last answer (with the generation prompt), and that answer's reference text.

        The inputs equal ``processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``.

        Raises:
            DataError: the template moves images away from their markers, a turn holds a vision placeholder,
                an image cannot be read, or the processor rejects the sample.
        """
        last = max(i for i, (role, _) in enumerate(sample.turns) if role == "assistant")
        try:
            msgs = self.sample_messages(sample.turns[:last], len(sample.images), sample.parts)
            inputs = self._process(self.render(msgs, generation_prompt=True), sample.images)
        except DataError:
            raise
        except (ValueError, RuntimeError, OSError, KeyError, IndexError) as exc:  # processor errors on odd inputs
            raise DataError(f"cannot be encoded ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from None
        return inputs, sample.turns[last][1]

    def encode_prompt(self, images: list[Any] | None = None, prompt: str = "") -> dict[str, torch.Tensor]:
        """One-turn generation inputs for ``prompt`` about ``images`` (paths or PIL images).

        ``<image>`` markers in ``prompt`` say where the images go (one per image); without markers the images
        come first. The inputs equal ``processor.apply_chat_template(..., add_generation_prompt=True,
        tokenize=True)`` for the same message.

        Raises:
            DataError: the number of markers differs from the number of images, the template cannot place the
                images where the markers are, the prompt holds a vision placeholder, or an image cannot be read.
        """
        images = list(images or [])
        markers = prompt.count(IMAGE_MARKER)
        if markers and markers != len(images):
            raise DataError(f"the prompt has {markers} <image> markers for {len(images)} images")
        parts = split_markers(prompt) if markers else None
        msgs = self.sample_messages([("user", prompt.replace(IMAGE_MARKER, "").strip())], len(images), parts)
        return self._process(self.render(msgs, generation_prompt=True), images)

    def decode(self, token_ids: Any) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    @property
    def special_ids(self) -> set[int]:
        # all_special_ids misses added special tokens such as chat-template turn markers
        added = {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        return set(self.tokenizer.all_special_ids) | added

    def _add_special_tokens(self, text: str) -> bool:
        """Whether the tokenizer adds its special tokens (BOS) to a rendered prompt: not when the template
        already wrote BOS, as in transformers' ``processor.apply_chat_template(..., tokenize=True)``."""
        bos = self.tokenizer.bos_token
        return not (bos is not None and text.startswith(bos))

    def _process(self, text: str, images: list[Any]) -> dict[str, torch.Tensor]:
        pil = [_load_image(i) for i in images]
        special = self._add_special_tokens(text)
        if not pil:
            out = dict(self.tokenizer(text, return_tensors="pt", add_special_tokens=special))
        elif self.processor is not None:
            arg = [pil] if self.adapter.nested_images else pil
            out = dict(self.processor(text=text, images=arg, return_tensors="pt", add_special_tokens=special))
        else:
            out = self._expand_and_tokenize(text, pil, special)
        if self.adapter.mm_token_types and "mm_token_type_ids" not in out:
            # M-RoPE needs the token types the real processor returns: 0 text, 1 image.
            out["mm_token_type_ids"] = (out["input_ids"] == int(self.config.image_token_id)).long()
        n, limit = int(out["input_ids"].shape[-1]), self.max_positions
        if limit is not None and n > limit:
            raise DataError(f"has {n} tokens, more than the {limit} positions the model has "
                            "(max_position_embeddings); shorten the row")
        return out

    @property
    def max_positions(self) -> int | None:
        """The language model's ``max_position_embeddings`` (tokens), or None when the config names none."""
        text = getattr(self.config, "text_config", None) or self.config
        value = getattr(text, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def _expand_and_tokenize(self, text: str, images: list[Any], special: bool = True) -> dict[str, torch.Tensor]:
        arg = [images] if self.adapter.nested_images else images
        pixels = dict(self.image_processor(images=arg, return_tensors="pt"))
        placeholder = self.adapter.template_image_token(self.config, self.tokenizer)
        parts = text.split(placeholder)
        if len(parts) - 1 != len(images):
            raise DataError(f"the prompt has {len(parts) - 1} image placeholders for {len(images)} images")
        expanded = self.adapter.fallback_image_text(self.config, pixels, self.image_processor, placeholder)
        text = parts[0] + "".join(e + rest for e, rest in zip(expanded, parts[1:]))
        out = dict(self.tokenizer(text, return_tensors="pt", add_special_tokens=special))
        out.update(pixels)
        return out


def _part(piece: str | None) -> dict:
    """A message content block: an image for ``None``, else text."""
    return {"type": "image"} if piece is None else {"type": "text", "text": piece}


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def _load_image(image: Any):
    """An RGB PIL image from a path or a PIL image, as transformers' ``load_image`` (EXIF orientation applied),
    except that 16-bit images are scaled to 8 bits instead of clipped to white by ``convert("RGB")``.

    Raises:
        DataError: the file cannot be read, or it is a 32-bit integer or float image (no known range).
    """
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                img.load()
                return _to_rgb(img, str(image))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"image {image} cannot be read ({exc})") from None
    if not hasattr(image, "convert"):
        return image
    return _to_rgb(image, "the image")


def _to_rgb(img: Any, name: str):
    import numpy as np
    from PIL import Image, ImageOps

    sixteen = img.mode in _SIXTEEN_BIT or (img.mode == "I" and img.format == "PNG")  # 16-bit PNGs may open as "I"
    if img.mode in ("I", "F") and not sixteen:
        raise DataError(f"{name} is a 32-bit {'float' if img.mode == 'F' else 'integer'} image with no known value "
                        "range; save it as an 8- or 16-bit PNG or a JPEG")
    img = ImageOps.exif_transpose(img)
    if sixteen:
        wide = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    return img.convert("RGB")
