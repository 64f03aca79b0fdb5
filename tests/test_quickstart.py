"""The quickstart: the synthetic dataset generator, and ``pmod-convert quickstart --fast`` end to end."""

import json
import random

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pmod_convert.cli import app
from pmod_convert.demo import synthetic
from pmod_convert.demo.synthetic import COLOURS, COUNT_WORDS, LETTERS, SHAPES, Shape

runner = CliRunner()


# ---- dataset generator ------------------------------------------------------------------------------------------


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_is_deterministic_per_seed(tmp_path):
    a = synthetic.make_dataset(tmp_path / "a", train=6, val=3, test=4, seed=3)
    b = synthetic.make_dataset(tmp_path / "b", train=6, val=3, test=4, seed=3)
    c = synthetic.make_dataset(tmp_path / "c", train=6, val=3, test=4, seed=4)
    files_a, files_b, files_c = _files(a.root), _files(b.root), _files(c.root)
    assert files_a == files_b  # JSON and PNG bytes alike
    assert files_a["test.json"] != files_c["test.json"]
    assert {"train.json", "val.json", "test.json", "dataset.json", "images/train_00005.png"} <= set(files_a)
    assert len(json.loads(files_a["train.json"])) == 6 and len(json.loads(files_a["test.json"])) == 4


def _pixels(path):
    return torch.tensor(list(Image.open(path).convert("RGB").getdata())).view(64, 64, 3)


def _shape_mask(pixels, shape):
    """Pixels of the shape's colour inside its bounding box (shapes never overlap)."""
    x0, y0, x1, y1 = shape.box
    colour = torch.tensor(COLOURS[shape.colour])
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[y0:y1 + 1, x0:x1 + 1] = (pixels[y0:y1 + 1, x0:x1 + 1] == colour).all(-1)
    return mask


def _the(shapes, attribute, word):
    """The shape a question names: "object" is a scene's only shape, else the one shape with that kind / colour."""
    (match,) = shapes if word == "object" else [s for s in shapes if getattr(s, attribute) == word]
    return match  # the generator only asks about unique shapes


def _expected(question, shapes):
    """The answer, recomputed from the scene independently of the generator's question makers."""
    words = synthetic.split_words(question)
    text = " ".join(words)
    if text.startswith("what colour is the"):
        answer = _the(shapes, "kind", words[4]).colour
    elif text.startswith("what shape is the"):
        answer = _the(shapes, "colour", words[4]).kind
    elif text.startswith("how many"):
        answer = COUNT_WORDS[sum(s.kind + "s" == words[2] for s in shapes)]
    elif text.startswith("is the") and "left" in words:
        answer = "left" if _the(shapes, "kind", words[2]).cx < 32 else "right"
    elif text.startswith("is the") and "top" in words:
        answer = "top" if _the(shapes, "kind", words[2]).cy < 32 else "bottom"
    elif text.startswith("is there a"):
        answer = "yes" if any(s.colour == words[3] and s.kind == words[4] for s in shapes) else "no"
    elif text == "describe the image .":  # every shape, top row first, left to right
        rows = [sorted((s for s in shapes if (s.cy < 32) == top), key=lambda s: s.cx) for top in (True, False)]
        answer = ", ".join(f"{s.colour} {s.kind} {'top' if s.cy < 32 else 'bottom'} {'left' if s.cx < 32 else 'right'}"
                           for row in rows for s in row) + "."
    else:
        raise AssertionError(f"unknown question {question!r}")
    if "letter" in words:  # multiple choice: the letter of the option that is the answer
        options = {words[i]: words[i + 2] for i in range(len(words) - 2) if words[i] in LETTERS and words[i + 1] == "."}
        assert sorted(options) == list(LETTERS) and list(options.values()).count(answer) == 1
        answer = next(letter for letter, option in options.items() if option == answer)
    return answer


