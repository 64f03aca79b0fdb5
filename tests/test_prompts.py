"""Prompts built by the data loader equal what the checkpoint's own processor + chat template build (issue 12,
items 6-9): one BOS, images where the <image> markers are (or a clear refusal), video rows refused, 16-bit
images decoded, vision placeholders never written as text."""

import json

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from pmod_convert.data import IGNORE, DataError, SampleEncoder, read_samples
from pmod_convert.data.conversations import Sample
from pmod_convert.data.encode import _load_image
from pmod_convert.tiny import save_tiny_checkpoint

FAMILIES = ["llava", "llava_next", "qwen2_vl", "idefics3"]
# LLaVA-1.5's published (llava-hf) chat template: every image is rendered before the text of its turn.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# plain: the tiny checkpoint; tokenizer_bos: the tokenizer adds BOS (Llama-style), the template does not write it
# (LLaVA-1.5); both_bos: the template writes BOS too (Mistral / Llama-3 / Idefics3 templates): one BOS expected.
VARIANTS = ["plain", "tokenizer_bos", "both_bos"]


def _variant(root, family, variant, template=None):
    path = root / f"{family}-{variant}{'-' + str(abs(hash(template))) if template else ''}"
    if path.exists():
        return path
    save_tiny_checkpoint(family, path, end_of_turn=True)
    owner = (tf.AutoTokenizer if family == "qwen2_vl" else tf.AutoProcessor).from_pretrained(path)
    tokenizer = getattr(owner, "tokenizer", owner)
    if variant != "plain":
        tokenizer.add_bos_token = True
    base = template if template is not None else owner.chat_template
    owner.chat_template = ("{{ bos_token }}" if variant == "both_bos" else "") + base
    tokenizer.chat_template = owner.chat_template
    owner.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    (root / "img").mkdir()
    Image.new("RGB", (50, 40), (200, 10, 10)).save(root / "img" / "red.png")
    Image.new("RGB", (64, 48), (0, 10, 200)).save(root / "img" / "blue.png")
    return root


def _reference_processor(path, family, monkeypatch):
    """The checkpoint's own processor. Qwen2VLProcessor insists on a video processor (torchvision, not installed
    here): it is built without one, which is enough for image-only conversations."""
    if family != "qwen2_vl":
        return tf.AutoProcessor.from_pretrained(path)
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    return tf.Qwen2VLProcessor(image_processor=tf.AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
                               video_processor=None, chat_template=tokenizer.chat_template)


def _reference(processor, sample, upto=None, generation_prompt=False):
    """``processor.apply_chat_template(tokenize=True)`` on the conversation the row means, images given as
    decoded images in the places its markers say."""
    images = iter([_load_image(p) for p in sample.images])
    messages, placed = [], False
    for role, text in sample.turns[:upto]:
        if role == "user" and not placed:
            placed = True
            parts = sample.parts if sample.parts is not None else [None] * len(sample.images) + [text]
            content = [{"type": "image", "image": next(images)} if p is None else {"type": "text", "text": p}
                       for p in parts]
        else:
            content = [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                         add_generation_prompt=generation_prompt)


def _samples(root, rows):
    path = root / "rows.json"
    path.write_text(json.dumps(rows))
    return read_samples(path, root / "img").samples


