"""Test scaffolding shared by the adapters: the tiny vocabulary, config override rules, dummy-input assembly
and the tiny tokenizer. It imports nothing from the package (``pmod_convert.tiny`` builds on it and on the
adapters; the package core never imports either).

All tiny configs share one vocabulary layout: ids ``0..RESERVED-1`` are special tokens (pad, bos, eos, the
vision placeholders of every family, ...) plus a few chat-template words (``SPECIAL_TOKENS``) and ids
``RESERVED..vocab_size-1`` are plain words ``w<id>``. A family may give some special ids its own token
strings (``ArchitectureAdapter.tiny_token_names``), as its processor looks its tokens up by string.

Override rules of every ``tiny_config``: see ``split_overrides``.
"""

from __future__ import annotations

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


def vocab_names(renames: dict[int, str] | None = None) -> list[str]:
    """Token strings of the special ids ``0..RESERVED-1``, with a family's own names for some of them."""
    names = list(_NAMES)
    for i, name in (renames or {}).items():
        if not 4 <= int(i) < RESERVED or name in names:
            raise ValueError(f"cannot rename tiny special id {i} to {name!r}")
        names[int(i)] = name
    return names

PAD, BOS, EOS = 0, 1, 2
PLAIN_WORD_IDS = range(25, 30)  # "USER:", "ASSISTANT:", "user", "assistant", "system": words, not special tokens

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


def copy_token_ids(config: Any, text_config: Any) -> Any:
    """Copy ``pad/bos/eos_token_id`` from the text config to the top config (``generate()`` reads them there)."""
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config, key, getattr(text_config, key))
    return config


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


def build_tokenizer(vocab_size: int, *, named: dict[str, str] | None = None, special: dict[str, Any] | None = None,
                    renames: dict[int, str] | None = None, chat_template: str | None = None,
                    words: Sequence[str] | None = None):
    """A ``PreTrainedTokenizerFast`` over the shared tiny vocabulary (WordLevel, whitespace split).

    ``named``: the processor's named special tokens (``image_token="<image>"``, ...); ``special``: overrides of
    pad/bos/eos/unk; ``renames``: special id -> the family's own token string for it. ``words``: real words for
    ids ``RESERVED, RESERVED+1, ...`` (the rest stay ``w<id>``); with words, ``?``, ``.`` and ``,`` are also
    split off as words of their own (list them in ``words`` too).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = vocab_names(renames)
    vocab = {name: i for i, name in enumerate(names)}
    vocab.update({f"w{i}": i for i in range(RESERVED, vocab_size)})
    if words is not None:
        words = list(dict.fromkeys(words))
        clash = [w for w in words if w in vocab and vocab[w] < RESERVED or not w or any(c.isspace() for c in w)]
        if clash:
            raise ValueError(f"tokenizer words must be non-empty, without spaces and not special tokens: {clash[:5]}")
        if RESERVED + len(words) > vocab_size:
            raise ValueError(f"{len(words)} words need vocab_size >= {RESERVED + len(words)}, got {vocab_size}")
        for i in range(RESERVED, RESERVED + len(words)):
            del vocab[f"w{i}"]
        vocab.update({w: RESERVED + i for i, w in enumerate(words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=names[3]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if words is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[?.,]"), behavior="isolated")])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)

    named = dict(named or {})
    specials = dict(pad_token=names[0], bos_token=names[1], eos_token=names[2], unk_token=names[3])
    specials.update(special or {})
    extra = [n for i, n in enumerate(names) if i >= 4 and i not in PLAIN_WORD_IDS and n not in named.values()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        extra_special_tokens=named,
        model_max_length=4096,
        padding_side="left",
        **specials,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(named.values()) + extra},
                                 replace_extra_special_tokens=False)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer




def chat_template(style: str, *, image: str = "<image>", video: str = "<video>", end_of_turn: bool = False) -> str:
    """A tiny chat template: ``style`` ``"llava"`` (``USER: ... ASSISTANT:``) or ``"chatml"``; ``image`` /
    ``video``: the text an image / video block renders to (chatml only; llava writes ``<image>``).

    ``end_of_turn``: the llava template closes every assistant turn with ``</s>`` (the eos token), so a model
    trained on rendered conversations learns to stop after its answer. ChatML closes turns with ``<|im_end|>``.
    """
    template = _CHAT_TEMPLATES[style].replace("{IMAGE}", image).replace("{VIDEO}", video)
    eot = "{% if m['role'] == 'assistant' %} </s>{% endif %}" if end_of_turn else ""
    return template.replace("{END_OF_TURN}", eot)


def fixed_image_inputs(config: Any, *, image_segment: Sequence[int], pixel_shape: Sequence[int], vocab_size: int,
                       pad_id: int, batch_size: int = 1, text_lengths=None, images_per_row=None,
                       padding_side: str = "left", seed: int = 0, image_sizes=None, prefix: Sequence[int] = (BOS,),
                       image_token_id: int | None = None, token_types: str | None = None) -> dict[str, torch.Tensor]:
    """Inputs of a fixed-size-image family: every image is ``image_segment`` (its vision placeholders with any
    start/end tokens around them) and ``pixel_values`` ``(total_images, *pixel_shape)``; ``image_sizes`` is
    ignored. Rows may hold 0 or more images (``images_per_row``, default 1); rows with different image counts
    differ in vision tokens. ``token_types``: also return that key (``token_type_ids`` / ``mm_token_type_ids``)
    with 1 at ``image_token_id`` positions, 0 elsewhere (padding included).
    """
    g = generator(seed)
    n_per_row = per_row(images_per_row, batch_size, 1, "images_per_row")
    lengths = per_row(text_lengths, batch_size, lambda i: 8 + 5 * i, "text_lengths")
    segments = [[list(image_segment)] * n for n in n_per_row]
    input_ids, attention_mask = build_rows(segments, lengths, vocab_size, g, prefix=prefix, pad_id=pad_id,
                                           padding_side=padding_side)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_types:
        out[token_types] = ((input_ids == image_token_id) & attention_mask.bool()).long()
    total = sum(n_per_row)
    if total:
        out["pixel_values"] = rand_pixels(g, total, *pixel_shape)
    return out