def test_answers_are_right_for_the_drawn_scene(tmp_path):
    info = synthetic.make_dataset(tmp_path, train=40, val=2, test=40, train_questions=3, seed=11)
    vocabulary = set(synthetic.vocabulary())
    kinds_seen = set()
    for split in ("train", "test"):
        for row in json.loads(info.split(split).read_text()):
            shapes = [Shape(**s) for s in row["scene"]]
            pixels = _pixels(info.image_folder / row["image"])
            assert 1 <= len(shapes) <= 3
            background = (pixels == torch.tensor(synthetic.BACKGROUND)).all(-1)
            assert background.float().mean() > 0.6  # most of the image is background
            for s in shapes:
                mask = _shape_mask(pixels, s)
                assert mask.sum() >= 20, "every shape is drawn in its colour"
                ys, xs = mask.nonzero(as_tuple=True)
                # wholly on one side of both midlines, as the position answers assume
                assert bool((xs < 32).all() or (xs >= 32).all()) and bool((ys < 32).all() or (ys >= 32).all())
                assert (xs.float().mean() < 32) == (s.cx < 32) and (ys.float().mean() < 32) == (s.cy < 32)
            # nothing drawn outside the listed shapes
            drawn = torch.zeros(64, 64, dtype=torch.bool)
            for s in shapes:
                drawn |= _shape_mask(pixels, s)
            assert bool((drawn | background).all())
            conversation = row["conversations"]
            assert conversation[0]["value"].startswith("<image>\n")
            for turn, kind in zip(range(0, len(conversation), 2), row["kinds"]):
                question, answer = conversation[turn]["value"].replace("<image>\n", ""), conversation[turn + 1]["value"]
                assert _expected(question, shapes) == answer, (row["id"], question)
                assert set(synthetic.split_words(question)) | set(synthetic.split_words(answer)) <= vocabulary
                kinds_seen.add(kind)
            assert (row["kinds"][-1] == "caption") == (split == "train")  # captions teach; tests ask questions
            assert 3 <= len(row["kinds"]) <= 4 if split == "train" else len(row["kinds"]) == 1
    assert kinds_seen == set(synthetic.QUESTION_KINDS) | {"caption"}


def test_quickstart_questions_need_the_image(tmp_path):
    """The quickstart's data: one shape per image, called "the object" (the question never gives an answer away),
    answers balanced, so answering blind stays near chance on every kind."""
    from pmod_convert.demo.quickstart import QuickstartSettings

    settings = QuickstartSettings.full()
    info = synthetic.make_dataset(tmp_path, train=300, val=2, test=200, train_questions=settings.train_questions,
                                  train_captions=settings.train_captions, max_shapes=settings.max_shapes,
                                  kinds=settings.question_kinds, seed=5)
    train, test = json.loads(info.split("train").read_text()), json.loads(info.split("test").read_text())
    answers = {}
    for row in train + test:
        (shape,) = [Shape(**s) for s in row["scene"]]
        for turn, kind in zip(row["conversations"][::2], row["kinds"]):
            assert "object" in turn["value"] and shape.kind not in turn["value"] and shape.colour not in turn["value"]
        for turn, kind in zip(row["conversations"][1::2], row["kinds"]):
            answers.setdefault(kind, []).append(turn["value"])
    assert set(answers) == set(settings.question_kinds)
    for kind, values in answers.items():  # no answer much commoner than its share
        options = set(values)
        assert max(values.count(v) for v in options) / len(values) < 1.5 / len(options), kind
    blind = synthetic.blind_baseline_by_kind(train, test)
    assert set(blind) == set(settings.question_kinds) and max(blind.values()) < 0.65
    assert synthetic.blind_baseline(train, test) <= 0.5
    with pytest.raises(synthetic.DatasetSettingsError, match="question kinds"):
        synthetic.make_dataset(tmp_path / "bad", kinds=("colour", "size"))


def test_scene_shapes_never_overlap_or_cross_midlines():
    rng = random.Random(0)
    for _ in range(300):
        shapes = synthetic.draw_scene(rng, 64, 3)
        for i, a in enumerate(shapes):
            x0, y0, x1, y1 = a.box
            assert 0 <= x0 and x1 < 64 and 0 <= y0 and y1 < 64
            assert (x1 < 32 or x0 > 32) and (y1 < 32 or y0 > 32)
            assert a.kind in SHAPES and a.colour in COLOURS
            assert all(synthetic._apart(a, b, gap=2) for b in shapes[i + 1:])