ROWS = [
    {"id": "image-first", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nw40 w41"}, {"from": "gpt", "value": "w50"},
        {"from": "human", "value": "w42"}, {"from": "gpt", "value": "w51 w52"}]},
    {"id": "question-first", "image": "red.png", "conversations": [
        {"from": "human", "value": "w40 w41\n<image>"}, {"from": "gpt", "value": "w50"}]},
    {"id": "interleaved", "image": ["red.png", "blue.png"], "conversations": [
        {"from": "human", "value": "w43 <image> w44 <image> w45"}, {"from": "gpt", "value": "w53"}]},
    {"id": "no-marker", "image": "blue.png", "conversations": [
        {"from": "human", "value": "w46"}, {"from": "gpt", "value": "w54"}]},
    {"id": "text-only", "conversations": [
        {"from": "system", "value": "w47"}, {"from": "human", "value": "w48"}, {"from": "gpt", "value": "w55"}]},
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_equal_the_processors_chat_template_path(root, family, variant, monkeypatch):
    if family == "qwen2_vl" and variant != "plain":
        pytest.skip("Qwen tokenizers have no BOS")
    path = _variant(root, family, variant)
    enc = SampleEncoder.from_pretrained(path)
    processor = _reference_processor(path, family, monkeypatch)
    bos = enc.tokenizer.bos_token_id
    for sample in _samples(root, ROWS):
        # generation inputs (eval, generate): the whole dict equals the reference
        inputs, _ = enc.encode_for_generation(sample)
        last = max(i for i, (role, _) in enumerate(sample.turns) if role == "assistant")
        ref = _reference(processor, sample, upto=last, generation_prompt=True)
        assert inputs["input_ids"].tolist() == ref["input_ids"].tolist(), (sample.id, variant)
        for key in ref:
            assert torch.equal(inputs[key], ref[key]), (sample.id, key)
        if variant != "plain":
            assert inputs["input_ids"][0].tolist().count(bos) == 1 and inputs["input_ids"][0, 0] == bos

        # training inputs: the same ids for the whole conversation, labels on the answers + end of turn only
        item = enc.encode(sample)
        full = _reference(processor, sample)
        assert item["input_ids"].tolist() == full["input_ids"].tolist(), (sample.id, variant)
        if "mm_token_type_ids" in full:
            assert torch.equal(item["mm_token_type_ids"], full["mm_token_type_ids"])
        labelled = enc.tokenizer.convert_ids_to_tokens(item["labels"][item["labels"] != IGNORE].tolist())
        answers = " ".join(text for role, text in sample.turns if role == "assistant").split()
        assert [t for t in labelled if t.startswith("w")] == answers
        assert labelled[-1] in ("</s>", "<|im_end|>")


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_an_answer_without_end_of_turn_gets_eos_and_nothing_else_changes(root, family, monkeypatch):
    """Templates that do not close answers (the tiny llava template without end_of_turn): EOS is appended to
    each answer (documented); removing those EOS gives exactly the reference ids."""
    path = root / f"{family}-no-eot"
    if not path.exists():
        save_tiny_checkpoint(family, path)
    enc = SampleEncoder.from_pretrained(path)
    processor = _reference_processor(path, family, monkeypatch)
    sample = _samples(root, ROWS)[0]
    ids = enc.encode(sample)["input_ids"][0].tolist()
    ref = _reference(processor, sample)["input_ids"][0].tolist()
    eos = enc.tokenizer.eos_token_id
    if family == "llava":
        assert ids.count(eos) == 2 and [t for t in ids if t != eos] == ref
    else:
        assert ids == ref  # ChatML closes answers with <|im_end|>


@pytest.mark.parametrize("family", FAMILIES)
def test_images_stay_where_the_markers_are(root, family):
    enc = SampleEncoder.from_pretrained(_variant(root, family, "plain"))
    samples = {s.id: s for s in _samples(root, ROWS)}
    vision = torch.tensor(sorted(enc.vision_ids))
    w = {f"w{i}": i for i in range(40, 56)}

    def first(ids, token):
        return ids.index(w[token])

    ids = enc.encode(samples["question-first"])["input_ids"][0]
    where = torch.isin(ids, vision).nonzero().flatten().tolist()
    ids = ids.tolist()
    assert first(ids, "w41") < where[0] and where[-1] < first(ids, "w50")
    ids = enc.encode(samples["interleaved"])["input_ids"][0]
    where = torch.isin(ids, vision).nonzero().flatten().tolist()
    ids = ids.tolist()
    between = [i for i in where if first(ids, "w44") < i < first(ids, "w45")]
    assert first(ids, "w43") < where[0] < first(ids, "w44") and between and where[-1] < first(ids, "w45")
    prompt = enc.encode_prompt([root / "img" / "red.png"], "w60 <image> w61")["input_ids"][0]
    where = torch.isin(prompt, vision).nonzero().flatten().tolist()
    assert prompt.tolist().index(60) < where[0] and where[-1] < prompt.tolist().index(61)
    with pytest.raises(DataError, match="2 <image> markers for 1 images"):
        enc.encode_prompt([root / "img" / "red.png"], "<image> w60 <image>")


def test_a_template_that_moves_images_refuses_marked_rows(root, monkeypatch):
    path = _variant(root, "llava", "tokenizer_bos", template=LLAVA_HF_TEMPLATE)
    enc = SampleEncoder.from_pretrained(path)
    samples = {s.id: s for s in _samples(root, ROWS)}
    for name in ("question-first", "interleaved"):
        for call in (enc.encode, enc.encode_for_generation):
            with pytest.raises(DataError, match="chat template cannot place images where this row's <image> markers"):
                call(samples[name])
    with pytest.raises(DataError, match="cannot place images"):
        enc.encode_prompt([root / "img" / "red.png"], "w60 <image>")
    # image-first rows, rows without markers and text-only rows are what this template expresses: equal ids
    processor = _reference_processor(path, "llava", monkeypatch)
    for name in ("image-first", "no-marker", "text-only"):
        item = enc.encode(samples[name])
        ref = _reference(processor, samples[name])["input_ids"][0].tolist()
        assert [t for t in item["input_ids"][0].tolist() if t != enc.tokenizer.eos_token_id] == ref


def test_markers_are_recorded_on_the_sample(root):
    s = {x.id: x for x in _samples(root, ROWS)}
    assert s["image-first"].parts == [None, "w40 w41"] and s["image-first"].turns[0] == ("user", "w40 w41")
    assert s["question-first"].parts == ["w40 w41", None]
    assert s["interleaved"].parts == ["w43", None, "w44", None, "w45"]
    assert s["no-marker"].parts is None and s["text-only"].parts is None


