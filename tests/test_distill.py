"""Finetuning that cannot make a model worse: dense teacher, losses, validation, keep-best, lr 0 = identity.

Real transformers + peft on a tiny LLaVA converted with MoD layers 1-3 (layer 3 is the last decoder layer).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pmod_convert import Recipe, ScheduleSettings, convert, load_dense, load_pretrained
from pmod_convert.cli import app
from pmod_convert.errors import UnsupportedArchitecture
from pmod_convert.data import IGNORE, SampleEncoder, collate, model_inputs, read_samples
from pmod_convert.evaluation.evaluate import answer_samples
from pmod_convert.training import REPORT_DIR, FinetuneSettings, finetune
from pmod_convert.training.data import load_training_data, split_validation
from pmod_convert.training.distill import Teacher
from pmod_convert.training.losses import (
    distill_loss_sum,
    distill_positions,
    lm_loss_sum,
    logit_positions,
    router_rank_loss,
)
from pmod_convert.training.lora import load_base, prepare_for_training

MOD_LAYERS = [1, 2, 3]
QUIET = dict(save_steps=0, stats_samples=4)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    from pmod_convert.tiny import save_tiny_checkpoint

    save_tiny_checkpoint("llava", root / "dense")
    convert(root / "dense", root / "mod",
            Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5, layers=MOD_LAYERS)))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    rows = [{"id": f"s{i}", "image": f"img{i % 6}.png",
             "conversations": [{"from": "human", "value": f"<image>\nw{40 + i % 5} w41 w42"},
                               {"from": "gpt", "value": f"w{100 + i % 3} w101"}]} for i in range(12)]
    (root / "train.json").write_text(json.dumps(rows))
    return root


def _batch(ws: Path, n: int = 4):
    enc = SampleEncoder.from_pretrained(ws / "mod")
    samples = read_samples(ws / "train.json", ws / "images").samples[:n]
    return enc, samples, collate([enc.encode(s) for s in samples], enc.pad_token_id, padding_side="right")


def test_teacher_is_the_dense_model_with_adapters_and_routing_off(ws):
    """The teacher pass of a LoRA-wrapped MoD model with trained-looking routers gives the dense logits."""
    s = FinetuneSettings(lora_r=4)
    model = prepare_for_training(load_base(ws / "mod", s), s)
    with torch.no_grad():  # make the student differ from dense in every way a finetune can
        for name, p in model.named_parameters():
            if "lora_B" in name or "pmod_router" in name:
                p.normal_(std=0.2)
    enc, _, batch = _batch(ws)
    inputs = model_inputs(batch)
    dense = load_dense(ws / "dense")
    with torch.no_grad():
        expected = dense(**inputs).logits
        student = model(**inputs).logits
    teacher = Teacher(model, sorted(enc.vision_ids), attention=True)
    got = teacher.forward(inputs)
    assert (student - expected).abs().max() > 1e-2  # the student really is different
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)  # eager teacher vs sdpa dense
    assert model.training  # the training mode is restored
    assert model.config._attn_implementation == "sdpa"  # and the attention implementation
    assert sorted(teacher.received) == MOD_LAYERS
    vision = batch["input_ids"] == model.config.image_token_id
    for layer, received in teacher.received.items():
        # attention from the text after the image, averaged over heads and queries, sums to <= 1 per row
        assert received.shape == vision.shape
        assert bool((received[vision] > 0).all())
        assert bool((received.sum(1) <= 1 + 1e-5).all()) and bool((received[vision].sum() > 0))


def test_distillation_losses():
    torch.manual_seed(0)
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 5, 6, IGNORE]])
    ids = torch.tensor([[1, 9, 9, 2, 5, 6]])  # 9 = vision
    mask = torch.ones_like(ids)
    answer = distill_positions(labels, ids, mask, [9], "answer")
    text = distill_positions(labels, ids, mask, [9], "text")
    assert answer.tolist() == [[False, False, True, True, False]]
    assert text.tolist() == [[False, False, True, True, True]]  # text after the image, labelled or not
    student = torch.randn(1, 6, 11, requires_grad=True)
    same, n = distill_loss_sum(student, student.detach(), answer)
    assert n == 2 and float(same) == pytest.approx(0.0, abs=1e-6)
    teacher = torch.randn(1, 6, 11)
    kl, _ = distill_loss_sum(student, teacher, answer, temperature=2.0)
    p = torch.log_softmax(teacher[0, 2:4] / 2, -1)
    q = torch.log_softmax(student[0, 2:4].detach() / 2, -1)
    assert float(kl) == pytest.approx(float(4 * (p.exp() * (p - q)).sum()), rel=1e-5)


def test_losses_on_the_kept_logits_equal_the_full_logits():
    """``logits_to_keep`` rows (what the training step now asks the model for) give the same CE and KL, and
    the same gradients, as gathering from the full ``[batch, seq, vocab]`` logits; padding and rows without
    an answer included."""
    torch.manual_seed(0)
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, IGNORE, 3, IGNORE, IGNORE, IGNORE],
                           [IGNORE] * 6])
    ids = torch.tensor([[1, 9, 9, 2, 5, 6], [1, 9, 2, 3, 0, 0], [1, 9, 9, 4, 4, 4]])
    mask = (ids != 0).long()
    for which in ("answer", "text"):
        where = distill_positions(labels, ids, mask, [9], which)
        kept = logit_positions(labels, where)
        assert not bool(kept[:, -1].any()) and bool((kept[:, :-1] >= where).all())
        full = torch.randn(3, 6, 11, requires_grad=True)
        teacher = torch.randn(3, 6, 11)
        rows = full[kept]  # what slice_logits_to_keep hands the lm_head: row-major
        ce_a, n_a = lm_loss_sum(full, labels)
        ce_b, n_b = lm_loss_sum(rows, labels, kept)
        kl_a, m_a = distill_loss_sum(full, teacher, where, 2.0)
        kl_b, m_b = distill_loss_sum(rows, teacher[:, :-1][where], where, 2.0, kept)
        assert (n_a, m_a) == (n_b, m_b) and n_a == 3
        torch.testing.assert_close(ce_a, ce_b)
        torch.testing.assert_close(kl_a, kl_b)
        g_a, = torch.autograd.grad(ce_a + kl_a, full)
        g_b, = torch.autograd.grad(ce_b + kl_b, full)
        torch.testing.assert_close(g_a, g_b)
    answers_only = logit_positions(labels)  # "text" positions are not all kept there
    with pytest.raises(ValueError, match="outside the kept logits"):
        distill_loss_sum(full[answers_only], teacher[:, :-1][where], where, 1.0, answers_only)
    with pytest.raises(UnsupportedArchitecture, match=r"logits of shape \(3, 6, 11\).*transformers >= 5.21"):
        lm_loss_sum(full, labels, answers_only)  # a forward that ignored the mask


def test_teacher_and_student_logits_at_kept_positions_equal_the_full_forward(ws):
    """The real model's ``logits_to_keep`` mask (student: MoD routing on; teacher: dense) returns exactly the
    rows of its full forward at those positions, in the order the losses read them."""
    s = FinetuneSettings(lora_r=4)
    model = prepare_for_training(load_base(ws / "mod", s), s).eval()
    enc, _, batch = _batch(ws)
    inputs = model_inputs(batch)
    where = distill_positions(batch["labels"], batch["input_ids"], batch["attention_mask"], sorted(enc.vision_ids),
                              "text")
    kept = logit_positions(batch["labels"], where)
    teacher = Teacher(model, sorted(enc.vision_ids))
    with torch.no_grad():
        full = model(**inputs).logits
        rows = model(**inputs, logits_to_keep=kept).logits
        dense_full = teacher.forward(inputs)
        dense_rows = teacher.forward(inputs, where)
    assert rows.shape == (int(kept.sum()), full.shape[-1])
    torch.testing.assert_close(rows, full[kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_rows, dense_full[:, :-1][where], atol=1e-5, rtol=1e-5)


def test_a_forward_that_ignores_logits_to_keep_fails_with_one_line(ws, tmp_path, monkeypatch):
    """A model whose forward drops ``logits_to_keep`` (an older transformers, a custom class) would compute the
    losses on the wrong rows: the finetune stops at once (validation of the input runs first) with one line
    and exit code 2, and writes no output."""
    from transformers import LlavaForConditionalGeneration

    original = LlavaForConditionalGeneration.forward

    def forward(self, *args, logits_to_keep=0, **kwargs):
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "forward", forward)
    out = tmp_path / "ft"
    result = CliRunner().invoke(app, ["finetune", str(ws / "mod"), "--data", str(ws / "train.json"), "--image-folder",
                                      str(ws / "images"), "--out", str(out), "--max-steps", "2"])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert "does not slice by a boolean mask" in lines[-1] and "Traceback" not in result.output
    assert not out.exists()


def test_router_rank_loss_follows_the_order_of_the_teacher_attention():
    from pmod_convert.training.routing import RouterRecord

    attention = torch.tensor([[0.0, 0.1, 0.3, 0.6, 0.02]])
    vision = torch.tensor([[False, True, True, True, True]])
    log_att = torch.log(attention.clamp_min(1e-12))
    for scale, expected in ((1.0, 0.0), (5.0, 0.0), (-1.0, 2.0)):  # any clear positive scale: order is all
        logits = (log_att * scale).masked_fill(~vision, 123.0)  # non-vision logits are ignored
        loss, n = router_rank_loss([RouterRecord(2, logits, vision, None, logits)], {2: attention}, vision)
        assert n == 1 and float(loss) == pytest.approx(expected, abs=1e-3)
    flat = torch.zeros(1, 5, requires_grad=True)  # a fresh zero router: uncorrelated, with a finite gradient
    loss, n = router_rank_loss([RouterRecord(2, flat, vision, None, flat)], {2: attention}, vision)
    loss.backward()
    assert float(loss) == pytest.approx(1.0)
    grad = -flat.grad[vision]
    assert torch.isfinite(grad).all() and torch.equal(grad.argsort(), log_att[vision].argsort())


def test_lr_zero_gives_back_the_input_exactly(ws, tmp_path):
    """A finetune that changes nothing returns its input's logits (1e-6) and greedy answers token for token."""
    settings = FinetuneSettings(lr=0.0, router_lr=0.0, max_steps=3, warmup_ratio=0.0, keep_best=False, **QUIET)
    summary = finetune(ws / "mod", ws / "train.json", ws / "images", out=tmp_path / "ft", settings=settings,
                       show_progress=False)
    assert summary["steps"] == 3
    before, after = load_pretrained(ws / "mod"), load_pretrained(tmp_path / "ft")
    enc, samples, batch = _batch(ws, 12)
    with torch.no_grad():
        a, b = before(**model_inputs(batch)).logits, after(**model_inputs(batch)).logits
    assert (a - b).abs().max() <= 1e-6
    ans_a = answer_samples(before, enc, samples, progress=False, max_new_tokens=6)
    ans_b = answer_samples(after, enc, samples, progress=False, max_new_tokens=6)
    assert [r["prediction"] for r in ans_a.records] == [r["prediction"] for r in ans_b.records]