def _qa_row(kind, question, answer):
    return {"kinds": [kind], "conversations": [{"from": "human", "value": "<image>\n" + question},
                                                {"from": "gpt", "value": answer}]}


def test_blind_baseline_guesses_the_commonest_training_answer_per_question():
    train = [_qa_row("count", "how many circles are there?", a) for a in ("zero", "zero", "one")]
    train += [_qa_row("colour", "what colour is the square?", a) for a in ("red", "blue", "blue")]
    test = [_qa_row("count", "how many circles are there?", "zero"), _qa_row("count", "how many circles are there?", "two"),
            _qa_row("colour", "what colour is the square?", "red"),
            _qa_row("colour", "what colour is the circle?", "blue")]  # unseen text: the kind's commonest answer
    assert synthetic.blind_baseline_by_kind(train, test) == {"colour": 0.5, "count": 0.5}
    assert synthetic.blind_baseline(train, test) == 0.5
    assert synthetic.blind_baseline(train, test[:1]) == 1.0
    # texts seen once in training are noise: the kind's commonest answer ("no") is the better blind strategy
    train = [_qa_row("exists", "is there a red circle?", "yes")] + [_qa_row("exists", f"is there a {c} square?", "no")
                                                                    for c in ("red", "blue", "green")]
    test = [_qa_row("exists", "is there a red circle?", "no"), _qa_row("exists", "is there a blue circle?", "no")]
    assert synthetic.blind_baseline_by_kind(train, test) == {"exists": 1.0}


def test_bad_dataset_settings_are_one_line_errors(tmp_path):
    with pytest.raises(synthetic.DatasetSettingsError, match="multiple of 32"):
        synthetic.make_dataset(tmp_path, size=60)
    with pytest.raises(synthetic.DatasetSettingsError, match="train_questions"):
        synthetic.make_dataset(tmp_path, train_questions=9)


def test_demo_tokenizer_covers_the_dataset_words(tmp_path):
    from transformers import AutoProcessor

    from pmod_convert.demo.model import TinyLlavaSettings, build_checkpoint

    path = build_checkpoint(tmp_path / "ckpt", synthetic.vocabulary(), TinyLlavaSettings(hidden=32, layers=2,
                                                                                         vision_hidden=16))
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    question = "what colour is the square? A. red B. blue C. green answer with the letter."
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(question, add_special_tokens=False)["input_ids"])
    assert tokens == synthetic.split_words(question)
    ids = tokenizer(" ".join(synthetic.vocabulary()), add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == len(synthetic.vocabulary())
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "how many?"},
                                              {"role": "assistant", "content": "two"}], tokenize=False)
    assert rendered.split() == ["USER:", "how", "many?", "ASSISTANT:", "two", "</s>"]


# ---- the whole pipeline -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    result = runner.invoke(app, ["quickstart", "--fast", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_quickstart_fast_writes_every_artifact(fast_run):
    out, output = fast_run
    report = json.loads((out / "report.json").read_text())
    for split in ("train", "val", "test"):
        assert (out / "data" / f"{split}.json").is_file()
    assert any((out / "data" / "images").glob("test_*.png"))
    for row in report["rows"]:
        assert (out / row["checkpoint"] / "config.json").is_file()
        assert (out / row["predictions"]).is_file()
        if row["stage"] != "dense":
            assert (out / row["bench"]).is_file()
    assert (out / "checkpoints" / "finetuned-55" / "pmod_adapter" / "routers.safetensors").is_file()
    assert (out / "checkpoints" / "exported" / "pmod_manifest.json").is_file()
    assert (out / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["stage"] for r in report["rows"]} == {"dense", "calibrated", "finetuned", "exported"}
    assert set(report["timings"]) >= {"data", "pretrain", "calibrate", "finetune", "export", "bench", "total"}
    for row in report["rows"]:  # the table shows every model
        assert row["name"] in output
    assert "prefill" in output and "blind baseline" in output
    # not a terminal: periodic lines instead of progress bars that redraw in place
    assert "pretraining step 40/40: loss" in output and "\r" not in output
    assert "by question kind, dense -> finetuned-55 (blind): " in output
    assert set(report["blind_per_kind"]) == set(report["rows"][0]["per_kind"])


