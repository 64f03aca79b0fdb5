"""CI-sized check of the accuracy benchmark (benchmarks/vlm_zoo.py + benchmarks/accuracy.py).

A tiny zoo model is trained from scratch by plain torch/transformers code (reduced rows and steps), then:
its dense test accuracy must be clearly above its blind baseline, it must load with
``pmod_convert.load_dense``, and the benchmark's ``--small`` pipeline (evaluate, convert, calibrate,
finetune, evaluate) must run end to end on it and produce a report. Budget: well under 90 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import accuracy  # noqa: E402
import vlm_zoo  # noqa: E402

# Colour-only questions on the object task train fastest; a small decoder and a short run (s: seconds on 1 core).
TINY = replace(vlm_zoo.TASKS["object"], n_train=1200, n_val=64, n_test=96, n_calib=16, hidden=64, layers=4,
               steps=240, eval_every=60, target_val=0.9, max_seconds=50.0, kinds=("colour",), object_cells=3, lr=4e-3)


@pytest.fixture(scope="module")
def zoo_model(tmp_path_factory):
    return vlm_zoo.build("object", seed=0, cache_dir=tmp_path_factory.mktemp("zoo"), config=TINY, log=lambda m: None)


def test_zoo_model_beats_blind_and_is_cached(zoo_model, tmp_path):
    assert zoo_model["blind_accuracy"] <= 0.5
    assert zoo_model["dense_accuracy"] >= zoo_model["blind_accuracy"] + 0.2, zoo_model
    rows = json.loads(Path(zoo_model["test"]).read_text())
    assert rows[0]["conversations"][0]["value"].startswith("<image>\n")
    assert (Path(zoo_model["image_folder"]) / rows[0]["image"]).exists()
    again = vlm_zoo.build("object", seed=0, cache_dir=Path(zoo_model["root"]).parent, config=TINY,
                          log=lambda m: pytest.fail("rebuilt although cached: " + m))
    assert again["dense_accuracy"] == zoo_model["dense_accuracy"]


def test_checkpoint_loads_with_pmod_convert(zoo_model):
    import pmod_convert

    model = pmod_convert.load_dense(zoo_model["checkpoint"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.model_type == "llama"


def test_small_pipeline_runs_end_to_end(zoo_model, tmp_path):
    rows = accuracy.run_one(zoo_model, [0.55], tmp_path / "run", small=True, eval_rows=32, finetune_steps=2,
                            calib_samples=16, finetune_seeds=(0, 1))
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"dense", "calibrated", "finetuned", "fastv", "pdrop"}
    finetuned = [r for r in rows if r["variant"] == "finetuned"]
    assert [r["finetune_seed"] for r in finetuned] == [0, 1]
    assert [r["finetune_settings"]["seed"] for r in finetuned] == [0, 1]  # only the seed differs
    assert (tmp_path / "run" / "finetuned-0.55").is_dir() and (tmp_path / "run" / "finetuned-0.55-seed1").is_dir()
    (model,) = accuracy.per_model(rows)
    assert set(model["finetuned"]) == {0, 1} and model["calibrated"] == by_variant["calibrated"]["accuracy"]
    assert model["below_calibrated"] == sum(r["accuracy"] < model["calibrated"] for r in finetuned)
    assert model["finetuned_mean"] == pytest.approx(sum(r["accuracy"] for r in finetuned) / 2)
    assert "(s1)" in accuracy.per_model_table([model])
    assert accuracy.plot_validation(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert not accuracy.plot_validation([r for r in rows if r["variant"] != "finetuned"], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    for r in rows:
        assert "error" not in r, r.get("traceback")
        assert 0.0 <= r["accuracy"] <= 1.0
    for variant in ("calibrated", "fastv", "pdrop"):  # the same budget for MoD and the baselines
        assert abs(by_variant[variant]["decoder_flops_ratio"] - 0.55) < 0.06, by_variant[variant]
    summary = accuracy.aggregate(rows)
    assert "calibrated" in accuracy.table(summary)
    accuracy.plot(summary, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_extended_test_split_keeps_the_split_and_adds_new_questions(zoo_model, tmp_path):
    """``vlm_zoo.extra_test``: the first rows are the model's test split unchanged, the rest are new questions
    from the task's generator (readable images, balanced-looking answers), written once; the benchmark's test
    set (and its cache key) follows ``eval_rows``."""
    base = json.loads(Path(zoo_model["test"]).read_text())
    path = vlm_zoo.extra_test(zoo_model, len(base) + 40)
    rows = json.loads(Path(path).read_text())
    assert len(rows) == len(base) + 40 and rows[: len(base)] == base
    new = rows[len(base):]
    assert len({r["id"] for r in rows}) == len(rows)
    assert all((Path(zoo_model["image_folder"]) / r["image"]).is_file() for r in new)
    assert len({r["conversations"][-1]["value"] for r in new}) > 2  # not one repeated example
    before = Path(path).stat().st_mtime_ns
    assert vlm_zoo.extra_test(zoo_model, len(base) + 40) == path and Path(path).stat().st_mtime_ns == before
    assert vlm_zoo.extra_test(zoo_model, len(base)) == zoo_model["test"]
    test, key = accuracy.test_split(zoo_model, tmp_path, len(base) + 40)
    assert test == Path(path) and key.startswith(f"test{len(base) + 40}-")
    small, small_key = accuracy.test_split(zoo_model, tmp_path, 32)
    assert len(json.loads(small.read_text())) == 32 and small_key != key
    dev = json.loads(Path(vlm_zoo.dev_split(zoo_model, 20)).read_text())  # the split settings are chosen on
    assert len(dev) == 20 and all((Path(zoo_model["image_folder"]) / r["image"]).is_file() for r in dev)
    assert {r["image"] for r in dev}.isdisjoint(r["image"] for r in rows)
    assert [r["conversations"] for r in dev] != [r["conversations"] for r in new[:20]]  # another random stream
