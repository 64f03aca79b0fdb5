"""Tiny random-weight multimodal models for tests and demos (no downloads, CPU friendly).

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

# ---------------------------------------------------------------------------------------------
# Shared vocabulary layout
# ---------------------------------------------------------------------------------------------

RESERVED = 32
DEFAULT_VOCAB = 320

_NAMES = [
    "<pad>",  # 0
    "<s>",  # 1
    "</s>",  # 2
    "<unk>",  # 3
    "<image>",  # 4   LLaVA / NeXT / OneVision / Idefics3 / SmolVLM image placeholder
    "<video>",  # 5   OneVision video placeholder
    "<|vision_start|>",  # 6   Qwen2-VL
    "<|vision_end|>",  # 7
    "<|image_pad|>",  # 8   Qwen2-VL image placeholder
    "<|video_pad|>",  # 9   Qwen2-VL video placeholder
    "<fake_token_around_image>",  # 10  Idefics3 / SmolVLM
    "<global-img>",  # 11
    "<end_of_utterance>",  # 12
    "<|im_start|>",  # 13
    "<|im_end|>",  # 14
    "<|endoftext|>",  # 15
]
_NAMES += [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]  # 16..24
_NAMES += ["USER:", "ASSISTANT:", "user", "assistant", "system"]  # 25..29 plain words for chat templates
_NAMES += [f"<reserved_{i}>" for i in range(len(_NAMES), RESERVED)]
assert len(_NAMES) == RESERVED

SPECIAL_TOKENS: dict[str, int] = {name: i for i, name in enumerate(_NAMES)}

PAD, BOS, EOS = 0, 1, 2

TEXT_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "rms_norm_eps",
)


# Top-level multimodal config keys that merely start with "vision_" (not vision-tower settings).
TOP_LEVEL_VISION_KEYS = ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")


def tok(name: str) -> int:
    """Id of a special token of the shared tiny vocabulary."""
    return SPECIAL_TOKENS[name]


def split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict, str]:
    """Split ``tiny_config`` overrides into (text kwargs, vision kwargs, top kwargs, attn impl)."""
    text, vision, top = {}, {}, {}
    attn = "sdpa"
    for key, value in overrides.items():
        if key in ("attn_implementation", "_attn_implementation"):
            attn = value
        elif key in TOP_LEVEL_VISION_KEYS:
            top[key] = value
        elif key.startswith("text_"):
            text[key[len("text_"):]] = value
        elif key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        elif key in TEXT_KEYS:
            text[key] = value
        elif key == "tie_word_embeddings":
            text[key] = value
            top[key] = value
        else:
            top[key] = value
    vocab = text.get("vocab_size", DEFAULT_VOCAB)
    if vocab < RESERVED + 16:
        raise ValueError(f"tiny vocab_size must be >= {RESERVED + 16} (ids < {RESERVED} are special tokens)")
    return text, vision, top, attn


def text_defaults(**extra: Any) -> dict[str, Any]:
    """Default tiny decoder settings (hidden 64, 4 layers, 4 heads, 2 KV heads, vocab 320)."""
    d = dict(
        vocab_size=DEFAULT_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    d.update(extra)
    return d


def finish_config(config: Any, attn: str) -> Any:
    """Set the attention implementation on the config and all sub-configs."""
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn!r}")
    config._attn_implementation = attn
    return config


# ---------------------------------------------------------------------------------------------
# Dummy input assembly helpers (used by the family modules)
# ---------------------------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def per_row(value: Any, batch_size: int, default: Any, name: str) -> list:
    if value is None:
        return [default] * batch_size if not callable(default) else [default(i) for i in range(batch_size)]
    if isinstance(value, int):
        return [value] * batch_size
    value = list(value)
    if len(value) != batch_size:
        raise ValueError(f"{name} has {len(value)} entries for batch_size={batch_size}")
    return value


def per_image(sizes: Sequence | None, n_images: int, defaults: Sequence) -> list[tuple[int, int]]:
    """Flat per-image (height, width) list: given, or cycled from the family defaults."""
    if sizes is None:
        return [tuple(defaults[i % len(defaults)]) for i in range(n_images)]
    sizes = [tuple(int(x) for x in s) for s in sizes]
    if len(sizes) != n_images:
        raise ValueError(f"image_sizes has {len(sizes)} entries but the rows hold {n_images} images")
    return sizes


def default_text_lengths(batch_size: int) -> list[int]:
    return [8 + 5 * i for i in range(batch_size)]


def build_rows(
    segments_per_row: list[list[list[int]]],
    text_lengths: list[int],
    vocab_size: int,
    g: torch.Generator,
    *,
    prefix: Sequence[int] = (BOS,),
    pad_id: int = PAD,
    padding_side: str = "left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleave random text with vision segments, then pad into ``input_ids``/``attention_mask``.

    Each row is ``prefix + t0 + seg0 + t1 + seg1 + ... + tN`` where the ``text_lengths[i]`` random
    text tokens are split evenly over the ``len(segments)+1`` gaps.
    """
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    rows = []
    for segments, n_text in zip(segments_per_row, text_lengths):
        n_text = int(n_text)
        text = torch.randint(RESERVED, vocab_size, (n_text,), generator=g).tolist()
        gaps = len(segments) + 1
        bounds = [round(k * n_text / gaps) for k in range(gaps + 1)]
        row = list(prefix)
        for k in range(gaps):
            row += text[bounds[k]:bounds[k + 1]]
            if k < len(segments):
                row += list(segments[k])
        rows.append(row)
    max_len = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), max_len), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        sl = slice(max_len - n, max_len) if padding_side == "left" else slice(0, n)
        input_ids[i, sl] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, sl] = 1
    return input_ids, attention_mask


