"""`pmod-convert eval`: scoring rules, and generation + scoring on tiny dense and MoD checkpoints."""

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pmod_convert import Recipe, ScheduleSettings, convert
from pmod_convert.api import load_dense
from pmod_convert.cli import app
from pmod_convert.data import SampleEncoder, read_samples
from pmod_convert.evaluation import choice_letter, evaluate, is_correct, normalize
from pmod_convert.tiny import RESERVED

runner = CliRunner()


def test_scoring_rules():
    assert normalize("  The Red, circle! ") == "red circle"
    assert is_correct("red.", "Red") == (True, "exact")
    assert is_correct("a red one", "red") == (False, "exact")
    assert choice_letter("(B)") == "B" and choice_letter("B.") == "B" and choice_letter("Blue") is None
    assert is_correct("B. blue", "B") == (True, "choice")
    assert is_correct("The answer is C", "B") == (False, "choice")
    assert is_correct("blue", "B") == (False, "choice")
    assert is_correct("a", "a") == (True, "exact")  # a lower-case word is not option A
    assert is_correct("A dog", "A") == (False, "choice")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pmod_convert.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval")
    (root / "img").mkdir()
    for i in range(6):
        Image.new("RGB", (48, 48), (40 * i, 255 - 40 * i, 90)).save(root / "img" / f"{i}.png")
    save_tiny_checkpoint("llava", root / "dense")
    questions = [{"id": f"q{i}", "image": f"{i}.png",
                  "conversations": [{"from": "human", "value": f"<image>\nw{40 + i} w60"}, {"from": "gpt", "value": "?"}]}
                 for i in range(6)]
    # References: the dense model's own greedy answers for even rows (correct), a wrong word for odd rows.
    (root / "q.json").write_text(json.dumps(questions))
    encoder = SampleEncoder.from_pretrained(root / "dense")
    model = load_dense(root / "dense")
    for sample, row in zip(read_samples(root / "q.json", root / "img").samples, questions):
        inputs, _ = encoder.encode_for_generation(sample)
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        words = tokens.tolist()
        cut = next((i for i, t in enumerate(words) if t < RESERVED), len(words))  # tiny specials: ids < RESERVED
        greedy = encoder.decode(words[:cut])
        row["conversations"][1]["value"] = greedy if int(sample.id[1:]) % 2 == 0 else greedy + " w99"
    (root / "q.json").write_text(json.dumps(questions))
    return root


def test_evaluate_scores_against_independent_generation(setup, tmp_path):
    summary = evaluate(setup / "dense", setup / "q.json", setup / "img", out=tmp_path / "ev", batch_size=4,
                       max_new_tokens=3, progress=False)
    assert summary.samples == 6 and summary.accuracy == pytest.approx(0.5)
    assert [p["correct"] for p in summary.predictions] == [True, False] * 3
    assert not summary.is_mod and summary.decoder_flops_ratio == 1.0
    lines = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"q{i}" for i in range(6)]
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["accuracy"] == pytest.approx(0.5)


def test_mod_checkpoint_at_ratio_one_answers_like_dense_and_cli(setup, tmp_path):
    full = convert(setup / "dense", tmp_path / "full", Recipe(schedule=ScheduleSettings(kind="constant", ratio=1.0)))
    code = runner.invoke(app, ["eval", str(full), "--data", str(setup / "q.json"), "--image-folder", str(setup / "img"),
                               "--out", str(tmp_path / "ev"), "--max-new-tokens", "3", "--batch-size", "3"])
    assert code.exit_code == 0, code.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["is_mod"] and summary["accuracy"] == pytest.approx(0.5)

    half = convert(setup / "dense", tmp_path / "half", Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5)))
    result = evaluate(half, setup / "q.json", setup / "img", max_new_tokens=3, progress=False)
    assert 0.5 < result.decoder_flops_ratio < 0.8 and result.kv_ratio < 0.8


def test_eval_bad_input(setup, tmp_path):
    code = runner.invoke(app, ["eval", str(tmp_path / "missing"), "--data", str(setup / "q.json")])
    assert code.exit_code != 0 and "does not exist" in code.output
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x", "image": "nope.png",
                                                    "conversations": [{"from": "human", "value": "w40"}, {"from": "gpt", "value": "w41"}]}]))
    code = runner.invoke(app, ["eval", str(setup / "dense"), "--data", str(tmp_path / "bad.json"),
                               "--image-folder", str(setup / "img"), "--out", str(tmp_path / "o")])
    assert code.exit_code != 0 and "row 1 (id 'x')" in code.output and not (tmp_path / "o").exists()


def test_predictions_do_not_depend_on_batch_size(setup, tmp_path):
    half = convert(setup / "dense", tmp_path / "half", Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5)))
    one = evaluate(half, setup / "q.json", setup / "img", batch_size=1, max_new_tokens=3, progress=False)
    four = evaluate(half, setup / "q.json", setup / "img", batch_size=4, max_new_tokens=3, progress=False)
    assert [p["prediction"] for p in one.predictions] == [p["prediction"] for p in four.predictions]
    assert one.generated_tokens == four.generated_tokens
