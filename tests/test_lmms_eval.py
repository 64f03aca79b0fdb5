"""The lmms-eval ``pmod`` model, run as users run it, offline, against ``pmod-convert eval`` on the same questions.

``LMMS_EVAL_PLUGINS=pmod_convert python -m lmms_eval --model pmod ...`` runs as a subprocess on two local tasks
(a YAML file over a parquet file this test writes; no hub): open questions (``generate_until``) and multiple
choice (``loglikelihood``), for a tiny dense and a tiny MoD checkpoint. The answers, per-question scores and
accuracy must equal ``pmod-convert eval``'s; the multiple-choice options hold each model's own first greedy
answer word, so the option lmms-eval picks from our loglikelihoods is known from ``eval``'s generations; the
efficiency ratios in lmms-eval's results equal ``eval``'s estimate on the same prompts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[lmms]'); the pmod lmms-eval "
                                        "model cannot be tested without it")

REPO = Path(__file__).resolve().parents[1]
ROWS = 6
DISTRACTORS = ["w90", "w91", "w92", "w93"]

TASK_UTILS = '''
from pmod_convert.evaluation import is_correct


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return list(doc["choices"])


def process_results(doc, results):
    return {"exact_match": float(is_correct(results[0], doc["answer"])[0])}
'''

TASK_QA = '''
task: pmod_local_qa
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
'''

TASK_MC = '''
task: pmod_local_mc
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''


def first_word(text):
    return text.split()[0] if text.split() else None


@pytest.fixture(scope="module")
def setup(dense, mod, tmp_path_factory):
    import datasets
    from PIL import Image

    from pmod_convert.evaluation import evaluate

    root = tmp_path_factory.mktemp("lmms")
    (root / "img").mkdir()
    for i in range(ROWS):
        Image.new("RGB", (48, 48), (40 * i, 255 - 40 * i, 90)).save(root / "img" / f"{i}.png")
    rows = [{"id": f"q{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": f"<image>\nw{40 + i} w60"}, {"from": "gpt", "value": "w99"}]} for i in range(ROWS)]
    (root / "q.json").write_text(json.dumps(rows))
    # References: the dense model's own answer on even rows (right), something else on odd rows (wrong).
    first = evaluate(dense, root / "q.json", root / "img", progress=False, device="cpu")
    for row, record in zip(rows, first.predictions):
        row["conversations"][1]["value"] = record["prediction"] + ("" if int(row["id"][1:]) % 2 == 0 else " w99")
    (root / "q.json").write_text(json.dumps(rows))

    evals = {}
    for name, checkpoint in (("dense", dense), ("mod", mod)):
        code, output = run("eval", checkpoint, "--data", root / "q.json", "--image-folder", root / "img",
                           "--out", root / f"eval-{name}", "--device", "cpu", "--batch-size", 4)
        assert code == 0, output
        evals[name] = {
            "summary": json.loads((root / f"eval-{name}" / "summary.json").read_text()),
            "predictions": [json.loads(line) for line in (root / f"eval-{name}" / "predictions.jsonl").read_text().splitlines()],
        }

    # Multiple choice: each model's first greedy answer word is an option; the dense one is the label.
    choices, labels = [], []
    for i in range(ROWS):
        options = []
        for name in ("dense", "mod"):
            word = first_word(evals[name]["predictions"][i]["prediction"])
            if word is not None and word not in options:
                options.append(word)
        options += [d for d in DISTRACTORS if d not in options][:4 - len(options)]
        choices.append(options)
        dense_word = first_word(evals["dense"]["predictions"][i]["prediction"])
        labels.append(options.index(dense_word) if dense_word is not None else 0)
    table = datasets.Dataset.from_dict({
        "id": [r["id"] for r in rows], "image": [str(root / "img" / r["image"]) for r in rows],
        "question": [f"w{40 + i} w60" for i in range(ROWS)],
        "answer": [r["conversations"][1]["value"] for r in rows], "choices": choices, "label": labels,
    }).cast_column("image", datasets.Image())
    table.to_parquet(str(root / "questions.parquet"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "pmod_local_qa.yaml").write_text(TASK_QA.format(data=root / "questions.parquet"))
    (tasks / "pmod_local_mc.yaml").write_text(TASK_MC.format(data=root / "questions.parquet"))
    return root, evals, choices


def lmms_eval_run(checkpoint, root, name):
    out = root / f"lmms-{name}"
    env = {**os.environ, "LMMS_EVAL_PLUGINS": "pmod_convert", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(root / "hf"), "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "pmod", "--model_args", f"pretrained={checkpoint},device=cpu",
           "--tasks", "pmod_local_qa,pmod_local_mc", "--include_path", str(root / "tasks"), "--batch_size", "4",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    samples = {task: sorted((json.loads(line) for line in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()),
                            key=lambda s: s["doc_id"]) for task in ("pmod_local_qa", "pmod_local_mc")}
    return results, samples, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["dense", "mod"])
def test_lmms_eval_pmod_model_agrees_with_eval(setup, dense, mod, name):
    root, evals, choices = setup
    checkpoint = {"dense": dense, "mod": mod}[name]
    results, samples, output = lmms_eval_run(checkpoint, root, name)
    reference = evals[name]

    # Open questions: the same answers, the same per-question scores, the same accuracy as `pmod-convert eval`.
    qa = samples["pmod_local_qa"]
    assert [s["filtered_resps"] for s in qa] == [p["prediction"] for p in reference["predictions"]]
    assert [bool(s["exact_match"]) for s in qa] == [p["correct"] for p in reference["predictions"]]
    assert results["results"]["pmod_local_qa"]["exact_match,none"] == pytest.approx(reference["summary"]["accuracy"])
    assert 0 < reference["summary"]["accuracy"] < 1  # the check can fail both ways

    # Multiple choice from our loglikelihoods: the option picked is the model's own first greedy word.
    mc = samples["pmod_local_mc"]
    answered = 0
    for i, sample in enumerate(mc):
        word = first_word(reference["predictions"][i]["prediction"])
        if word is None:  # the model's first token ends the answer: no option is known to win
            continue
        answered += 1
        # lmms-eval's sample log writes each (loss, is_greedy) pair as strings
        losses = [float(pair[0]) for pair in sample["filtered_resps"]]
        greedy = [str(pair[1]) == "True" for pair in sample["filtered_resps"]]
        picked = choices[i][losses.index(min(losses))]
        assert picked == word, (i, losses, choices[i])
        assert greedy == [c == word for c in choices[i]], (i, greedy, choices[i])
        dense_word = first_word(evals["dense"]["predictions"][i]["prediction"])
        assert sample["acc"] == float(word == dense_word)
    assert answered >= 2

    # The efficiency summary: eval's estimate on the same prompts; dense is 100%.
    throughput = results["throughput"]
    ratio = throughput["avg_pmod_decoder_flops_ratio_pmod_local_qa"]
    assert ratio == pytest.approx(reference["summary"]["decoder_flops_ratio"], rel=1e-9)
    assert throughput["avg_pmod_kv_ratio_pmod_local_qa"] == pytest.approx(reference["summary"]["kv_ratio"], rel=1e-9)
    assert (ratio == 1.0) == (name == "dense")
    assert "pmod_local_qa: 6 prompts" in output and "estimated decoder FLOPs" in output


def test_pmod_model_is_registered_without_the_plugin_variable(tmp_path):
    # The installed package's entry point (pyproject.toml), read from the installed metadata: run from an empty
    # folder without PYTHONPATH, so a stale pmod_convert.egg-info in the source tree is not what is read.
    env = {k: v for k, v in os.environ.items() if k not in ("LMMS_EVAL_PLUGINS", "PYTHONPATH")}
    code = "from lmms_eval.models import get_model; print(get_model('pmod').__module__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("pmod_convert.integrations.lmms_eval")


def test_pmod_model_refuses_unknown_arguments(dense, monkeypatch):
    from pmod_convert.errors import RecipeError
    from pmod_convert.integrations.lmms_eval import PmodLMM

    with pytest.raises(RecipeError, match="unknown --model_args for pmod: temperature"):
        PmodLMM.create_from_arg_string(f"pretrained={dense},temperature=0.2")
    with pytest.raises(RecipeError, match="--batch_size auto is not supported"):
        PmodLMM.create_from_arg_string(f"pretrained={dense}", {"batch_size": "auto"})
    with pytest.raises(RecipeError, match="batch_size must be a positive integer"):
        PmodLMM.create_from_arg_string(f"pretrained={dense}", {"batch_size": "many"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="runs in one process"):
        PmodLMM.create_from_arg_string(f"pretrained={dense}")


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_pmod_model_in_process_matches_eval_on_other_families(family, tmp_path):
    """The model class with lmms-eval's own Instance objects, on MoD checkpoints of two more families: the same
    answer as `evaluate`, and the loglikelihood of the model's first greedy word is the lowest loss and greedy."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from pmod_convert import convert
    from pmod_convert.evaluation import evaluate
    from pmod_convert.integrations.lmms_eval import PmodLMM
    from pmod_convert.tiny import save_tiny_checkpoint
    from conftest import CONSTANT

    save_tiny_checkpoint(family, tmp_path / "dense")
    checkpoint = convert(tmp_path / "dense", tmp_path / "mod", CONSTANT)
    image = Image.new("RGB", (64, 64), (200, 30, 90))
    image.save(tmp_path / "0.png")
    (tmp_path / "q.json").write_text(json.dumps([{"id": "a", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nw40 w41"}, {"from": "gpt", "value": "w50"}]}]))
    expected = evaluate(checkpoint, tmp_path / "q.json", tmp_path, progress=False, device="cpu")

    lm = PmodLMM(pretrained=str(checkpoint), device="cpu")
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    answer = lm.generate_until([Instance("generate_until", ("w40 w41", {"max_new_tokens": 16}, visual, 0, "t", "test"),
                                         0, meta)])[0].text
    assert answer == expected.predictions[0]["prediction"]
    word = first_word(answer)
    assert word is not None, f"the tiny model's answer {answer!r} has no word to score"
    options = [word] + [d for d in DISTRACTORS if d != word][:2]
    pairs = [r.text for r in lm.loglikelihood([Instance("loglikelihood", ("w40 w41", " " + o, visual, 0, "t", "test"),
                                                        0, meta) for o in options])]
    assert [greedy for _, greedy in pairs] == [True, False, False]
    assert pairs[0][0] == min(loss for loss, _ in pairs)
    assert len(lm.token_counts["t"]) == 2  # the generated prompt and the scored one (once for its 3 options)
    summary = lm.summarize_efficiency()["tasks"]["t"]
    assert summary["decoder_flops_ratio"] == pytest.approx(expected.decoder_flops_ratio, rel=1e-9)
    assert summary["kv_ratio"] == pytest.approx(expected.kv_ratio, rel=1e-9)
