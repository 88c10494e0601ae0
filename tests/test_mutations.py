"""Mutation tests: one-place edits of a supported export (tests/mutations.py) that change its
meaning. For each, `perq-onnx optimize --no-quant` must either

* exit 0 and write a model that onnx.checker (full_check) accepts, that onnxruntime loads, and
  whose outputs (logits and any other graph output) equal the *mutated* input's to 1e-4 relative, or
* exit 2 with a one-line `perq-onnx: error: ...`, leaving no output file and nothing else in the
  output directory,

and in both cases leave the input file's bytes unchanged. Also here: command-line misuse that
must be refused with exit code 2 (bad option values, output paths that cannot or must not be
written).

Only the CLI entry point (perq_onnx.cli.main) is used, in-process.
"""
from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import mutations as m
from perq_onnx.cli import main

TOL = 1e-4
CALIB = ["--calib-samples", "1", "--seq-len", "16"]  # keeps the data-free calibration short


CASES = [
    # (mutation, architecture)
    (m.unmutated, "llama"),
    (m.norm_mean_over_sequence, "llama"),
    (m.norm_mean_over_batch_keepdims0, "llama"),
    (m.norm_mean_over_everything_keepdims0, "llama"),
    (m.norm_epsilon_changed, "llama"),
    (m.norm_epsilon_per_channel, "llama"),
    (m.norm_square_is_abs, "llama"),
    (m.norm_square_times_other_tensor, "llama"),
    (m.norm_pow_exponent_4, "llama"),
    (m.norm_gamma_2d, "llama"),
    (m.norm_gamma_scalar, "llama"),
    (m.output_v_proj, "llama"),
    (m.output_mlp_intermediate, "llama"),
    (m.output_norm_before_gamma, "llama"),
    (m.output_norm_after_gamma, "llama"),
    (m.output_o_proj, "llama"),
    (m.output_residual_stream, "llama"),
    (m.consumer_o_proj_sum, "llama"),
    (m.consumer_v_proj_sum, "llama"),
    (m.consumer_gate_proj_slice, "llama"),
    (m.weight_graph_input, "llama"),
    (m.weight_overridable_initializer, "llama"),
    (m.weight_computed, "llama"),
    (m.weight_shared_with_untouched_reader, "llama"),
    (m.weight_shared_between_layers, "llama"),
    (m.cast_fp16_in_mlp, "llama"),
    (m.cast_bf16_on_residual, "llama"),
    (m.mlp_add_vector, "llama"),
    (m.mlp_mul_vector, "llama"),
    (m.mlp_add_scalar, "llama"),
    (m.mlp_gate_bias_2d, "llama"),
    (m.mlp_swap_gate_up, "llama"),
    (m.mlp_softmax_activation, "llama"),
    (m.heads_interleaved, "llama"),
    (m.extra_transpose_before_o_proj, "llama"),
    (m.softmax_over_queries, "llama"),
    (m.o_proj_bias, "llama"),
    (m.o_proj_bias_2d, "llama"),
    (m.residual_add_relu, "llama"),
    (m.qwen2_v_bias_2d, "qwen2"),
    (m.qwen2_v_reads_k_bias, "qwen2"),
]


# ------------------------------------------------------------------------------------ helpers

def feeds(model: onnx.ModelProto, batch=2, seq=24) -> dict[str, np.ndarray]:
    """Inputs for every graph input: random token ids, a mask of ones, positions 0..seq-1, and a
    fixed pseudo-random float tensor for any other (static-shaped) input."""
    ids = np.random.default_rng(1).integers(0, 512, size=(batch, seq))
    result = {}
    for inp in model.graph.input:
        if inp.name == "input_ids":
            result[inp.name] = ids
        elif inp.name == "attention_mask":
            result[inp.name] = np.ones((batch, seq), dtype=np.int64)
        elif inp.name == "position_ids":
            result[inp.name] = np.broadcast_to(np.arange(seq), (batch, seq)).copy()
        else:
            shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            rng = np.random.default_rng(zlib.crc32(inp.name.encode()))
            result[inp.name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return result


def run(path_or_model, inputs: dict) -> dict[str, np.ndarray]:
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs)))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def optimize(argv_tail, capsys, global_args=()):
    """Run `perq-onnx [global_args] optimize ...` in-process; return (exit code, stderr lines).
    An argparse usage error (SystemExit) counts like a returned exit code."""
    capsys.readouterr()
    try:
        rc = main([*global_args, "optimize", *map(str, argv_tail)])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # no tqdm bars
    return rc, lines