def rand_pixels(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


# ---------------------------------------------------------------------------------------------
# Tokenizer / processor files (built locally, no hub)
# ---------------------------------------------------------------------------------------------

_CHAT_TEMPLATES = {
    "llava": (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{END_OF_TURN} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}{IMAGE} {% elif c['type'] == 'video' %}{VIDEO} "
        "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
        "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    ),
}


def build_tokenizer(vocab_size: int, *, family: str, chat_template: str | None = None,
                    words: Sequence[str] | None = None):
    """A ``PreTrainedTokenizerFast`` over the shared tiny vocabulary (WordLevel, whitespace split).

    ``words``: real words for ids ``RESERVED, RESERVED+1, ...`` (the rest stay ``w<id>``); with words,
    ``?``, ``.`` and ``,`` are also split off as words of their own (list them in ``words`` too).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(_NAMES)}
    vocab.update({f"w{i}": i for i in range(RESERVED, vocab_size)})
    if words is not None:
        words = list(dict.fromkeys(words))
        clash = [w for w in words if w in SPECIAL_TOKENS or not w or any(c.isspace() for c in w)]
        if clash:
            raise ValueError(f"tokenizer words must be non-empty, without spaces and not special tokens: {clash[:5]}")
        if RESERVED + len(words) > vocab_size:
            raise ValueError(f"{len(words)} words need vocab_size >= {RESERVED + len(words)}, got {vocab_size}")
        for i in range(RESERVED, RESERVED + len(words)):
            del vocab[f"w{i}"]
        vocab.update({w: RESERVED + i for i, w in enumerate(words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if words is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[?.,]"), behavior="isolated")])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)

    named: dict[str, str] = {}
    if family in ("llava", "llava_next", "llava_onevision", "idefics3", "smolvlm"):
        named["image_token"] = "<image>"
    if family == "llava_onevision":
        named["video_token"] = "<video>"
    if family in ("qwen2_vl", "qwen2_5_vl"):
        named.update(
            image_token="<|image_pad|>",
            video_token="<|video_pad|>",
            vision_start_token="<|vision_start|>",
            vision_end_token="<|vision_end|>",
        )
    if family in ("idefics3", "smolvlm"):
        named.update(fake_image_token="<fake_token_around_image>", global_image_token="<global-img>",
                     end_of_utterance_token="<end_of_utterance>")
    special = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if family in ("qwen2_vl", "qwen2_5_vl"):
        special.update(pad_token="<|endoftext|>", bos_token=None, eos_token="<|im_end|>")
    extra = [n for n in _NAMES[4:] if n.startswith("<") and n not in named.values()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        extra_special_tokens=named,
        model_max_length=4096,
        padding_side="left",
        **special,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(named.values()) + extra},
                                 replace_extra_special_tokens=False)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _image_processor_and_processor(family: str, config: Any, tokenizer: Any, template: str | None = None):
    """(image_processor, processor or None, note). Uses the PIL backends: no torchvision here."""
    import transformers as tf

    template = template if template is not None else chat_template(family)

    vc = getattr(config, "vision_config", None)
    if family == "llava":
        size = vc.image_size
        ip = tf.LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        proc = tf.LlavaProcessor(
            image_processor=ip, tokenizer=tokenizer, patch_size=vc.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1, chat_template=template,
        )
        return ip, proc, None
    if family == "llava_next":
        size = vc.image_size
        ip = tf.LlavaNextImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        )
        proc = tf.LlavaNextProcessor(
            image_processor=ip, tokenizer=tokenizer, patch_size=vc.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1, chat_template=template,
        )
        return ip, proc, None
    if family == "llava_onevision":
        size = vc.image_size
        ip = tf.LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size},
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        )
        return ip, None, "LlavaOnevisionProcessor needs a video processor, which needs torchvision"
    if family in ("qwen2_vl", "qwen2_5_vl"):
        p, m = vc.patch_size, vc.spatial_merge_size
        ip = tf.Qwen2VLImageProcessorPil(
            patch_size=p, temporal_patch_size=vc.temporal_patch_size, merge_size=m,
            size={"shortest_edge": (p * m) ** 2 * 4, "longest_edge": (p * m) ** 2 * 64},
        )
        cls = "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"
        return ip, None, f"{cls} needs a video processor, which needs torchvision"
    if family in ("idefics3", "smolvlm"):
        size = vc.image_size
        cls = tf.Idefics3ImageProcessorPil if family == "idefics3" else tf.SmolVLMImageProcessorPil
        ip = cls(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size})
        if family == "idefics3":
            seq = (size // vc.patch_size) ** 2 // config.scale_factor**2
            proc = tf.Idefics3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=seq)
            return ip, proc, None
        return ip, None, "SmolVLMProcessor needs a video processor, which needs torchvision"
    raise KeyError(family)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def build_tiny_model(family: str, seed: int = 0, **overrides: Any):
    """Build ``(model, config)`` for a family's tiny config with seeded random weights, in eval mode."""
    from .adapters import adapter_by_family

    adapter = adapter_by_family(family)
    config = adapter.tiny_config(**overrides)
    torch.manual_seed(seed)
    model = adapter.model_cls()(config)
    model.eval()
    return model, config


def chat_template(model_type: str, *, end_of_turn: bool = False) -> str:
    """The tiny chat template of a ``model_type``.

    ``end_of_turn``: the llava template closes every assistant turn with ``</s>`` (the eos token), so a
    model trained on rendered conversations learns to stop after its answer. ChatML templates always
    close turns with ``<|im_end|>``.
    """
    key = "chatml" if model_type in ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "idefics3", "smolvlm") else "llava"
    template = _CHAT_TEMPLATES[key]
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        template = template.replace("{IMAGE}", "<|vision_start|> <|image_pad|> <|vision_end|>").replace(
            "{VIDEO}", "<|vision_start|> <|video_pad|> <|vision_end|>")
    else:
        template = template.replace("{IMAGE}", "<image>").replace("{VIDEO}", "<video>")
    eot = "{% if m['role'] == 'assistant' %} </s>{% endif %}" if end_of_turn else ""
    return template.replace("{END_OF_TURN}", eot)


