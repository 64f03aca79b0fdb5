"""A quiet, honest console (issue 16 item 4): progress with ETAs and periodic lines when piped, --threads on
every command, --help without ``<bool>`` in pipeline order, eval writes nothing unless asked, known library
noise filtered precisely."""

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_error_line, run
from PIL import Image

from pmod_convert.cli.common import PIPELINE_ORDER
from pmod_convert.progress import Progress, format_seconds, progress, quiet_known_noise, quiet_library_bars

REPO = Path(__file__).resolve().parents[1]


def test_piped_progress_prints_periodic_lines_with_eta_and_a_last_line():
    stream = io.StringIO()  # not a TTY: plain lines
    with Progress(total=4, desc="finetune", unit="step", stream=stream, interval=0) as bar:
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(loss="0.5")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("finetune: 1/4 steps (25%), ") and "ETA " in lines[0]
    assert "loss=0.5" in lines[1]
    assert lines[-1].startswith("finetune: done, 4/4 steps in ")
    assert len(lines) == 5  # one per update (interval 0), done


def test_piped_progress_is_rate_limited_and_resumes_count_only_this_run():
    stream = io.StringIO()
    with Progress(total=100, initial=40, desc="finetune", unit="step", stream=stream, interval=3600) as bar:
        for _ in range(60):
            bar.update(1)
        assert bar.eta_seconds() == 0
    assert stream.getvalue() == ""  # shorter than the interval: silent
    assert format_seconds(59) == "59s" and format_seconds(185) == "3m05s" and format_seconds(3720) == "1h02m"


def test_progress_in_tqdm_style_iterates_and_can_be_silent(capsys, monkeypatch):
    monkeypatch.setenv("PMOD_PROGRESS_INTERVAL", "0")
    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    bar = progress(total=2, desc="y", disable=True)
    bar.update(2)
    bar.close()
    err = capsys.readouterr().err
    assert "x: done, 3/3 its" in err and "y:" not in err


def test_quiet_known_noise_drops_exactly_the_bitsandbytes_kernels_notice():
    quiet_known_noise()
    quiet_known_noise()  # idempotent
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("something else from bitsandbytes")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["something else from bitsandbytes"]


def test_a_finetune_style_import_of_peft_prints_no_kernels_notice():
    code = ("import logging; logging.basicConfig(); import pmod_convert.cli; import peft, bitsandbytes; "
            "print('imported')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-2000:]
    assert "gemm_4bit_forward" not in proc.stderr


def test_quiet_library_bars_turns_transformers_bars_off_and_back_on():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with quiet_library_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_help_lists_commands_in_pipeline_order_without_bool_and_explains_terms():
    code, output = run("--help")
    assert code == 0
    assert "<bool>" not in output
    assert "PRD (progressive ratio decay)" in output and "ARank is a layer's attention rank" in output
    panel = output[output.index("Commands"):]
    listed = [line.strip("│ ").split()[0] for line in panel.splitlines()[1:] if line.startswith("│ ") and
              line[2:3].strip()]
    known = [name for name in listed if name in PIPELINE_ORDER]
    assert known == [name for name in PIPELINE_ORDER if name in known]
    assert {"quickstart", "add-routers", "calibrate", "finetune", "export", "eval"} <= set(known)
    code, output = run("eval", "--help")
    assert code == 0 and "<bool>" not in output and "--threads" in output


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    Image.new("RGB", (48, 48), (200, 30, 90)).save(root / "0.png")
    rows = [{"id": f"q{i}", "image": "0.png", "conversations": [
        {"from": "human", "value": f"<image>\nw{40 + i}"}, {"from": "gpt", "value": "w50"}]} for i in range(2)]
    (root / "q.json").write_text(json.dumps(rows))
    return root / "q.json"


def test_threads_on_every_command_and_eval_writes_nothing_unless_asked(dense, questions, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PMOD_PROGRESS_INTERVAL", "0")
    before = torch.get_num_threads()
    try:
        code, output = run("eval", dense, "--data", questions, "--device", "cpu", "--threads", "1")
        assert code == 0, output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert list(tmp_path.iterdir()) == []  # no ./eval-* folder
    assert "nothing written (pass --out DIR" in output
    assert "eval: done, 2/2 samples" in output  # piped (not a TTY): plain progress lines
    assert "Loading weights" not in output  # transformers' own bars are off inside commands
    code, output = run("eval", dense, "--data", questions, "--device", "cpu", "--threads", "0")
    assert code != 0 and "--threads must be in 1..4096" in one_error_line(output)
    for command in ("add-routers", "calibrate", "finetune", "export", "generate", "bench", "inspect", "estimate",
                    "compare", "quickstart"):
        code, output = run(command, "--help")
        assert code == 0 and "--threads" in output, command