@pytest.mark.parametrize("row, message", [
    ({"id": "v", "video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nw40"},
                                                        {"from": "gpt", "value": "w41"}]}, "a 'video' key"),
    ({"id": "v", "videos": ["a.mp4"], "conversations": [{"from": "human", "value": "w40"},
                                                        {"from": "gpt", "value": "w41"}]}, "a 'videos' key"),
    ({"id": "v", "conversations": [{"from": "human", "value": "w40 <video>"}, {"from": "gpt", "value": "w41"}]},
     "a <video> marker"),
])
def test_video_rows_are_refused_or_counted(root, row, message):
    path = root / "video.json"
    path.write_text(json.dumps([ROWS[4], row]))
    refused = rf"row 2 \(id 'v'\) is a video row \({message}\); video rows are not supported"
    with pytest.raises(DataError, match=refused):
        read_samples(path, root / "img")
    data = read_samples(path, root / "img", skip_bad_rows=True)
    assert len(data) == 1 and data.skipped == 1 and "video row" in data.skipped_reasons[0]


@pytest.mark.parametrize("family, token", [("qwen2_vl", "<|image_pad|>"), ("qwen2_vl", "<|video_pad|>"),
                                           ("idefics3", "<image>")])
def test_vision_placeholders_written_as_text_are_refused(root, family, token):
    enc = SampleEncoder.from_pretrained(_variant(root, family, "plain"))
    sample = Sample(id="x", images=[], turns=[("user", f"w40 {token}"), ("assistant", "w41")], row=1)
    for call in (enc.encode, enc.encode_for_generation):
        with pytest.raises(DataError, match=f"vision placeholder '{token.replace('|', '.')}'"):
            call(sample)
    answer = Sample(id="x", images=[], turns=[("user", "w40"), ("assistant", f"w41 {token}")], row=1)
    with pytest.raises(DataError, match="vision placeholder"):
        enc.encode(answer)


def test_sixteen_bit_images_are_scaled_not_clipped(root):
    grey = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    Image.fromarray(grey).save(root / "img" / "grey16.png")
    with Image.open(root / "img" / "grey16.png") as opened:
        assert opened.mode in ("I;16", "I")
    loaded = np.asarray(_load_image(root / "img" / "grey16.png"))
    expected = ((grey.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert loaded.shape == (48, 64, 3) and (loaded[..., 0] == expected).all() and (loaded[..., 2] == expected).all()
    assert (loaded < 255).mean() > 0.9  # convert("RGB") alone made almost every pixel white

    # the encoder's pixels equal those of the same picture saved as 8 bits
    Image.fromarray(expected).save(root / "img" / "grey8.png")
    enc = SampleEncoder.from_pretrained(_variant(root, "llava", "plain"))
    a = enc.encode_prompt([root / "img" / "grey16.png"], "w40")["pixel_values"]
    b = enc.encode_prompt([root / "img" / "grey8.png"], "w40")["pixel_values"]
    assert torch.equal(a, b)

    Image.fromarray(np.ones((8, 8), np.float32)).save(root / "img" / "float.tiff")
    with pytest.raises(DataError, match="32-bit float image"):
        enc.encode_prompt([root / "img" / "float.tiff"], "w40")


def test_exif_orientation_is_applied_as_transformers_load_image_does(root):
    image = Image.new("RGB", (60, 30), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(root / "img" / "rotated.jpg", exif=exif)
    loaded = _load_image(root / "img" / "rotated.jpg")
    assert loaded.size == tf.image_utils.load_image(str(root / "img" / "rotated.jpg")).size == (30, 60)



def test_qwen_placeholders_are_expanded_without_separators(root):
    """Without the processor class (torchvision missing) the encoder expands <|image_pad|> itself, as
    Qwen2VLProcessor does: repeated with nothing between (a BPE tokenizer turns any space into tokens)."""
    enc = SampleEncoder.from_pretrained(_variant(root, "qwen2_vl", "plain"))
    assert enc.processor is None
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, **kwargs):
            seen.append(text)
            return self.inner(text, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    enc.tokenizer = Spy(enc.tokenizer)
    inputs = enc.encode_prompt([root / "img" / "red.png"], "w40")
    n = int((inputs["input_ids"] == 8).sum())
    assert n > 1 and "<|vision_start|> " + "<|image_pad|>" * n + " <|vision_end|>" in seen[-1]


def test_finetune_data_names_or_counts_rows_the_template_cannot_express(root):
    from pmod_convert.training.data import load_training_data
    from pmod_convert.training.settings import FinetuneSettings

    path = _variant(root, "llava", "tokenizer_bos", template=LLAVA_HF_TEMPLATE)
    rows = root / "finetune.json"
    rows.write_text(json.dumps(ROWS))
    with pytest.raises(DataError, match=r"row 2 \(id 'question-first'\): the llava chat template cannot place images"):
        load_training_data(rows, root / "img", path, FinetuneSettings(), show_progress=False)
    data = load_training_data(rows, root / "img", path, FinetuneSettings(skip_bad_rows=True), show_progress=False)
    assert [s.id for s in data.samples] == ["image-first", "no-marker", "text-only"]