def test_a_destructive_finetune_keeps_the_input_and_strict_fails(ws, tmp_path):
    """lr 1.0 wrecks the tiny model; validation sees it, the output keeps the input's weights, --strict exits 3."""
    args = ["finetune", str(ws / "mod"), "--data", str(ws / "train.json"), "--image-folder", str(ws / "images"),
            "--out", str(tmp_path / "ft"), "--lr", "1.0", "--router-lr", "10", "--max-steps", "4",
            "--warmup-ratio", "0", "--max-grad-norm", "0", "--save-steps", "0", "--stats-samples", "2",
            "--select-by", "kl", "--strict"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "no step beat the input" in result.output
    summary = json.loads((tmp_path / "ft" / REPORT_DIR / "summary.json").read_text())
    v = summary["validation"]
    assert v["kept"] == "input" and not v["improved"]
    assert v["last"]["kl"] > v["input"]["kl"] * 10  # the last step really was worse
    assert [r["step"] for r in v["curve"]][0] == 0
    before, after = load_pretrained(ws / "mod"), load_pretrained(tmp_path / "ft")
    _, _, batch = _batch(ws, 12)
    with torch.no_grad():
        assert (before(**model_inputs(batch)).logits - after(**model_inputs(batch)).logits).abs().max() <= 1e-6
    assert (tmp_path / "ft" / REPORT_DIR / "validation.jsonl").is_file()
    assert (tmp_path / "ft" / REPORT_DIR / "finetune.png").stat().st_size > 10_000


def test_every_router_learns_from_the_teacher_ranking(ws, tmp_path):
    """Layer 3 is the last decoder layer: its TanhNorm weights reach no loss, so only the ranking loss moves it."""
    common = dict(max_steps=3, warmup_ratio=0.0, lr=1e-3, router_lr=1e-2, keep_best=False, **QUIET)
    without = finetune(ws / "mod", ws / "train.json", ws / "images", out=tmp_path / "a",
                       settings=FinetuneSettings(router_rank_coef=0.0, **common), show_progress=False)
    moved = {l["layer"]: l["router_moved"] for l in without["layers"]}
    assert moved[3] == 0.0 and moved[1] > 0  # no signal reaches the last layer's router
    with_rank = finetune(ws / "mod", ws / "train.json", ws / "images", out=tmp_path / "b",
                         settings=FinetuneSettings(**common), show_progress=False)
    moved = {l["layer"]: l["router_moved"] for l in with_rank["layers"]}
    assert all(moved[i] > 1e-4 for i in MOD_LAYERS), moved
    log = [json.loads(x) for x in (tmp_path / "b" / REPORT_DIR / "log.jsonl").read_text().splitlines()]
    assert all(r["router_rank_loss"] > 0 and r["kl"] is not None and r["grad_norm"] > 0 for r in log)


def test_validation_rows_are_held_out_and_grad_accum_is_sized_from_the_data(ws):
    s = FinetuneSettings(val_min=3, val_fraction=0.25)
    data = load_training_data(ws / "train.json", ws / "images", ws / "mod", s, show_progress=False)
    train, held, how = split_validation(data, s)
    assert len(held) == 3 and len(train) == 9 and "held-out" in how
    assert not {x.id for x in train.samples} & {x.id for x in held.samples}
    _, small, how = split_validation(data, FinetuneSettings(val_min=32))
    assert len(small) == 12 and "too few" in how
    assert FinetuneSettings().accumulation(1000) == 16
    assert FinetuneSettings().accumulation(64) == 4
    assert FinetuneSettings(batch_size=4).accumulation(1000, num_processes=2) == 2
    assert FinetuneSettings(grad_accum=3).accumulation(1000) == 3


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_text_query_attention_equals_the_eager_weights(ws, padding_side):
    """The capture on sdpa (text query rows only) equals the reduction of eager's full attention weights."""
    s = FinetuneSettings(lora_r=0)
    model = prepare_for_training(load_base(ws / "mod", s), s)
    enc, samples, _ = _batch(ws, 4)
    batch = collate([enc.encode(x) for x in samples], enc.pad_token_id, padding_side=padding_side)
    inputs = model_inputs(batch)
    sdpa = Teacher(model, sorted(enc.vision_ids), attention=True)
    sdpa.forward(inputs)
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    eager = Teacher(model, sorted(enc.vision_ids), attention=True)
    eager.forward(inputs)
    assert sorted(sdpa.received) == sorted(eager.received) == MOD_LAYERS
    for layer in MOD_LAYERS:
        torch.testing.assert_close(sdpa.received[layer], eager.received[layer], atol=1e-5, rtol=1e-4)


def test_a_non_finite_loss_stops_training_before_the_weights_are_touched(ws, tmp_path):
    from pmod_convert.errors import RecipeError

    settings = FinetuneSettings(lr=1e30, router_lr=1e30, max_steps=6, warmup_ratio=0.0, max_grad_norm=None,
                                save_steps=2, stats_samples=2, loss="ce", router_rank_coef=0.0)
    with pytest.raises(RecipeError, match=r"training stopped at step 2: the (loss|gradient norm) is not finite.*"
                                          r"no output was written and no resumable checkpoint"):
        finetune(ws / "mod", ws / "train.json", ws / "images", out=tmp_path / "ft", settings=settings,
                 show_progress=False)
    assert not (tmp_path / "ft").exists()  # no output written


def test_a_step_that_answers_worse_than_the_input_is_never_kept():
    from pmod_convert.training.validation import ValidationResult, better

    start = ValidationResult(step=0, accuracy=0.875, agreement=0.958, kl=0.4147, loss=1.0, samples=24, seconds=0)
    lower_kl_worse_answers = ValidationResult(2, 0.583, 0.812, 0.4136, 1.0, 24, 0)  # 7 questions fewer
    lower_kl_one_question_fewer = ValidationResult(3, 0.875 - 1 / 24, 0.95, 0.30, 1.0, 24, 0)
    lower_kl_two_questions_fewer = ValidationResult(4, 0.875 - 2 / 24, 0.95, 0.20, 1.0, 24, 0)
    assert better(lower_kl_worse_answers, start, "kl")  # KL alone would keep it
    assert not better(lower_kl_worse_answers, start, "kl", start)
    assert better(lower_kl_one_question_fewer, start, "kl", start)  # within one question: the KL decides
    assert not better(lower_kl_two_questions_fewer, start, "kl", start)
    assert not better(lower_kl_worse_answers, start, "accuracy", start)


def test_a_trained_step_replaces_an_input_that_saturates_validation():
    """When the input already agrees with dense on every validation answer token, validation cannot rank it: a
    trained step that agrees as well, answers as many questions and stays within SATURATED_KL_SLACK of the input's
    KL replaces it (and trained steps then compete by KL as usual); one that disagrees, answers worse, moves
    further from dense or is the input unchanged does not. Without saturation the KL decides as before."""
    from pmod_convert.training.finetune import final_line
    from pmod_convert.training.validation import ValidationResult, better, saturated

    start = ValidationResult(step=0, accuracy=0.97, agreement=1.0, kl=1.4e-4, loss=0.037, samples=100, seconds=0)
    agrees = ValidationResult(172, 0.97, 1.0, 1.7e-4, 0.036, 100, 0)
    agrees_later = ValidationResult(258, 0.97, 1.0, 2.3e-4, 0.036, 100, 0)
    disagrees = ValidationResult(43, 0.96, 0.995, 1.4e-2, 0.05, 100, 0)
    answers_worse = ValidationResult(86, 0.95, 1.0, 1.5e-4, 0.05, 100, 0)
    one_question_fewer = ValidationResult(99, 0.96, 1.0, 1.5e-4, 0.04, 100, 0)
    far_from_dense = ValidationResult(120, 0.97, 1.0, 1.4e-4 + 2e-3, 0.04, 100, 0)  # agrees, but KL 15x the input's
    unchanged = ValidationResult(1, 0.97, 1.0, 1.4e-4, 0.037, 100, 0)  # e.g. learning rate 0: the input itself
    assert saturated(start) and not saturated(agrees)  # only the input (step 0) can saturate
    for select_by in ("kl", "accuracy"):
        assert better(agrees, start, select_by, start)
        assert not better(agrees_later, agrees, select_by, start)  # trained steps: lower KL wins
        assert not better(disagrees, start, select_by, start)
        assert not better(answers_worse, start, select_by, start)
        assert not better(one_question_fewer, start, select_by, start)  # saturated: no drop at all
        assert not better(far_from_dense, start, select_by, start)  # beyond SATURATED_KL_SLACK
        assert not better(unchanged, start, select_by, start)  # so --strict still sees "nothing beat the input"
    unsaturated = ValidationResult(0, 0.97, 0.995, 1.4e-4, 0.037, 100, 0)
    assert not saturated(unsaturated) and not better(agrees, unsaturated, "kl", unsaturated)  # KL decides
    v = {"on": "100 held-out training rows", "dense_accuracy": 0.97, "input": start.to_dict(),
         "output": agrees.to_dict(), "kept": "step 172", "saturated": True}
    assert "cannot rank it" in final_line({"validation": v})
    assert "cannot rank it" not in final_line({"validation": {**v, "saturated": False}})


def test_text_only_training_data_is_refused_and_epochs_are_sized_from_the_data(ws, tmp_path):
    from pmod_convert.data import DataError

    rows = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "w33 w34"}, {"from": "gpt", "value": "w36"}]}
            for i in range(4)]
    (tmp_path / "text.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="no training row has an image"):
        finetune(ws / "mod", tmp_path / "text.json", out=tmp_path / "ft", settings=FinetuneSettings(**QUIET),
                 show_progress=False)
    assert not (tmp_path / "ft").exists()
    assert FinetuneSettings().epochs_for(60) == 6  # 1,000 rows at an effective batch of 16
    assert FinetuneSettings().epochs_for(100) == 4
    assert FinetuneSettings().epochs_for(400) == 1
    assert FinetuneSettings().epochs_for(5000) == 1
    assert FinetuneSettings(epochs=1).epochs_for(60) == 1


def test_attention_scored_layers_finetune_lora_only_and_lr_zero_is_exact(ws, tmp_path):
    """Layers ranking by their own attention keep their (zero) routers frozen; LoRA trains the q/k projections the
    scorer reads, and a finetune at lr 0 still returns its input exactly."""
    from pmod_convert import save_pretrained
    from pmod_convert import set_scorers
    from pmod_convert.mod.router import layer_scorers

    model = load_pretrained(ws / "mod")
    layers = model.model.language_model.layers
    set_scorers(model, [None if not hasattr(layer, "pmod_router") else "attention" for layer in layers])
    save_pretrained(model, tmp_path / "att", source=ws / "mod")
    settings = FinetuneSettings(lr=0.0, max_steps=2, warmup_ratio=0.0, keep_best=False, **QUIET)
    finetune(tmp_path / "att", ws / "train.json", ws / "images", out=tmp_path / "ft0", settings=settings,
             show_progress=False)
    before, after = load_pretrained(tmp_path / "att"), load_pretrained(tmp_path / "ft0")
    from pmod_convert.adapters import adapter_by_family

    assert layer_scorers(adapter_by_family("llava").decoder_layers(after)) == layer_scorers(layers)
    enc, samples, batch = _batch(ws, 12)
    with torch.no_grad():
        assert (before(**model_inputs(batch)).logits - after(**model_inputs(batch)).logits).abs().max() <= 1e-6
    moving = FinetuneSettings(max_steps=3, warmup_ratio=0.0, keep_best=False, **QUIET)
    summary = finetune(tmp_path / "att", ws / "train.json", ws / "images", out=tmp_path / "ft", settings=moving,
                       show_progress=False)
    moved = [row["router_moved"] for row in summary["layers"] if row.get("router_moved") is not None]
    assert moved and all(m == 0 for m in moved)  # every MoD layer reports its router, and none moved
    trained = load_pretrained(tmp_path / "ft")
    with torch.no_grad():
        assert (before(**model_inputs(batch)).logits - trained(**model_inputs(batch)).logits).abs().max() > 1e-4
