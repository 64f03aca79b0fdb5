"""``pmod_convert.bench`` / ``pmod-convert bench``: the measured report on tiny models (no timing assertions)."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from pmod_convert import Recipe, ScheduleSettings, convert
from pmod_convert.adapters import adapter_by_family, supported_families
from pmod_convert.bench import (
    BenchError,
    bench,
    build_prompts,
    cache_bytes,
    check_workload,
    format_report,
    pair_from_shape,
    save_report,
)
from pmod_convert.cli import app
from pmod_convert.efficiency import TextShape, estimate
from pmod_convert.mod.schedule import kept_count
from pmod_convert.shapes import ShapeError, build_shape, get_shape, parameter_bytes
from pmod_convert.tiny import build_tiny_model, save_tiny_checkpoint

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def kv_bytes_per_token(config, dtype=torch.float32) -> int:
    text = adapter_by_family("qwen2_vl").text_config(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def test_bench_api_measures_kv_cache_memory_and_times_on_a_tiny_shape():
    mod, dense, label = pair_from_shape("tiny")
    assert "tiny" in label
    # one set of weights: the MoD model is a structural copy sharing the dense model's parameter tensors
    dense_params = {id(p) for p in dense.parameters()}
    assert all(id(p) in dense_params for n, p in mod.named_parameters() if "pmod_router" not in n)
    assert not any("pmod_router" in n for n, _ in dense.named_parameters())

    batch, n_vision, n_text, new = 2, 20, 10, 3
    report = bench(mod, dense, batch_size=batch, vision_tokens=n_vision, text_tokens=n_text, new_tokens=new,
                   warmup=0, repeats=2, progress=False)
    assert (report.vision_tokens, report.text_tokens) == (n_vision, n_text)  # Qwen2-VL: exact counts
    ratios = report.layer_ratios
    assert ratios == Recipe().schedule.layer_ratios(4) and any(r is not None for r in ratios)

    # measured cache contents: every dense layer holds all tokens, an MoD layer text + floor(ratio * vision)
    expected_mod = [batch * (n_text + (n_vision if r is None else kept_count(r, n_vision))) for r in ratios]
    assert report.dense.cached_tokens_per_layer == [batch * (n_vision + n_text)] * 4
    assert report.mod.cached_tokens_per_layer == expected_mod
    per_token = kv_bytes_per_token(mod.config)
    assert report.dense.kv_bytes_prefill == 4 * batch * (n_vision + n_text) * per_token
    assert report.mod.kv_bytes_prefill == sum(expected_mod) * per_token < report.dense.kv_bytes_prefill
    # after decoding: every layer also caches the new_tokens - 1 tokens fed back
    assert report.mod.kv_bytes_decode == (sum(expected_mod) + 4 * batch * (new - 1)) * per_token
    assert report.dense.kv_bytes_decode == 4 * batch * (n_vision + n_text + new - 1) * per_token

    est = estimate(TextShape.from_config(mod.config), ratios, [n_vision] * batch, [n_text] * batch,
                   new_tokens=new, bytes_per_element=4)
    assert report.ratios["estimated_prefill_flops"] == est.flops_ratio
    assert report.ratios["estimated_decode_flops"] == est.decode_flops_ratio
    assert report.estimate["mod_kv_bytes"] == report.mod.kv_bytes_prefill  # measured == analytic
    assert report.ratios["kv_bytes_prefill"] == report.mod.kv_bytes_prefill / report.dense.kv_bytes_prefill

    for run_ in (report.dense, report.mod):
        assert len(run_.prefill_s) == 2 and all(t > 0 for t in run_.prefill_s)
        assert len(run_.decode_s) == 2 and run_.decode_tokens_per_s > 0
        assert run_.peak_memory_bytes is not None and run_.peak_memory_bytes > 0
    assert report.ratios["prefill_time"] == report.mod.prefill_s_median / report.dense.prefill_s_median
    assert len(report.prefill_ratio_per_repeat) == 2
    assert "profiler" in report.memory_method
    json.dumps(report.to_dict())
    text = format_report(report)
    assert "KV cache after prefill, measured" in text and "decode tokens/s" in text


def test_prefill_only_and_constant_schedule():
    recipe = Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5))
    mod, dense, _ = pair_from_shape("tiny-llava", recipe)
    report = bench(mod, dense, batch_size=1, vision_tokens=36, text_tokens=5, new_tokens=0, warmup=0, repeats=1,
                   progress=False)
    assert report.layer_ratios == [0.5] * 4
    assert report.mod.cached_tokens_per_layer == [5 + 18] * 4
    assert report.dense.decode_s is None and report.ratios["decode_tokens_per_s"] is None
    assert report.mod.kv_bytes_decode is None


@pytest.mark.parametrize("family", supported_families())
def test_prompts_hold_the_reported_token_counts_and_run(family):
    model, config = build_tiny_model(family)
    adapter = adapter_by_family(family)
    ids = torch.tensor(adapter.vision_token_ids(config))
    for asked in (0, 16, 45):
        inputs, plan = build_prompts(config, batch_size=2, vision_tokens=asked, text_tokens=9)
        vision = torch.isin(inputs["input_ids"], ids).sum(1)
        assert vision.tolist() == [plan.vision_tokens] * 2
        assert plan.text_tokens == 9 and inputs["attention_mask"].all()
        assert (plan.vision_tokens == 0) == (asked == 0)
        if family in ("qwen2_vl", "qwen2_5_vl"):
            assert plan.vision_tokens == asked
        with torch.no_grad():
            model(**inputs)  # the model accepts it: placeholders match the vision features


def test_nearest_count_for_fixed_size_images():
    _, config = build_tiny_model("llava")  # 36 tokens per 48px image
    assert build_prompts(config, batch_size=1, vision_tokens=100, text_tokens=4)[1].vision_tokens == 108
    assert build_prompts(config, batch_size=1, vision_tokens=1, text_tokens=4)[1].vision_tokens == 36
    _, config = build_tiny_model("idefics3")  # 16 tokens per tile; a split image has >= 3 tiles
    assert build_prompts(config, batch_size=1, vision_tokens=32, text_tokens=4)[1].vision_tokens == 32
    assert build_prompts(config, batch_size=1, vision_tokens=80, text_tokens=4)[1].vision_tokens == 80


def test_cli_shape_writes_json_and_png(tmp_path):
    out = tmp_path / "reports" / "bench.json"
    before = torch.get_num_threads()
    try:
        code, output = run("bench", "--shape", "tiny", "--batch-size", 2, "--vision-tokens", 24, "--text-tokens", 6,
                           "--new-tokens", 3, "--repeats", 1, "--warmup", 0, "--ratio", 0.5, "--out", out,
                           "--threads", 1)
    finally:
        torch.set_num_threads(before)  # --threads sets the (test) process's torch threads
    assert code == 0, output
    assert "MoD / dense" in output and "prefill latency," in output and "KV cache after" in output
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and len(data["pinned_cpus"]) == 1  # --threads reaches bench (pinned CPUs)
    assert data["family"] == "qwen2_vl" and data["layer_ratios"] == [0.5] * 4
    assert data["vision_tokens"] == 24 and data["batch_size"] == 2
    assert data["mod"]["cached_tokens_per_layer"] == [2 * (6 + 12)] * 4
    assert data["ratios"]["kv_bytes_prefill"] == pytest.approx(18 / 30)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json", "bench.png"]  # no temp files left
    mask = os.umask(0o022)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in out.parent.iterdir()} == {0o666 & ~mask}  # as open() would make


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    save_tiny_checkpoint("llava", root / "dense", num_hidden_layers=4)
    convert(root / "dense", root / "mod", Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5, layers=[1, 3])))
    return root


def test_cli_on_a_saved_checkpoint(checkpoints, tmp_path):
    out = tmp_path / "r.json"
    code, output = run("bench", checkpoints / "mod", "--vision-tokens", 36, "--text-tokens", 8, "--new-tokens", 2,
                       "--repeats", 1, "--warmup", 0, "--out", out)
    assert code == 0, output
    data = json.loads(out.read_text())
    assert data["family"] == "llava" and data["layer_ratios"] == [None, 0.5, None, 0.5]
    assert data["dense"]["cached_tokens_per_layer"] == [44] * 4
    assert data["mod"]["cached_tokens_per_layer"] == [44, 26, 44, 26]
    assert "routers ignored" in data["model"]
    code, output = run("bench", checkpoints / "mod", "--dense", checkpoints / "dense", "--vision-tokens", 36,
                       "--new-tokens", 0, "--repeats", 1, "--warmup", 0)
    assert code == 0, output
    assert "MoD / dense" in output


def _one_line_error(code, output, expected):
    assert code != 0
    assert output.startswith("error:") and output.strip().count("\n") == 0, output
    assert expected in output


def test_cli_bad_input_is_one_line(checkpoints, tmp_path):
    _one_line_error(*run("bench", "--shape", "nope"), "unknown shape 'nope'")
    _one_line_error(*run("bench", "--shape", "tiny", "--vision-tokens", -4), "vision tokens must be an integer >= 0")
    _one_line_error(*run("bench", "--shape", "tiny", "--text-tokens", -1), "text tokens must be")
    _one_line_error(*run("bench", "--shape", "tiny", "--repeats", 0), "repeats must be an integer >= 1")
    _one_line_error(*run("bench", "--shape", "tiny", "--batch-size", 0), "batch size must be")
    _one_line_error(*run("bench", tmp_path / "missing"), "does not exist")
    _one_line_error(*run("bench"), "pass either a CHECKPOINT folder or --shape NAME")
    _one_line_error(*run("bench", checkpoints / "mod", "--shape", "tiny"), "not both")
    _one_line_error(*run("bench", checkpoints / "mod", "--ratio", 0.5), "a checkpoint brings its own schedule")
    _one_line_error(*run("bench", checkpoints / "dense"), "not a pmod-convert checkpoint")
    _one_line_error(*run("bench", "--shape", "tiny", "--ratio", 1.5), "ratio must be in (0, 1]")
    _one_line_error(*run("bench", "--shape", "tiny", "--dtype", "float8"), "dtype must be one of")
    _one_line_error(*run("bench", "--shape", "tiny", "--out", tmp_path), "is a folder")
    if not torch.cuda.is_available():
        _one_line_error(*run("bench", "--shape", "tiny", "--device", "cuda"), "CUDA is not available")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_api_rejects_wrong_pairs_and_settings(tmp_path):
    mod, dense, _ = pair_from_shape("tiny")
    with pytest.raises(BenchError, match="has no MoD layers"):
        bench(dense, dense, progress=False)
    with pytest.raises(BenchError, match="dense model has MoD layers"):
        bench(mod, mod, progress=False)
    other, _ = build_tiny_model("qwen2_vl", hidden_size=32)
    with pytest.raises(BenchError, match="differ in family or decoder shape"):
        bench(mod, other, progress=False)
    with pytest.raises(BenchError, match="new tokens must be"):
        check_workload(batch_size=1, vision_tokens=1, text_tokens=1, new_tokens=-1, warmup=0, repeats=1)
    with pytest.raises(BenchError, match="prompt would be empty"):
        check_workload(batch_size=1, vision_tokens=0, text_tokens=0, new_tokens=0, warmup=0, repeats=1)
    with pytest.raises(BenchError, match="is a folder"):
        save_report(None, tmp_path)


def test_named_shapes():
    config = get_shape("qwen2-0.5b").config()
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (896, 24, 14, 2, 4864, 32000)
    assert get_shape("llava-onevision-0.5b").config().text_config.hidden_size == 896
    for name in ("llava-1.5-7b", "llava-next-7b"):
        text = get_shape(name).config().text_config
        assert (text.hidden_size, text.num_hidden_layers) == (4096, 32)
        # about 6.7B parameters (fp16: ~13.5 GB); counted on the meta device, nothing allocated
        assert 6.5e9 < parameter_bytes(get_shape(name).config(), torch.float16) / 2 < 7.1e9
    with pytest.raises(ShapeError, match="unknown shape"):
        get_shape("qwen2-72b")
    model = build_shape("tiny", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training


def test_shape_that_does_not_fit_is_refused_before_allocating(monkeypatch):
    from pmod_convert import shapes

    monkeypatch.setattr(shapes, "available_bytes", lambda device: 2**30)  # pretend 1 GiB is free
    with pytest.raises(ShapeError, match="needs 1.4 GiB .* 1.0 GiB free"):
        build_shape("qwen2-0.5b")


def test_cache_bytes_counts_key_and_value_tensors():
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 5, 4), 0)
    assert cache_bytes(cache) == 2 * 2 * 3 * 5 * 4 * 4


def test_finetune_sidecar_lora_is_merged_for_timing(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from pmod_convert import add_routers, layer_infos, load_pretrained, save_pretrained
    from pmod_convert.api import load_dense
    from pmod_convert.bench import pair_from_checkpoint
    from pmod_convert.sidecar import save_sidecar

    save_tiny_checkpoint("qwen2_vl", tmp_path / "dense")
    model = add_routers(load_dense(tmp_path / "dense"),
                        Recipe(schedule=ScheduleSettings(kind="constant", ratio=0.5, layers=[1, 3])))
    ckpt = save_pretrained(model, tmp_path / "mod", source=tmp_path / "dense")
    adapter = adapter_by_family("qwen2_vl")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=adapter.lora_target_regex))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "pmod_router" in name:
                p.normal_(std=0.2)
    save_sidecar(peft_model, ckpt)
    assert isinstance(load_pretrained(ckpt), PeftModel)

    mod, dense, label = pair_from_checkpoint(ckpt)
    assert not isinstance(mod, PeftModel) and not any("lora_" in n for n, _ in mod.named_parameters())
    assert [i.ratio for i in layer_infos(mod)] == [None, 0.5, None, 0.5]
    inputs, _ = build_prompts(mod, batch_size=1, vision_tokens=20, text_tokens=6)
    peft_model.eval()
    with torch.no_grad():  # merged weights compute what the LoRA model computes
        torch.testing.assert_close(mod(**inputs).logits, peft_model(**inputs).logits, rtol=1e-4, atol=1e-5)
    report = bench(mod, dense, vision_tokens=20, text_tokens=6, new_tokens=2, warmup=0, repeats=1, memory=False,
                   progress=False, label=label)
    assert report.mod.cached_tokens_per_layer == [26, 16, 26, 16]
    assert report.dense.peak_memory_bytes is None and "not measured" in report.memory_method


def test_ratio_spread_and_adaptive_repeats_with_pinned_threads():
    from pmod_convert.bench import ratio_spread

    sp = ratio_spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (sp["median"], sp["q1"], sp["q3"], sp["min"], sp["max"], sp["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert sp["rel_spread"] == pytest.approx(2.0 / 3.0)
    assert ratio_spread([0.9])["rel_spread"] is None
    with pytest.raises(BenchError):
        ratio_spread([])

    mod, dense, _ = pair_from_shape("tiny")
    kw = dict(vision_tokens=8, text_tokens=4, new_tokens=3, warmup=0, repeats=2, max_repeats=4, memory=False,
              progress=False, threads=1)
    noisy = bench(mod, dense, target_spread=1e-12, **kw)  # never settles: runs max_repeats pairs and says so
    assert noisy.repeats == 4 and noisy.converged is False and len(noisy.prefill_ratio_per_repeat) == 4
    assert noisy.spread["prefill_time"]["n"] == 4 and noisy.spread["decode_tokens_per_s"]["n"] == 4
    assert len(noisy.decode_ratio_per_repeat) == 4 and noisy.threads == 1 and len(noisy.pinned_cpus) == 1
    assert "NO, stopped at 4 pairs" in format_report(noisy)
    calm = bench(mod, dense, target_spread=1e6, **kw)  # settles after the first repeats
    assert calm.repeats == 2 and calm.converged is True
    assert json.loads(calm.to_json())["spread"]["prefill_time"]["n"] == 2
    with pytest.raises(BenchError, match="target_spread"):
        bench(mod, dense, target_spread=float("nan"), **kw)


_RETAIN_SCRIPT = r"""
import json, resource, sys
import torch
from typer.testing import CliRunner
from pmod_convert.bench import allocator_mode
from pmod_convert.cli import app

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        x = torch.ones(12 << 20)  # 48 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
mode_before = allocator_mode()
out = sys.argv[1]
result = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--vision-tokens", "8", "--text-tokens", "4",
                                  "--new-tokens", "0", "--repeats", "1", "--warmup", "0", "--no-memory",
                                  "--retain-memory", "--out", out])
