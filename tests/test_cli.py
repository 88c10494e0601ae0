"""The command line as a user meets it: real subprocesses, exit codes, one-line errors, no partial
outputs, and an untouched input file."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import relative_difference, random_ids


def perq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "perq_onnx.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def assert_clean_failure(result, out, match):
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip() and "%|" not in l]
    assert len(lines) == 1 and lines[0].startswith("perq-onnx: error:"), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".perq")]  # no staging leftovers


def not_a_decoder(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x], [y], [w])
    onnx.save(helper.make_model(g), path)


@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(tiny_models, tmp_path):
    model = tiny_models("llama")
    before = model.read_bytes()
    out = tmp_path / "out.onnx"
    (tmp_path / "garbage.onnx").write_bytes(b"this is not protobuf \x00\xff" * 10)
    assert_clean_failure(perq("optimize", tmp_path / "garbage.onnx", "-o", out), out, "not a readable ONNX model")
    (tmp_path / "trunc.onnx").write_bytes(before[: len(before) // 3])
    assert_clean_failure(perq("optimize", tmp_path / "trunc.onnx", "-o", out), out, "trunc.onnx")
    not_a_decoder(tmp_path / "mm.onnx")
    assert_clean_failure(perq("optimize", tmp_path / "mm.onnx", "-o", out), out, "no decoder layers")
    assert_clean_failure(perq("optimize", model, "-o", out, "--block", "48"), out, "powers of two")
    assert_clean_failure(perq("optimize", model, "-o", out, "--block", "512"), out, "does not divide")
    assert_clean_failure(perq("optimize", model, "-o", out, "--residual-rotation", "block", "--block", "256"),
                         out, "does not divide the hidden size")
    assert_clean_failure(perq("optimize", tmp_path / "missing.onnx", "-o", out), out, "no such ONNX file")
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text " * 50)
    assert_clean_failure(perq("optimize", model, "-o", out, "--calib-data", text, "--tokenizer", tmp_path / "nope"),
                         out, "does not exist")
    assert_clean_failure(perq("optimize", model, "-o", out, "--calib-data", text, "--tokenizer", tmp_path),
                         out, "no tokenizer")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    assert_clean_failure(perq("optimize", model, "-o", out, "--calib-data", tmp_path / "empty.txt"), out, "empty")
    assert_clean_failure(perq("optimize", model, "-o", model), out, "never overwrites its input")
    assert model.read_bytes() == before


@pytest.mark.slow
def test_optimize_with_text_calibration_and_verify(tiny_models, tmp_path):
    model = tiny_models("mistral", past=True)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    out = tmp_path / "float.onnx"
    r = perq("optimize", model, "-o", out, "--no-quant", "--calib-data", text, "--calib-samples", "4",
             "--seq-len", "64", "--block", "32", "--residual-rotation", "block")
    assert r.returncode == 0, r.stderr
    assert "RotateResidual" in r.stdout and "PermuteMLP" in r.stdout
    ok = perq("verify", model, out, "--tolerance", "1e-4")
    assert ok.returncode == 0 and "within tolerance" in ok.stdout and "top-1 agreement 100.00%" in ok.stdout
    q = tmp_path / "q.onnx"
    assert perq("optimize", model, "-o", q, "--block", "16").returncode == 0
    bad = perq("verify", model, q, "--tolerance", "1e-4")
    assert bad.returncode == 1 and "ABOVE" in bad.stdout
    report = perq("verify", model, q, "--text", text, "--seq-len", "64")  # agreement only: exit 0
    assert report.returncode == 0 and "top-1 agreement" in report.stdout and "KL" in report.stdout
    assert relative_difference(model, out, random_ids()) < 1e-4
    # the tokenizer travels with the output, so eval needs no --tokenizer
    r = perq("eval", q, text, "--seq-len", "32", "--max-windows", "2")
    assert r.returncode == 0 and "perplexity" in r.stdout, r.stderr


@pytest.mark.slow
def test_inspect_lists_regions(tiny_models, tmp_path):
    r = perq("inspect", tiny_models("qwen2"))
    assert r.returncode == 0, r.stderr
    assert "2 decoder layers, hidden 128, MLP 256" in r.stdout
    assert "layers.1.mlp" in r.stdout and "layers.0.heads" in r.stdout and "2 kv heads x 32" in r.stdout
    not_a_decoder(tmp_path / "mm.onnx")
    r = perq("inspect", tmp_path / "mm.onnx")
    assert r.returncode != 0 and "no decoder layers" in r.stderr


def test_inspect_lists_every_refusal(tmp_path):
    """A graph refused in several layers: inspect names each, one line per reason."""
    from handmade import LAYERS, build_decoder
    model = onnx.load(str(build_decoder(tmp_path / "model.onnx")))
    for node in model.graph.node:
        if node.op_type == "Sigmoid":
            node.op_type = "Softsign"
    onnx.save(model, str(tmp_path / "bad.onnx"))
    r = perq("inspect", tmp_path / "bad.onnx")
    lines = [line for line in r.stdout.splitlines() if "refused" in line]
    assert r.returncode == 1 and LAYERS >= 2
    assert [f"layers.{i}.mlp/sigmoid" in line for i, line in enumerate(lines)] == [True] * LAYERS, r.stdout


@pytest.mark.slow
def test_eval_perplexity(tiny_models, tmp_path):
    model = tiny_models("llama")
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 200)
    r = perq("eval", model, text, "--seq-len", "32", "--max-windows", "3")
    assert r.returncode == 0, r.stderr
    ppl = float(r.stdout.split()[1])
    assert 1.0 < ppl < 2000 and "3 windows x 32" in r.stdout
    # --skip-windows: the windows after the first N (e.g. held out from a --calib-data run)
    from perq_onnx.calibration import load_tokenizer, tokenize_file, windows
    from perq_onnx.evaluate import perplexity
    words = np.random.default_rng(0).choice(["red", "green", "blue", "fox", "dog", "runs", "and", "the"], 2000)
    text.write_text(" ".join(words))
    wins = windows(tokenize_file(text, load_tokenizer(model.parent)), 32, None, "t.txt")
    r = perq("eval", model, text, "--seq-len", "32", "--skip-windows", "2", "--max-windows", "2")
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[1]) == pytest.approx(perplexity(model, wins[2:4], progress=False).ppl, rel=1e-4)
    assert float(r.stdout.split()[1]) != pytest.approx(perplexity(model, wins[:2], progress=False).ppl, rel=1e-4)


@pytest.mark.slow
def test_file_size_limit_is_a_clean_error(tiny_models, tmp_path):
    """A file system that refuses the output (here a file-size limit) is a one-line user error
    and leaves nothing behind."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "perq_onnx.cli", "optimize", str(tiny_models("llama")), "-o", str(out),
                        "--no-quant", "--calib-samples", "1", "--seq-len", "8"],
                       capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert_clean_failure(r, out, "File too large")
    assert list(tmp_path.iterdir()) == []