def assert_refused(rc, lines, out_dir, out):
    assert rc == 2, f"exit code {rc}, expected 0 or 2: {lines}"
    assert len(lines) == 1 and lines[0].startswith("perq-onnx: error:"), lines
    assert not out.exists()
    assert list(out_dir.iterdir()) == [], "leftovers in the output directory"


# ------------------------------------------------------------------------------ the mutations

@pytest.mark.slow
@pytest.mark.parametrize("mutation, arch", [pytest.param(f, a, id=f.__name__) for f, a in CASES])
def test_mutation_is_rewritten_exactly_or_refused(tiny_models, tmp_path, capsys, mutation, arch):
    mutated = mutation(onnx.load(str(tiny_models(arch))))
    try:
        onnx.checker.check_model(mutated, full_check=True)
        inputs = feeds(mutated)
        expected = run(mutated, inputs)
    except Exception as exc:  # the mutation itself is broken: say so, do not test the tool on it
        pytest.skip(f"mutated model is not valid/runnable: {type(exc).__name__}: {str(exc)[:200]}")
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    inp, out = in_dir / "model.onnx", out_dir / "model.onnx"
    onnx.save_model(mutated, str(inp))
    before = inp.read_bytes()

    rc, lines = optimize([inp, "-o", out, "--no-quant", "--seed", "0", *CALIB], capsys)

    assert inp.read_bytes() == before, "the input file was modified"
    assert [p.name for p in in_dir.iterdir()] == ["model.onnx"]
    if mutation is m.unmutated:  # the supported export itself must be rewritten, not refused
        assert rc == 0, lines
    if rc != 0:
        assert_refused(rc, lines, out_dir, out)
        return
    assert [p.name for p in out_dir.iterdir()] == ["model.onnx"], "leftovers in the output directory"
    # the function first (a wrong rewrite is reported as such), then the checker
    got = run(out, inputs)  # onnxruntime loads it, with the same inputs
    assert sorted(got) == sorted(expected), "the graph outputs changed"
    diffs = {name: relative(expected[name], got[name]) for name in expected}
    assert max(diffs.values()) <= TOL, f"outputs differ from the mutated input's: {diffs}"
    onnx.checker.check_model(str(out), full_check=True)


# ----------------------------------------------------------------------- command-line misuse

BAD_OPTIONS = [
    # (optimize options, global options, the option the message must name)
    (["--w-group", "0"], (), "--w-group"),
    (["--w-group", "-1"], (), "--w-group"),
    (["--calib-samples", "-1"], (), "--calib-samples"),
    (["--calib-samples", "0"], (), "--calib-samples"),
    (["--seq-len", "-5"], (), "--seq-len"),
    (["--seq-len", "0"], (), "--seq-len"),
    (["--seed", "-1"], (), "--seed"),
    ([], ("--threads", "-1"), "--threads"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, global_args, option",
                         [pytest.param(*c, id=" ".join(c[0] or c[1])) for c in BAD_OPTIONS])
def test_bad_option_value_is_refused(tiny_models, tmp_path, capsys, extra, global_args, option):
    out = tmp_path / "out.onnx"
    argv = [tiny_models("llama"), "-o", out, "--no-quant", *CALIB, *extra]  # the last value of an option wins
    rc, lines = optimize(argv, capsys, global_args)
    assert rc == 2, f"exit code {rc}: {lines}"
    assert lines and "internal error" not in lines[-1] and "error" in lines[-1] and option in lines[-1], lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_output_is_the_inputs_external_data_file(tiny_models, tmp_path, capsys):
    model_dir = tmp_path / "ext"
    model_dir.mkdir()
    inp = model_dir / "model.onnx"
    onnx.save_model(onnx.load(str(tiny_models("llama"))), str(inp), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    data = model_dir / "model.onnx.data"
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    rc, lines = optimize([inp, "-o", data, "--no-quant", *CALIB], capsys)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before, "the input's files changed"
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("perq-onnx: error:"), (rc, lines)


@pytest.mark.slow
def test_output_is_an_existing_directory(tiny_models, tmp_path, capsys):
    out = tmp_path / "outdir"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    rc, lines = optimize([tiny_models("llama"), "-o", out, "--no-quant", *CALIB], capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("perq-onnx: error:"), (rc, lines)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir"]


@pytest.mark.slow
def test_output_under_a_regular_file(tiny_models, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    rc, lines = optimize([tiny_models("llama"), "-o", blocker / "model.onnx", "--no-quant", *CALIB], capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("perq-onnx: error:"), (rc, lines)
    assert blocker.read_text() == "not a directory"
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