faults()  # the first use grows the heap once
retained = faults()
print(json.dumps({"default": default, "retained": retained, "before": mode_before, "after": allocator_mode(),
                  "code": result.exit_code, "output": result.output}))
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="retain_freed_memory is glibc's mallopt")
def test_retained_memory_stops_page_faults_and_is_reported(tmp_path):
    # In a child process: the setting is process-wide and cannot be undone.
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-c", _RETAIN_SCRIPT, str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["code"] == 0, r["output"]
    pages = (48 << 20) // 4096
    assert r["default"] >= 4 * pages  # glibc maps and faults in each 48 MiB buffer afresh
    assert r["retained"] < pages // 10  # reused without faulting
    assert (r["before"], r["after"]) == ("default", "glibc, freed memory retained")
    assert json.loads(out.read_text())["allocator"] == "glibc, freed memory retained"
    assert "allocator: glibc, freed memory retained" in r["output"]


def test_unwritable_outputs_are_refused_before_measuring(tmp_path, monkeypatch):
    from pmod_convert.bench import allocator_mode, check_report_path

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "sub" / "report.json"
    with pytest.raises(BenchError, match="is not a folder"):
        check_report_path(target)
    with pytest.raises(BenchError, match="is a folder"):
        check_report_path(tmp_path)
    with pytest.raises(BenchError, match="pass the JSON file name"):
        check_report_path(tmp_path / "report.png")
    assert check_report_path(tmp_path / "new" / "deeper" / "r.json") == tmp_path / "new" / "deeper" / "r.json"
    with pytest.raises(BenchError, match="cannot write .*: File name too long"):  # the system refuses the name
        check_report_path(tmp_path / ("a" * 300 + ".json"))
    with pytest.raises(BenchError, match="too long .* once written through a temporary file"):  # legal name,
        check_report_path(tmp_path / ("a" * 245 + ".json"))  # but its temporary file's name would not be
    # the CLI refuses them in one line before building or timing anything
    _one_line_error(*run("bench", "--shape", "tiny", "--out", target), "a-file is not a folder")
    _one_line_error(*run("bench", "--shape", "tiny", "--out", tmp_path / "r.png"), "pass the JSON file name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]

    # what the report records when the environment changes glibc's allocator instead
    for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    assert allocator_mode() == "default"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1000000")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert allocator_mode() == "default (environment sets MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES)"


def test_perf_table_runs_and_refuses_a_bad_out(tmp_path, capsys):
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import perf
    finally:
        sys.path.pop(0)
    before = torch.get_num_threads()
    try:
        out = tmp_path / "perf.json"
        assert perf.main(["--shapes", "tiny", "--quick", "--no-long", "--finetune-shape", "none", "--threads", "1",
                          "--out", str(out)]) == 0
        data = json.loads(out.read_text())
        assert [r["measure"] for r in data["rows"]] == ["prefill", "routing overhead", "prefill, attention scorer",
                                                        "decode, short context"]
        assert all(r["report"]["allocator"].startswith("default") for r in data["runs"])
        assert data["allocator"].startswith("default") and data["settings"]["threads"] == 1
        assert data["settings"]["retain_memory"] is False
        capsys.readouterr()
        assert perf.main(["--shapes", "tiny", "--quick", "--out", str(tmp_path)]) == 2  # a folder: refused first
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {tmp_path} is a folder; pass a file name such as report.json"]
        for bad, message in ((["--repeats", "0"], "repeats must be an integer >= 1"),
                             (["--shapes", "tiny", "nope"], "unknown shape 'nope'"),
                             (["--threads", "0"], "--threads must be >= 1")):  # refused before any model is built
            assert perf.main(["--shapes", "tiny", "--quick", *bad]) == 2
            assert message in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perf.json"]