def _per_kind(predictions, test_rows):
    kinds = {}
    for p in predictions:
        kinds.setdefault(test_rows[p["id"]]["kinds"][-1], []).append(p["correct"])
    return {k: sum(v) / len(v) for k, v in kinds.items()}


def test_quickstart_numbers_are_computed_from_the_outputs(fast_run):
    from pmod_convert.data import SampleEncoder, read_samples
    from pmod_convert.efficiency import TextShape, estimate
    from pmod_convert.evaluation import is_correct

    out, _ = fast_run
    report = json.loads((out / "report.json").read_text())
    test_rows = {r["id"]: r for r in json.loads((out / "data" / "test.json").read_text())}
    dataset = read_samples(out / "data" / "test.json", out / "data" / "images")
    encoder = SampleEncoder.from_pretrained(out / "checkpoints" / "dense")
    vision = sorted(encoder.vision_ids)
    counts = []
    for sample in dataset.samples:
        inputs, _ = encoder.encode_for_generation(sample)
        n_vision = int(torch.isin(inputs["input_ids"][0], torch.tensor(vision)).sum())
        counts.append((n_vision, inputs["input_ids"].shape[1] - n_vision))
    assert all(v == 64 for v, _ in counts)

    for row in report["rows"]:
        predictions = [json.loads(line) for line in (out / row["predictions"]).read_text().splitlines()]
        assert len(predictions) == len(test_rows)
        for p in predictions:
            reference = test_rows[p["id"]]["conversations"][-1]["value"]
            assert p["reference"] == reference and p["correct"] == is_correct(p["prediction"], reference)[0]
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["accuracy"] == pytest.approx(sum(p["correct"] for p in predictions) / len(predictions))
        assert row["per_kind"] == pytest.approx(_per_kind(predictions, test_rows))

        config = json.loads((out / row["checkpoint"] / "config.json").read_text())
        ratios = config["pmod"]["layer_ratios"] if row["stage"] != "dense" else [None] * 4
        assert row["layer_ratios"] == (ratios if row["stage"] != "dense" else None)
        est = estimate(TextShape.from_config(config), ratios, [c[0] for c in counts], [c[1] for c in counts])
        assert row["decoder_flops_ratio"] == pytest.approx(est.decoder_flops_ratio)
        assert row["kv_ratio"] == pytest.approx(est.kv_ratio)
        size = sum(p.stat().st_size for p in (out / row["checkpoint"]).rglob("*.safetensors"))
        assert row["checkpoint_bytes"] == size
        if row["stage"] == "dense":
            assert row["decoder_flops_ratio"] == 1.0 and row["prefill_time_ratio"] == 1.0
        else:
            assert row["decoder_flops_ratio"] < 0.9 and any(r is not None for r in ratios)
            bench = json.loads((out / row["bench"]).read_text())
            assert row["prefill_time_ratio"] == pytest.approx(bench["mod"]["prefill_s_median"]
                                                              / bench["dense"]["prefill_s_median"])
            assert bench["layer_ratios"] == ratios
    dense_predictions = (out / report["rows"][0]["predictions"]).read_text()
    assert '"correct": true' in dense_predictions  # even --fast learns the commonest answers
    main = next(r for r in report["rows"] if r["name"] == "finetuned-55")
    calibration = json.loads((out / "checkpoints" / "calibrated-55" / "calibration_report.json").read_text())
    assert calibration["budget"]["target"] == pytest.approx(0.55)
    dense = next(r for r in report["rows"] if r["stage"] == "dense")
    assert report["target"]["accuracy_gap_points"] == pytest.approx(100 * (dense["accuracy"] - main["accuracy"]))


def test_quickstart_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = runner.invoke(app, ["quickstart", "--fast", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "not a quickstart folder" in result.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"
