"""Robustness round 3, in-process: output paths (publish.py), staging and signals, input
preflight (inputs.py), external data (weights.py), bounds (threads, data-free cost), evaluate's
argument checks and the peak-RSS report. Handmade models only (no optimum export): quick."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import handmade
from handmade import build_decoder
from perq_onnx import calibration, inputs, publish
from perq_onnx.errors import PerqError
from perq_onnx.evaluate import compare_logits, perplexity
from perq_onnx.graph import load_graph
from perq_onnx.pipeline import calibrate
from perq_onnx.publish import Output, check_outputs
from perq_onnx.runtime import check_threads, max_threads


@pytest.fixture
def model(tmp_path):
    (tmp_path / "in").mkdir()
    return build_decoder(tmp_path / "in" / "model.onnx")


# ----------------------------------------------------------------------------- output paths

def test_outputs_may_not_replace_inputs_or_each_other(model, tmp_path):
    data = model.parent / "model.onnx.data"
    data.write_bytes(b"x")
    out = tmp_path / "out.onnx"
    cases = [
        ([Output("--report", model)], "--report .*: would overwrite the input model"),
        ([Output.model(out), Output("--report", data)], "would overwrite one of its inputs"),
        ([Output.model(out), Output("--report", out)], r"--report .*out.onnx: is also the -o file"),
        ([Output.model(out), Output("--report", tmp_path / "out.onnx.data")], r"is also -o's out.onnx.data"),
        ([Output.model(tmp_path)], "is a directory"),
        ([Output("--report", pathlib.Path("/dev/null"))], "not a regular file"),
        ([Output.model(model / "x.onnx")], "is a file, not a directory"),
        ([Output("--report", pathlib.Path(""))], "not a file name"),
    ]
    for outputs, match in cases:
        with pytest.raises(PerqError, match=match):
            check_outputs(outputs, [model, data])
    check_outputs([Output.model(out), Output("--report", tmp_path / "new" / "dir" / "r.json")], [model, data])
    os.link(model, tmp_path / "hardlink.onnx")  # another name of the input's file
    with pytest.raises(PerqError, match="would overwrite the input model"):
        check_outputs([Output("--report", tmp_path / "hardlink.onnx")], [model])


def test_file_name_limit_counts_the_data_file(tmp_path):
    ok = tmp_path / ("n" * 245 + ".onnx")           # 250 bytes: its .data is 255
    check_outputs([Output.model(ok)])
    with pytest.raises(PerqError, match=r"too long .*\.onnx\.data\): 256 bytes, at most 255"):
        check_outputs([Output.model(tmp_path / ("n" * 246 + ".onnx"))])
    check_outputs([Output("--report", tmp_path / ("r" * 255))])  # a report has no companion


def test_report_is_written_atomically_and_creates_its_folder(tmp_path):
    path = tmp_path / "a" / "b" / "report.json"
    publish.write_text(path, "{}")
    assert path.read_text() == "{}"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


# ------------------------------------------------------------------------------ staging

def test_staging_name_owner_and_removal(tmp_path):
    with publish.staging(tmp_path / "new" / "deeper") as tmp:
        assert len(tmp.name) < 24 and tmp.name.startswith(f".perq{os.getpid()}.")
        assert (tmp / "owner").read_text().split()[0] == str(os.getpid())
        (tmp / "big").write_bytes(b"\0" * 1000)
    assert list((tmp_path / "new" / "deeper").iterdir()) == []
    with pytest.raises(RuntimeError), publish.staging(tmp_path / "x" / "y") as tmp:
        raise RuntimeError("fails")
    assert not (tmp_path / "x").exists()  # folders it created are removed again when the work fails


def test_stale_staging_of_a_dead_process_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".perq{dead}.0123abcd"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"\0" * 4096)
    alive = tmp_path / f".perq{os.getppid()}.89abcdef"  # our parent's: running
    alive.mkdir()
    (alive / "owner").write_text(f"{os.getppid()} {publish._start_time(os.getppid())}\n")
    reused = tmp_path / f".perq{os.getppid()}.00000000"  # same pid, another start time: pid reused
    reused.mkdir()
    (reused / "owner").write_text(f"{os.getppid()} 1\n")
    unrelated = tmp_path / ".perq-notes"
    unrelated.mkdir()
    with publish.staging(tmp_path):
        pass
    assert not stale.exists() and not reused.exists()
    assert alive.exists() and unrelated.exists()


def test_second_interrupt_during_cleanup_still_removes_staging(tmp_path, monkeypatch):
    real = publish.shutil.rmtree
    calls = []

    def interrupted_rmtree(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # a second Ctrl-C while cleaning up
        return real(path, *args, **kwargs)

    monkeypatch.setattr(publish.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt), publish.staging(tmp_path) as tmp:
        (tmp / "model.onnx").write_bytes(b"\0" * 100_000)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGTERM])
def test_signals_are_held_while_publishing(tmp_path, sig):
    saved = {s: signal.getsignal(s) for s in publish.TERMINATING}
    try:
        signal.signal(sig, signal.SIG_DFL)  # as from a terminal: a background or nohup run inherits it ignored
        publish.install_handlers()
        (tmp_path / "a").write_text("a")
        (tmp_path / "b").write_text("b")
        with pytest.raises(publish.Interrupted) as info:
            with publish.held_signals():
                os.kill(os.getpid(), sig)
                publish.move([(tmp_path / "a", tmp_path / "A")])  # the signal waits for the renames
                os.replace(tmp_path / "b", tmp_path / "B")
        assert info.value.signum == sig and (tmp_path / "A").exists() and (tmp_path / "B").exists()
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------- input preflight

def _function_model(path, depth: int, fanout: int = 2, recursive: bool = False):
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("local", 1)]
    funcs = []
    for i in range(depth):
        if i == 0:
            body = [helper.make_node("Identity", ["x"], ["y"])]
        else:
            names = ["x"] + [f"t{k}" for k in range(fanout - 1)] + ["y"]
            body = [helper.make_node(f"F{i - 1}", [names[k]], [names[k + 1]], domain="local") for k in range(fanout)]
        funcs.append(helper.make_function("local", f"F{i}", ["x"], ["y"], body, opsets))
    if recursive:
        funcs[0] = helper.make_function("local", "F0", ["x"], ["y"],
                                        [helper.make_node(f"F{depth - 1}", ["x"], ["y"], domain="local")], opsets)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node(f"F{depth - 1}", ["x"], ["y"], domain="local")], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=opsets, functions=funcs), path)
    return path


def test_function_nesting_is_bounded(tmp_path):
    inputs.check_model(_function_model(tmp_path / "ok.onnx", 6))
    with pytest.raises(PerqError, match=r"deep.onnx: model-local functions nested more than 16 deep"):
        inputs.check_model(_function_model(tmp_path / "deep.onnx", 30))
    with pytest.raises(PerqError, match=r"wide.onnx: .* expand to more than 2,000,000 nodes"):
        inputs.check_model(_function_model(tmp_path / "wide.onnx", 12, fanout=5))
    with pytest.raises(PerqError, match=r"rec.onnx: model-local function local.F\d calls itself"):
        inputs.check_model(_function_model(tmp_path / "rec.onnx", 3, recursive=True))


def test_empty_and_odd_model_files(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(PerqError, match=r"empty.onnx: the file is empty \(0 bytes\)"):
        inputs.check_model(tmp_path / "empty.onnx")
    with pytest.raises(PerqError, match="is a directory"):
        inputs.check_model(tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07" + b"\xff" * 50)
    with pytest.raises(PerqError, match="junk.onnx: not"):
        inputs.check_model(tmp_path / "junk.onnx")


def _external(model_path, out_dir, locations=("w.data",)) -> pathlib.Path:
    """The model at model_path saved in out_dir with every large initializer in external data,
    spread round-robin over `locations` (paths relative to out_dir)."""
    model = onnx.load(str(model_path))
    handles = {}
    for loc in locations:
        (out_dir / loc).parent.mkdir(parents=True, exist_ok=True)
        handles[loc] = open(out_dir / loc, "wb")
    big = [t for t in model.graph.initializer if t.raw_data and len(t.raw_data) >= 1024]
    for i, t in enumerate(big):
        loc = locations[i % len(locations)]
        f = handles[loc]
        offset = f.seek(0, os.SEEK_END)
        f.write(t.raw_data)
        length = len(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", loc), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
    for f in handles.values():
        f.close()
    path = out_dir / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_truncated_or_corrupt_external_data_is_a_user_error(model, tmp_path):
    d = tmp_path / "ext"
    d.mkdir()
    path = _external(model, d)
    assert inputs.check_model(path) == {path.resolve(), (d / "w.data").resolve()}
    load_graph(path)
    data = (d / "w.data").read_bytes()
    (d / "w.data").write_bytes(data[:-100])  # truncated
    for check in (inputs.check_model, load_graph):
        with pytest.raises(PerqError, match=r"w.data: truncated or not this model's data: tensor '.*' needs bytes"):
            check(path)
    (d / "w.data").write_bytes(data)
    m = onnx.load(str(path), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.external_data)
    next(e for e in t.external_data if e.key == "length").value = "12"  # length that fits no shape
    onnx.save(m, str(path))
    for check in (inputs.check_model, load_graph):
        with pytest.raises(PerqError, match=r"external data in .*w.data is 12 bytes, its type and shape"):
            check(path)
    (d / "w.data").unlink()
    with pytest.raises(PerqError, match="external data file .*w.data does not exist"):
        inputs.check_model(path)


def test_same_named_data_files_in_two_folders_calibrate_right(model, tmp_path):
    """Two external-data files called w.data in different folders: calibration must read each
    tensor from its own file (they used to be linked under one name)."""
    d = tmp_path / "split"
    d.mkdir()
    split = _external(model, d, locations=("a/w.data", "b/w.data"))
    batches = np.random.default_rng(0).integers(0, handmade.VOCAB, size=(2, 16))
    want = calibrate(model, batches, progress=False)
    got = calibrate(split, batches, progress=False)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5)


# ------------------------------------------------------------------------------- bounds

def test_threads_bound():
    assert check_threads(None) is None and check_threads(1) == 1 and check_threads(max_threads()) == max_threads()
    with pytest.raises(PerqError, match=rf"--threads 100000: at most {max_threads()} \(4 per CPU"):
        check_threads(100000)
    with pytest.raises(PerqError, match="--threads 0: must be a positive integer"):
        check_threads(0)


def test_data_free_cost_bound():
    calibration.check_data_free_cost(8, 128, cached=False)
    calibration.check_data_free_cost(8, 8192, cached=True)
    with pytest.raises(PerqError, match=r"--seq-len 32768 on a model without a KV cache .* use --seq-len 512 or less"):
        calibration.check_data_free_cost(8, 32768, cached=False)
    with pytest.raises(PerqError, match="at most 65536 sampled tokens"):
        calibration.check_data_free_cost(8, 32768, cached=True)


def test_generate_refuses_before_sampling(model, monkeypatch):
    monkeypatch.setattr(calibration, "_sample", lambda *a: pytest.fail("sampled"))
    with pytest.raises(PerqError, match="re-runs the whole prefix"):
        calibration.generate(model, 8, 4096)


# ------------------------------------------------------------------------- text sources

def test_named_pipe_is_read_as_text(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("hello from a pipe\n"))
    writer.start()
    assert calibration.read_text(fifo) == "hello from a pipe\n"
    writer.join()
    with pytest.raises(PerqError, match="is a directory"):
        calibration.read_text(tmp_path)
    with pytest.raises(PerqError, match="does not exist"):
        calibration.read_text(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------- evaluate

def test_perplexity_and_compare_refuse_empty_or_mismatched(model, tmp_path, monkeypatch):
    with pytest.raises(PerqError, match="at least one window of at least 2 tokens"):
        perplexity(model, np.zeros((0, 16), np.int64), progress=False)
    with pytest.raises(PerqError, match="at least one window of at least 2 tokens"):
        perplexity(model, np.zeros((3, 1), np.int64), progress=False)
    with pytest.raises(PerqError, match="token id 100 is outside its vocabulary of 64"):
        perplexity(model, np.full((1, 8), 100), progress=False)
    with pytest.raises(PerqError, match="--batch 0 --seq-len 16: both must be positive"):
        compare_logits(model, model, batch=0)
    monkeypatch.setattr(handmade, "VOCAB", 48)
    other = build_decoder(tmp_path / "other.onnx")
    with pytest.raises(PerqError, match="has a vocabulary of 64, .*other.onnx of 48"):
        compare_logits(model, other)


def test_calibration_windows_refuse_nonpositive():
    with pytest.raises(PerqError, match="both must be positive"):
        calibration.windows(np.arange(100), 16, 0, "text")
    with pytest.raises(PerqError, match="both must be positive"):
        calibration.windows(np.arange(100), 0, 2, "text")


# ------------------------------------------------------------------------------ memory

def test_phase_peaks_do_not_reset_the_process_peak():
    """In a fresh interpreter (a long test session's freed memory would hide a 64 MiB block)."""
    code = """
import resource, time
import numpy as np
from perq_onnx.pipeline import Report
report = Report()
with report.phase("big"):
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    time.sleep(0.1)
    del block
with report.phase("small"):
    pass
big, small = report.phases
assert big.peak_rss_bytes - small.peak_rss_bytes >= 48 * 2**20, (big, small)  # sampled inside the phase
assert small.process_peak_rss_bytes >= big.peak_rss_bytes - 2**20
# the kernel's mark (what /usr/bin/time and getrusage report) was not reset by the phases
assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 >= big.peak_rss_bytes - 2**20
assert report.to_json()["peak_rss_bytes"] == report.peak_rss_bytes
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_signal_while_creating_staging_leaves_nothing(tmp_path, monkeypatch):
    """A signal held while the staging directory is created is raised right after: the new
    directory (and the folders created for it) must go with it."""
    real = publish._start_time

    def signalled(pid):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(pid)

    saved = {s: signal.getsignal(s) for s in publish.TERMINATING}
    monkeypatch.setattr(publish, "_start_time", signalled)
    try:
        publish.install_handlers()
        with pytest.raises(publish.Interrupted), publish.staging(tmp_path / "new"):
            pytest.fail("the work ran although the signal came first")
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert list(tmp_path.iterdir()) == []
