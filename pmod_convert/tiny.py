"""Tiny random-weight multimodal models for tests and demos (no downloads, CPU friendly).

Test scaffolding: it builds on the adapters (each family's ``tiny_config`` / ``dummy_inputs`` /
``tiny_processor``) and on ``pmod_convert.adapters.scaffold`` (vocabulary, tokenizer); the package core never
imports this module.

All tiny configs share one vocabulary layout: ids ``0..RESERVED-1`` are special tokens (pad, bos,
eos, the vision placeholders of every family, ...) plus a few chat-template words (see
``SPECIAL_TOKENS``; e.g. ``<image>`` = 4, ``<|image_pad|>`` = 8, ``<video>`` = 5) and ids
``RESERVED..vocab_size-1`` are plain words ``w<id>``.  ``dummy_inputs`` draws text only from the
plain words, so text never collides with a special or vision id.

``build_tiny_model(family)`` builds the model in eval mode; ``save_tiny_checkpoint(family, path)``
writes a loadable checkpoint folder (config + safetensors + tokenizer + image processor, and the
processor where it can be built without torchvision).

Overrides accepted by every ``tiny_config`` (and forwarded by the functions here):

* ``num_hidden_layers``, ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
  ``num_key_value_heads``, ``vocab_size``, ``max_position_embeddings``, ``head_dim``,
  ``rms_norm_eps``: go to the text (decoder) config.
* ``text_<key>``: any other text-config key; ``vision_<key>``: any vision-config key (except the top-level
  ``vision_feature_layer``, ``vision_feature_select_strategy`` and ``vision_aspect_ratio``).
* ``attn_implementation`` (``"sdpa"`` default, or ``"eager"``): set as ``_attn_implementation`` on
  the top config and, recursively, every sub-config.
* ``tie_word_embeddings``: top and text config.
* anything else: top-level config keys (e.g. ``image_grid_pinpoints``, ``scale_factor``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from .adapters import adapter_by_family, get_adapter
from .adapters.scaffold import RESERVED, SPECIAL_TOKENS, tok
from .adapters.scaffold import build_tokenizer as _build_tokenizer
from .adapters.scaffold import chat_template as _chat_template


def build_tokenizer(vocab_size: int, *, family: str, chat_template: str | None = None,
                    words: Sequence[str] | None = None):
    """The tiny ``PreTrainedTokenizerFast`` of ``family``: the shared vocabulary with the family's token strings,
    named special tokens and pad/bos/eos (see ``adapters.scaffold.build_tokenizer`` for ``words``)."""
    a = adapter_by_family(family)
    return _build_tokenizer(vocab_size, named=a.tiny_named_tokens, special=a.tiny_special_tokens,
                            renames=a.tiny_token_names, chat_template=chat_template, words=words)


def build_tiny_model(family: str, seed: int = 0, **overrides: Any):
    """Build ``(model, config)`` for a family's tiny config with seeded random weights, in eval mode."""
    adapter = adapter_by_family(family)
    config = adapter.tiny_config(**overrides)
    torch.manual_seed(seed)
    model = adapter.model_cls()(config)
    adapter.tiny_init(model)
    model.eval()
    return model, config


def chat_template(model_type: str, *, end_of_turn: bool = False) -> str:
    """The tiny chat template of a ``model_type`` (its adapter's ``tiny_chat_style`` and image/video text).

    ``end_of_turn``: the llava template closes every assistant turn with ``</s>`` (the eos token), so a
    model trained on rendered conversations learns to stop after its answer. ChatML templates always
    close turns with ``<|im_end|>``.
    """
    a = get_adapter({"model_type": model_type})
    return _chat_template(a.tiny_chat_style, image=a.tiny_image_text, video=a.tiny_video_text,
                          end_of_turn=end_of_turn)


def save_processor_files(config: Any, path: str | os.PathLike, *, words: Sequence[str] | None = None,
                         end_of_turn: bool = False) -> None:
    """Write the tokenizer, image processor and (where possible) processor of a tiny ``config`` to ``path``.

    ``words`` / ``end_of_turn``: see ``build_tokenizer`` and ``chat_template``.
    """
    adapter = get_adapter(config)
    template = chat_template(config.model_type, end_of_turn=end_of_turn)
    tokenizer = build_tokenizer(adapter.text_config(config).vocab_size, family=adapter.family,
                                chat_template=template, words=words)
    ip, proc, note = adapter.tiny_processor(config, tokenizer, template)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if proc is not None:
        proc.save_pretrained(path)
    else:
        tokenizer.save_pretrained(path)
        ip.save_pretrained(path)
        if note:
            with open(os.path.join(path, "pmod_tiny_note.json"), "w") as f:
                json.dump({"processor_not_saved": note}, f)


def save_tiny_checkpoint(family: str, path: str | os.PathLike, seed: int = 0, *, words: Sequence[str] | None = None,
                         end_of_turn: bool = False, **overrides: Any):
    """Write a tiny checkpoint folder: config, safetensors weights, tokenizer, image processor, processor.

    The tokenizer is a WordLevel ``PreTrainedTokenizerFast`` (with the family's special tokens and a simple chat
    template), loadable with ``AutoTokenizer``. The image processor is the family's PIL-backend class. A full
    processor (``AutoProcessor``) is saved where the family's processor class can be built without torchvision;
    otherwise (a processor with a video processor) only tokenizer + image processor are saved, with a
    ``pmod_tiny_note.json`` saying why. ``words`` names the plain-word ids (see ``build_tokenizer``);
    ``end_of_turn`` closes llava assistant turns with ``</s>`` (see ``chat_template``). Returns ``(model, config)``.
    """
    model, config = build_tiny_model(family, seed=seed, **overrides)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    save_processor_files(config, path, words=words, end_of_turn=end_of_turn)
    return model, config


__all__ = [
    "RESERVED",
    "SPECIAL_TOKENS",
    "build_tiny_model",
    "save_tiny_checkpoint",
    "build_tokenizer",
    "chat_template",
    "save_processor_files",
    "tok",
]
