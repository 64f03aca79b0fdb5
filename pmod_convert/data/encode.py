"""Samples -> model inputs with the checkpoint's own processor and chat template, plus training labels.

Labels keep only the assistant answers (the template's text for that turn, with its end-of-turn marker or,
where the template has none, the tokenizer's EOS appended): everything else is -100. ``instruction_mask``
marks the user/system text tokens (not vision tokens), which masked routing learning never skips.

Families whose processor class needs torchvision (Qwen2-VL/Qwen2.5-VL video processors) fall back to the
tokenizer plus the image processor, expanding the image placeholder themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters import get_adapter
from ..checkpoint import read_config
from ..errors import DataError
from .conversations import Sample

IGNORE = -100
PER_TOKEN = ("mm_token_type_ids", "token_type_ids")
_NESTED_IMAGES = ("idefics3", "smolvlm")  # processors that take one list of images per text
_EXPAND_FALLBACK = ("qwen2_vl", "qwen2_5_vl")  # placeholder repeated grid_t*grid_h*grid_w / merge**2 times


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

        get_adapter(read_config(checkpoint))  # one-line errors for a missing folder / config / unknown family
        safe = {"trust_remote_code": False}
        config = tf.AutoConfig.from_pretrained(str(checkpoint), **safe)
        model_type = config.model_type
        try:
            processor = tf.AutoProcessor.from_pretrained(str(checkpoint), **safe)
        except ImportError as exc:  # the processor class needs torchvision
            if model_type not in _EXPAND_FALLBACK:
                raise DataError(f"the {model_type} processor cannot be built here ({str(exc).strip().splitlines()[0]}); "
                                "install torchvision") from None
            processor = None
        if processor is not None and not hasattr(processor, "image_processor"):
            processor = None  # AutoProcessor fell back to a bare tokenizer
        try:
            tokenizer = (processor.tokenizer if processor is not None
                         else tf.AutoTokenizer.from_pretrained(str(checkpoint), **safe))
            image_processor = (None if processor is not None
                               else tf.AutoImageProcessor.from_pretrained(str(checkpoint), **safe))
        except (OSError, ValueError) as exc:
            raise DataError(f"{checkpoint} lacks its tokenizer or image processor files ({str(exc).splitlines()[0]})") from None
        if processor is None and model_type not in _EXPAND_FALLBACK:
            raise DataError(f"{checkpoint} has no processor files (processor_config.json); save the processor with "
                            "the checkpoint")
        return cls(config, tokenizer, processor, image_processor)

    # ---- prompts ------------------------------------------------------------------------------------
    def messages(self, turns: list[tuple[str, str]], n_images: int) -> list[dict]:
        out, placed = [], False
        for role, text in turns:
            content: list[dict] = []
            if role == "user" and not placed:
                content = [{"type": "image"} for _ in range(n_images)]
                placed = True
            content.append({"type": "text", "text": text})
            out.append({"role": role, "content": content})
        return out

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self._template.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    # ---- encoding -----------------------------------------------------------------------------------
    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Training inputs of one sample: model inputs + ``labels`` + ``instruction_mask`` (batch dim 1)."""
        msgs = self.messages(sample.turns, len(sample.images))
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
        pieces, cursor = [], 0
        for start, end in spans:
            pieces += [(full[cursor:start], False), (full[start:end], True)]
            cursor = end
        if cursor < len(full):
            pieces.append((full[cursor:], False))

        ids, labels, instruction = [], [], []
        extra: dict[str, torch.Tensor] = {}
        for index, (text, is_answer) in enumerate(pieces):
            if index == 0:
                first = self._process(text, sample.images)
                piece = first.pop("input_ids")[0].tolist()
                first.pop("attention_mask", None)
                extra = first
            else:
                piece = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
            if is_answer and self.eos_token_id is not None and (not piece or piece[-1] not in self.special_ids):
                piece = piece + [self.eos_token_id]
            ids += piece
            labels += piece if is_answer else [IGNORE] * len(piece)
            instruction += [not is_answer and t not in self.vision_ids for t in piece]
        out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        for key, value in extra.items():  # per-token extras cover the first piece only: later pieces are text (0)
            out[key] = F.pad(value, (0, len(ids) - value.shape[-1])) if key in PER_TOKEN else value
        out["labels"] = torch.tensor([labels])
        out["instruction_mask"] = torch.tensor([instruction])
        return out

    def encode_checked(self, sample: Sample, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``encode`` with processor failures, over-long samples and samples without answer tokens as DataError."""
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
        """Inputs up to the last answer (with the generation prompt), and that answer's reference text."""
        last = max(i for i, (role, _) in enumerate(sample.turns) if role == "assistant")
        msgs = self.messages(sample.turns[:last], len(sample.images))
        try:
            inputs = self._process(self.render(msgs, generation_prompt=True), sample.images)
        except DataError:
            raise
        except (ValueError, RuntimeError, OSError, KeyError, IndexError) as exc:  # processor errors on odd inputs
            raise DataError(f"cannot be encoded ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from None
        return inputs, sample.turns[last][1]

    def encode_prompt(self, images: list[Any] | None = None, prompt: str = "") -> dict[str, torch.Tensor]:
        """One-turn generation inputs for ``prompt`` about ``images`` (paths or PIL images)."""
        images = list(images or [])
        msgs = self.messages([("user", prompt)], len(images))
        return self._process(self.render(msgs, generation_prompt=True), images)

    def decode(self, token_ids: Any) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    @property
    def special_ids(self) -> set[int]:
        # all_special_ids misses added special tokens such as chat-template turn markers
        added = {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        return set(self.tokenizer.all_special_ids) | added

    def _process(self, text: str, images: list[Any]) -> dict[str, torch.Tensor]:
        pil = [_load_image(i) for i in images]
        if not pil:
            out = dict(self.tokenizer(text, return_tensors="pt"))
        elif self.processor is not None:
            arg = [pil] if self.config.model_type in _NESTED_IMAGES else pil
            out = dict(self.processor(text=text, images=arg, return_tensors="pt"))
        else:
            out = self._expand_and_tokenize(text, pil)
        if self.config.model_type in _EXPAND_FALLBACK:
            # M-RoPE needs the token types the real processor returns: 0 text, 1 image.
            out["mm_token_type_ids"] = (out["input_ids"] == int(self.config.image_token_id)).long()
        return out

    def _expand_and_tokenize(self, text: str, images: list[Any]) -> dict[str, torch.Tensor]:
        pixels = dict(self.image_processor(images=images, return_tensors="pt"))
        merge = int(getattr(self.image_processor, "merge_size", 1)) ** 2
        placeholder = self.tokenizer.convert_ids_to_tokens(int(self.config.image_token_id))
        parts = text.split(placeholder)
        if len(parts) - 1 != len(images):
            raise DataError(f"the prompt has {len(parts) - 1} image placeholders for {len(images)} images")
        counts = [int(g.prod()) // merge for g in pixels["image_grid_thw"]]
        text = parts[0] + "".join(" ".join([placeholder] * n) + rest for n, rest in zip(counts, parts[1:]))
        out = dict(self.tokenizer(text, return_tensors="pt"))
        out.update(pixels)
        return out


def _load_image(image: Any):
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataError(f"image {image} cannot be read ({exc})") from None
    return image.convert("RGB") if hasattr(image, "convert") else image
