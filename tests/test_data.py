"""LLaVA-style datasets -> the checkpoint's processor -> batches with answer-only labels."""

import json

import pytest
import torch
from PIL import Image

from pmod_convert.api import load_dense
from pmod_convert.data import IGNORE, DataError, SampleEncoder, collate, model_inputs, read_samples
from pmod_convert.tiny import save_tiny_checkpoint

ROWS = [
    {"id": "multi", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nw40 w41"}, {"from": "gpt", "value": "w50"},
        {"from": "human", "value": "w42"}, {"from": "gpt", "value": "w51 w52"}]},
    {"id": "text-only", "conversations": [{"from": "human", "value": "w44"}, {"from": "gpt", "value": "w53"}]},
    {"id": "no-marker", "image": ["blue.png"], "conversations": [
        {"from": "human", "value": "w45"}, {"from": "gpt", "value": "w54"}]},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    Image.new("RGB", (50, 40), (200, 10, 10)).save(root / "img" / "red.png")
    Image.new("RGB", (64, 64), (0, 10, 200)).save(root / "img" / "blue.png")
    (root / "img" / "broken.png").write_bytes(b"not a png")
    (root / "train.json").write_text(json.dumps(ROWS))
    for family in ("llava", "qwen2_vl", "idefics3"):
        save_tiny_checkpoint(family, root / family)
    return root


def write(folder, name, rows):
    path = folder / name
    path.write_text(json.dumps(rows))
    return path


def test_reads_rows_json_and_jsonl(folder):
    ds = read_samples(folder / "train.json", folder / "img")
    assert [s.id for s in ds.samples] == ["multi", "text-only", "no-marker"]
    assert ds.samples[0].turns == [("user", "w40 w41"), ("assistant", "w50"), ("user", "w42"), ("assistant", "w51 w52")]
    assert ds.samples[1].images == [] and ds.samples[2].images[0].name == "blue.png"
    jsonl = folder / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    assert [s.row for s in read_samples(jsonl, folder / "img").samples] == [1, 2, 3]


@pytest.mark.parametrize("row, message", [
    ({"id": "x", "image": "missing.png", "conversations": ROWS[1]["conversations"]}, r"row 2 \(id 'x'\): image .*missing.png does not exist"),
    ({"id": "x", "image": "broken.png", "conversations": ROWS[1]["conversations"]}, r"row 2 \(id 'x'\): image .*broken.png cannot be read"),
    ({"id": "x", "image": "red.png"}, r"row 2 \(id 'x'\) has no conversations"),
    ({"id": "x", "conversations": [{"from": "human", "value": "w40"}]}, "has no gpt answer"),
    ({"id": "x", "image": "red.png", "conversations": [{"from": "human", "value": "<image> <image> w40"},
                                                         {"from": "gpt", "value": "w41"}]}, "2 <image> markers but 1 images"),
    ({"id": "x", "conversations": [{"from": "robot", "value": "w40"}]}, "unknown speaker 'robot'"),
    ({"id": "x", "image": "red.png", "conversations": [{"from": "system", "value": "w40"}, {"from": "gpt", "value": "w41"}]},
     "has images but no human turn"),
])
def test_bad_rows_are_named_or_skipped(folder, row, message):
    path = write(folder, "bad.json", [ROWS[1], row, ROWS[2]])
    with pytest.raises(DataError, match=message):
        read_samples(path, folder / "img")
    ds = read_samples(path, folder / "img", skip_bad_rows=True)
    assert len(ds) == 2 and ds.skipped == 1


def test_bad_files(folder):
    with pytest.raises(DataError, match="does not exist"):
        read_samples(folder / "nope.json", folder / "img")
    (folder / "garbage.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_samples(folder / "garbage.json", folder / "img")
    with pytest.raises(DataError, match="image folder"):
        read_samples(folder / "train.json", folder / "nowhere")
    with pytest.raises(DataError, match="not UTF-8"):
        read_samples(folder / "img" / "red.png", folder / "img")
    with pytest.raises(DataError, match="limit must be >= 1"):
        read_samples(folder / "train.json", folder / "img", limit=0)
    assert len(read_samples(folder / "train.json", folder / "img", limit=2)) == 2


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_labels_keep_only_answers_and_batches_equal_samples(folder, family):
    enc = SampleEncoder.from_pretrained(folder / family)
    samples = read_samples(folder / "train.json", folder / "img").samples
    items = [enc.encode(s) for s in samples]
    first = items[0]
    answer = first["input_ids"][0][first["labels"][0] != IGNORE]
    words = enc.tokenizer.convert_ids_to_tokens(answer.tolist())
    assert [w for w in words if w.startswith("w")] == ["w50", "w51", "w52"]
    assert words[-1] in ("</s>", "<|im_end|>")  # the end of turn is learnt, so generation stops
    labelled = first["labels"][0] != IGNORE
    assert not (first["instruction_mask"][0] & labelled).any()
    vision = torch.isin(first["input_ids"][0], torch.tensor(sorted(enc.vision_ids)))
    assert vision.sum() > 0 and not (first["instruction_mask"][0] & vision).any()
    question = enc.tokenizer.convert_ids_to_tokens(first["input_ids"][0][first["instruction_mask"][0]].tolist())
    assert {"w40", "w41", "w42"} <= set(question)

    batch = collate(items, enc.pad_token_id, padding_side="right")
    assert batch["labels"].shape == batch["input_ids"].shape
    model = load_dense(folder / family)
    with torch.no_grad():
        batched = model(**model_inputs(batch)).logits
        for row, item in enumerate(items):
            alone = model(**model_inputs(item)).logits[0]
            torch.testing.assert_close(batched[row, :alone.shape[0]], alone, rtol=0, atol=1e-5)
    loss = model(**model_inputs(batch), labels=batch["labels"]).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generation_inputs(folder, family):
    enc = SampleEncoder.from_pretrained(folder / family)
    sample = read_samples(folder / "train.json", folder / "img").samples[0]
    inputs, answer = enc.encode_for_generation(sample)
    assert answer == "w51 w52" and "labels" not in inputs
    text = enc.tokenizer.decode(inputs["input_ids"][0])
    assert "w42" in text and "w51" not in text
    prompt = enc.encode_prompt([folder / "img" / "red.png"], "w60 w61")
    model = load_dense(folder / family)
    out = model.generate(**prompt, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 2


def test_missing_processor_files_are_reported(folder, tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        SampleEncoder.from_pretrained(tmp_path / "nothing")
