"""Robustness round 3 through the command line (real subprocesses, handmade models: quick):
side outputs (--report), signals and stale staging, streams and odd files, bounds, eval/verify
arguments, inspect of the tool's own outputs. Every refusal is one line and leaves nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import handmade
from handmade import build_decoder

QUICK = ("--calib-samples", "2", "--seq-len", "16")
SLOW_RUN = ("--calib-samples", "16", "--seq-len", "256")  # several seconds of data-free sampling


def perq(*args, **kwargs):
    kwargs.setdefault("capture_output", True)
    return subprocess.run([sys.executable, "-m", "perq_onnx.cli", *map(str, args)], text=True, timeout=600, **kwargs)


def one_line_error(result, match):
    lines = [l for l in result.stderr.splitlines() if l.strip() and "%|" not in l]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("perq-onnx: error:"), result.stderr
    assert match in lines[0], lines[0]


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def model(tmp_path):
    (tmp_path / "in").mkdir()
    return build_decoder(tmp_path / "in" / "model.onnx")


def _tokenizer(directory, vocab=handmade.VOCAB):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(
        "the a of and to in is was that it he for on with as his they at be this from by had".split())}}
    words.update({f"w{i}": i for i in range(len(words), vocab)})
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(directory)


# ----------------------------------------------------------------------------- side outputs

def test_report_path_is_checked_before_any_work(model, tmp_path):
    before = model.read_bytes()
    out = tmp_path / "out.onnx"
    cases = [(model, "--report"), (out, "is also the -o file"), (tmp_path / "out.onnx.data", "out.onnx.data"),
             (tmp_path, "is a directory"), (model / "r.json", "is a file, not a directory")]
    for report, match in cases:
        one_line_error(perq("optimize", model, "-o", out, "--report", report, *QUICK), match)
        assert model.read_bytes() == before and not out.exists()
        assert listing(tmp_path) == ["in"]
    text = tmp_path / "calib.txt"
    text.write_text("the a of " * 100)
    one_line_error(perq("optimize", model, "-o", out, "--calib-data", text, "--report", text), "never overwrites")
    assert text.read_text() == "the a of " * 100


def test_report_in_a_missing_folder(model, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "reports" / "new" / "r.json"
    r = perq("optimize", model, "-o", out, "--report", report, *QUICK)
    assert r.returncode == 0, r.stderr
    import json
    data = json.loads(report.read_text())
    assert data["peak_rss_bytes"] >= max(p["peak_rss_bytes"] for p in data["phases"]) > 0
    assert listing(report.parent) == ["r.json"] and out.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".perq")]


def test_odd_output_paths(model, tmp_path):
    one_line_error(perq("optimize", model, "-o", "/dev/null", *QUICK), "not a regular file")
    long_ok = tmp_path / ("n" * 245 + ".onnx")  # 250 bytes, its .data 255
    r = perq("optimize", model, "-o", long_ok, *QUICK)
    assert r.returncode == 0 and long_ok.is_file(), r.stderr
    one_line_error(perq("optimize", model, "-o", tmp_path / ("n" * 246 + ".onnx"), *QUICK), "too long")
    assert sorted(listing(tmp_path)) == ["in", long_ok.name]


# ---------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGTERM])
def test_terminating_signals_leave_nothing(model, tmp_path, sig):
    out = tmp_path / "out.onnx"
    # a terminal's default dispositions: under nohup (SIGHUP) or as a shell's background job (SIGINT,
    # SIGQUIT) the child would inherit them ignored, which the tool keeps (publish.install_handlers),
    # and the run would rightly finish
    def terminal_defaults():
        for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
            signal.signal(s, signal.SIG_DFL)
    p = subprocess.Popen([sys.executable, "-m", "perq_onnx.cli", "optimize", str(model), "-o", str(out), *SLOW_RUN],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=terminal_defaults)
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".perq*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "optimize ended before it could be interrupted"
    time.sleep(0.2)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig and f"interrupted ({signal.Signals(sig).name})" in err, (p.returncode, err)
    assert listing(tmp_path) == ["in"]


def test_sigkill_leftover_is_removed_by_the_next_run(model, tmp_path):
    out = tmp_path / "out.onnx"
    p = subprocess.Popen([sys.executable, "-m", "perq_onnx.cli", "optimize", str(model), "-o", str(out), *SLOW_RUN],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".perq*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.kill()
    p.wait()
    left = list(tmp_path.glob(".perq*"))
    assert len(left) == 1 and (left[0] / "owner").read_text().split()[0] == str(p.pid)
    assert perq("optimize", model, "-o", tmp_path / "other.onnx", *QUICK).returncode == 0
    assert not left[0].exists()


# ------------------------------------------------------------------------ streams, odd files

def test_closed_or_gone_streams(model, tmp_path):
    for name, redirect in (("a", "2>&-"), ("b", ">&- 2>/dev/null"), ("c", "2>&- >&-")):
        r = subprocess.run(f"{sys.executable} -m perq_onnx.cli optimize {model} -o {tmp_path / name}.onnx "
                           f"{' '.join(QUICK)} {redirect}", shell=True, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (redirect, r.stderr)
        assert (tmp_path / f"{name}.onnx").is_file()
    # a reader that goes away at once: the run completes, no "Broken pipe"
    p = subprocess.Popen([sys.executable, "-m", "perq_onnx.cli", "optimize", str(model), "-o", str(tmp_path / "d.onnx"),
                          *QUICK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=600) == 0 and "Broken pipe" not in err and "error" not in err, err
    assert (tmp_path / "d.onnx").is_file()


@pytest.mark.slow  # loads transformers' tokenizers in several subprocesses
def test_calibration_text_from_a_pipe_or_stdin(model, tmp_path):
    _tokenizer(model.parent)
    text = "the a of and to in is was that it " * 40
    r = perq("optimize", model, "-o", tmp_path / "s.onnx", "--calib-data", "/dev/stdin", *QUICK, input=text)
    assert r.returncode == 0, r.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=(text,))
    writer.start()
    r = perq("optimize", model, "-o", tmp_path / "p.onnx", "--calib-data", fifo, *QUICK)
    writer.join()
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------- bounds

def test_bounds_are_named(model, tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    one_line_error(perq("--threads", "100000", "optimize", model, "-o", out), "--threads 100000: at most")
    one_line_error(perq("--threads", "100000", "eval", model, model), "--threads 100000: at most")
    one_line_error(perq("optimize", model, "-o", out, "--seq-len", "32768"),
                   "data-free calibration with --seq-len 32768 on a model without a KV cache")
    assert listing(tmp_path) == ["in"]
    from test_publish import _function_model
    nested = _function_model(tmp_path / "nested.onnx", 24)
    for command in ("check", "inspect", "eval", "verify"):
        extra = {"eval": [tmp_path / "t.txt"], "verify": [nested]}.get(command, [])
        start = time.monotonic()
        one_line_error(perq(command, nested, *extra), "nested more than 16 deep")
        assert time.monotonic() - start < 60
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for command in ("check", "inspect"):
        one_line_error(perq(command, empty), "the file is empty (0 bytes)")


# ------------------------------------------------------------------------------ eval, verify

@pytest.mark.slow  # loads transformers' tokenizers in several subprocesses
def test_eval_and_verify_arguments(model, tmp_path, monkeypatch):
    _tokenizer(model.parent)
    text = tmp_path / "t.txt"
    text.write_text("the a of and to in is was that it " * 40)
    for bad, match in ((("--seq-len", "0"), "--seq-len 0: must be at least 2"),
                       (("--seq-len", "1"), "--seq-len 1: must be at least 2"),
                       (("--max-windows", "0"), "--max-windows 0: must be at least 1"),
                       (("--max-windows", "-2"), "--max-windows -2: must be at least 1")):
        one_line_error(perq("eval", model, text, *bad), match)
    for bad, match in ((("--seq-len", "0"), "--seq-len 0: must be at least 1"),
                       (("--batch", "0"), "--batch 0: must be at least 1"),
                       (("--batch", "-1"), "--batch -1: must be at least 1")):
        one_line_error(perq("verify", model, model, *bad), match)
    monkeypatch.setattr(handmade, "VOCAB", 48)
    other = build_decoder(tmp_path / "other.onnx")
    one_line_error(perq("verify", model, other), "has a vocabulary of 64")
    one_line_error(perq("eval", model, text, "--seq-len", "8", "--reference", other), "a vocabulary of 48")


@pytest.mark.slow  # loads transformers' tokenizers in several subprocesses
def test_eval_reference_and_verify_on_text_by_default(model, tmp_path):
    _tokenizer(model.parent)
    text = tmp_path / "t.txt"
    text.write_text("the a of and to in is was that it " * 40)
    q = tmp_path / "q" / "model.onnx"
    assert perq("optimize", model, "-o", q, *QUICK).returncode == 0
    r = perq("eval", q, text, "--seq-len", "16", "--max-windows", "2", "--reference", model)
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "reference perplexity" in r.stdout and "x the reference" in r.stdout
    r = perq("eval", q, text, "--seq-len", "16", "--max-windows", "2")
    assert "give --reference FLOAT_MODEL" in r.stdout
    r = perq("verify", model, q)  # the tokenizer travelled with the output: text, and it says so
    assert r.returncode == 0 and "compared on 2 windows x 16 tokens of the built-in English sample text" in r.stdout
    r = perq("verify", model, q, "--text", text)
    assert f"tokens of {text}" in r.stdout
    r = perq("verify", model, q, "--random-tokens")
    assert "random token ids (as asked)" in r.stdout
    (tmp_path / "bare").mkdir()
    bare = build_decoder(tmp_path / "bare" / "model.onnx")
    r = perq("verify", bare, bare)
    assert r.returncode == 0 and "random token ids (no tokenizer in" in r.stdout


def test_inspect_describes_perq_outputs(model, tmp_path):
    for target in ("simulate", "ort"):
        out = tmp_path / f"{target}.onnx"
        assert perq("optimize", model, "-o", out, "--target", target, *QUICK).returncode == 0
        r = perq("inspect", out)
        assert r.returncode == 0, r.stderr
        assert f"a perq-onnx output, target {target}" in r.stdout and "options: " in r.stdout
        assert "nodes; quantization" in r.stdout