def save_processor_files(config: Any, path: str | os.PathLike, *, words: Sequence[str] | None = None,
                         end_of_turn: bool = False) -> None:
    """Write the tokenizer, image processor and (where possible) processor of a tiny ``config`` to ``path``.

    ``words`` / ``end_of_turn``: see ``build_tokenizer`` and ``chat_template``.
    """
    from .adapters import get_adapter

    adapter = get_adapter(config)
    model_type = config.model_type
    template = chat_template(model_type, end_of_turn=end_of_turn)
    tokenizer = build_tokenizer(adapter.text_config(config).vocab_size, family=model_type, chat_template=template,
                                words=words)
    ip, proc, note = _image_processor_and_processor(model_type, config, tokenizer, template)
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

    The tokenizer is a WordLevel ``PreTrainedTokenizerFast`` (with the family's special tokens such as
    ``<image>`` / ``<|image_pad|>`` and a simple chat template), loadable with ``AutoTokenizer``.
    The image processor is the family's PIL-backend class (``*ImageProcessorPil``).  A full
    processor (``AutoProcessor``) is saved for llava, llava_next and idefics3; for
    llava_onevision, qwen2_vl, qwen2_5_vl and smolvlm the processor class requires a video
    processor, which needs torchvision (not installed), so only tokenizer + image processor are
    saved there.  ``words`` names the plain-word ids (see ``build_tokenizer``); ``end_of_turn`` closes
    llava assistant turns with ``</s>`` (see ``chat_template``). Returns ``(model, config)``.
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
