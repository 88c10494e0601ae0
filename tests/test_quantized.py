"""The quantized output: plain onnxruntime loads it, it holds the INT4 QDQ structure, and its
logits track the float model (loosely for W4A4, tightly for W8A8: a broken pass fails both)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from perq_onnx.errors import PerqError
from perq_onnx.pipeline import optimize
from perq_onnx.settings import Settings
from perq_onnx.runtime import logits, session

from conftest import random_ids


def cosine(a, b):
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    path = tiny_models("llama", past=True)
    out = tmp_path_factory.mktemp("q") / "model.perq.onnx"
    optimize(path, out, Settings.parse(block="16"), progress=False)
    return path, out


@pytest.mark.slow
def test_loads_in_plain_onnxruntime(quantized):
    _, out = quantized
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert {o.name for o in sess.get_outputs()} >= {"logits", "present.0.value"}


@pytest.mark.slow
def test_structure(quantized):
    _, out = quantized
    model = onnx.load(str(out))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = {i.name: i for i in model.graph.initializer}
    nodes = model.graph.node
    weight_dq = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == 2 * 7
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in weight_dq)
    assert len([n for n in nodes if n.op_type == "QuantizeLinear"]) == 2 * 4  # qkv, o, gate/up, down
    assert len([n for n in nodes if n.op_type == "BlockHadamard" and n.domain == "perq"]) == 2
    # lm_head and embeddings stay float
    lm = next(n for n in nodes if n.name == "/lm_head/MatMul")
    assert inits[lm.input[1]].data_type == onnx.TensorProto.FLOAT
    records = json.loads({p.key: p.value for p in model.metadata_props}["perq.activation_qdq"])
    assert [r["linear"] for r in records[:4]] == ["qkv", "o_proj", "gate_up", "down_proj"]


@pytest.mark.slow
@pytest.mark.parametrize("bits,min_cos", [(4, 0.9), (8, 0.999)])
def test_logits_track_float_model(tiny_models, tmp_path, bits, min_cos):
    path = tiny_models("llama")
    out = tmp_path / "q.onnx"
    optimize(path, out, Settings.parse(block="16", w_bits=bits, a_bits=bits), progress=False)
    ids = random_ids()
    ref, got = logits(session(path), ids), logits(session(out), ids)
    assert cosine(ref, got) > min_cos
    assert np.abs(ref - got).max() > 0  # it is quantized


@pytest.mark.slow
def test_quantization_without_rotation_is_worse_on_outliers(tiny_models, tmp_path):
    """The tiny models have outlier channels: rotations must reduce the W4A4 logit error."""
    path = tiny_models("llama")
    ids = random_ids()
    ref = logits(session(path), ids)
    errs = {}
    for name, opts in {"plain": Settings.parse(block="none", residual_rotation="none", head_rotation=False, permute="none"),
                       "perq": Settings.parse(block="16")}.items():
        optimize(path, tmp_path / f"{name}.onnx", opts, progress=False)
        errs[name] = float(np.abs(logits(session(tmp_path / f"{name}.onnx"), ids) - ref).mean())
    assert errs["perq"] < errs["plain"]


@pytest.mark.slow
def test_fused_op_model_matches_unfused(tiny_models, tmp_path):
    path = tiny_models("llama")
    # (--fused-ops has no float-target refit: the unfused twin rounds its weights the same way)
    optimize(path, tmp_path / "a.onnx", Settings.parse(block="16", float_target=False), progress=False)
    optimize(path, tmp_path / "b.onnx", Settings.parse(block="16", fused_ops=True), progress=False)
    model = onnx.load(str(tmp_path / "b.onnx"))
    assert len([n for n in model.graph.node if n.op_type == "BlockHadamardQuantize"]) == 2
    assert [f.name for f in model.functions] == ["BlockHadamardQuantize"]
    ids = random_ids()
    a, b = logits(session(tmp_path / "a.onnx"), ids), logits(session(tmp_path / "b.onnx"), ids)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


@pytest.mark.slow
def test_symmetric_and_grouped_options(tiny_models, tmp_path):
    path = tiny_models("llama")
    out = tmp_path / "s.onnx"
    optimize(path, out, Settings.parse(block="32", a_symmetric=True, w_group=32), progress=False)
    model = onnx.load(str(out))
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    zp = {i.name: i for i in model.graph.initializer}[qs[0].input[2]]
    assert zp.data_type == onnx.TensorProto.INT4
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "weight_dq" in n.name)
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 32}
    ids = random_ids()
    assert cosine(logits(session(path), ids), logits(session(out), ids)) > 0.9


@pytest.mark.slow
def test_model_with_op_library_matches_function_fallback(tiny_models, tmp_path):
    """A PeRQ model run with the compiled BlockHadamard kernel gives the logits of the same model
    run through its model-local function body (plain onnxruntime)."""
    from perq_onnx import ops
    ops.build_library(verbose=False)
    path = tiny_models("llama", past=True)
    out = tmp_path / "float.onnx"
    optimize(path, out, Settings.parse(block="64", quantize=False), progress=False)
    ids = random_ids()
    fallback = logits(session(out), ids)
    with_library = logits(ops.session(str(out)), ids)
    assert np.abs(fallback - with_library).max() <= 1e-5 * np.abs(fallback).max()


@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_clip_ratio_scales_each_tokens_range(symmetric):
    """--a-clip c: the per-token chain quantizes onto the grid of c times the token's extremes
    (lo * c, hi * c; amax * c), saturating what lies beyond, and c = 1 emits the plain chain."""
    from onnx import TensorProto, helper

    from perq_onnx.functions import FunctionEmitter, emit_activation_qdq

    def run(clip):
        e = FunctionEmitter()
        emit_activation_qdq(e, "X", 4, symmetric, output="Y", dtype=np.float32, clip=clip)
        graph = helper.make_graph(e.nodes, "qdq", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 64])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 64])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"X": x})[0], len(e.nodes)

    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    x[:, 3] *= 20.0  # an outlier channel: clipping it refines every other channel's step
    f = np.float32
    c = f(0.75)
    if symmetric:
        scale = np.abs(x).max(-1, keepdims=True) * c / f(7)
        expected = np.clip(np.rint(x / scale), -8, 7) * scale
    else:
        lo = np.minimum(x.min(-1, keepdims=True), f(0)) * c
        hi = np.maximum(x.max(-1, keepdims=True), f(0)) * c
        scale = (hi - lo) / f(15)
        zp = np.rint(-lo / scale)
        expected = (np.clip(np.rint(x / scale + zp), 0, 15) - zp) * scale
    clipped, n_clipped = run(0.75)
    plain, n_plain = run(1.0)
    np.testing.assert_allclose(clipped, expected, rtol=0, atol=1e-5)
    assert n_clipped == n_plain + (2 if symmetric else 4)  # a constant and a Mul per clipped extreme
    others = np.arange(64) != 3
    assert np.abs(clipped - x)[:, others].mean() < np.abs(plain - x)[:, others].mean()


def test_activation_clip_is_refused_where_it_cannot_apply(tmp_path):
    from handmade import build_decoder
    path = build_decoder(tmp_path / "model.onnx")
    for kwargs, match in ((dict(target="ort", a_clip=0.9), "no dynamic INT activation quantizer"),
                          (dict(a_clip=0.9, fused_ops=True, block="16"), "fused perq.BlockHadamardQuantize"),
                          (dict(a_clip=0.3), r"in \[0.5, 1\]"),
                          (dict(a_clip=0.9, format="nvfp4"), "scales each block")):
        with pytest.raises(PerqError, match=match):
            optimize(path, tmp_path / "x.onnx", Settings.parse(calib_samples=2, seq_len=32, **kwargs), progress=False)


@pytest.mark.parametrize("rounding", ["gptq", "rtn"])
def test_float_target_compensates_the_activation_error(tmp_path, rounding):
    """--float-target: the activations are quantized first, the weight pass collects X~^T X~ and
    X~^T X on the graph with them and rounds each weight refitted toward the float output; on
    held-out inputs the W4A4 logits are closer to the float model's than without (most where
    --a-clip 0.8 makes the activation error large and biased: GPTQ 0.073 vs 0.112 relative here)."""
    from handmade import build_decoder, VOCAB
    path = build_decoder(tmp_path / "model.onnx")
    common = dict(target="simulate", rounding=rounding, w_clip="act", block="16", a_clip=0.8, calib_samples=8,
                  seq_len=32)
    ids = random_ids(vocab=VOCAB, batch=4, seq=32, seed=5)
    reference = logits(session(path), ids)
    errors = {}
    for float_target in (False, True):
        out = tmp_path / f"ft-{float_target}.onnx"
        report = optimize(path, out, Settings.parse(float_target=float_target, **common), progress=False)
        assert any("toward the float output" in s for s in report.summaries) == float_target
        got = logits(session(out), ids)
        errors[float_target] = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
    assert errors[True] < 0.8 * errors[False], errors


def test_float_target_is_refused_where_it_cannot_apply(tmp_path):
    from handmade import build_decoder
    path = build_decoder(tmp_path / "model.onnx")
    for kwargs in (dict(target="ort"), dict(target="simulate", a_bits=16, rounding="gptq"),
                   dict(target="simulate", fused_ops=True, block="16")):
        with pytest.raises(PerqError, match="--float-target"):
            optimize(path, tmp_path / "x.onnx", Settings.parse(float_target=True, calib_samples=2, seq_len=32, **kwargs),
                     progress=False)


def test_float_target_is_the_simulate_int_w4a4_default(tmp_path):
    """The target fills in --float-target: on for simulate INT W4A4 (RTN included, which then
    needs the calibration pass even with permutation statistics given and no GPTQ), off with
    --no-float-target, for W16A4 / W4A8, the FP4 formats, --fused-ops and every other target."""
    from handmade import build_decoder, VOCAB
    from perq_onnx.pipeline import calibrate
    from perq_onnx.targets import target
    path = build_decoder(tmp_path / "model.onnx")
    linears = {"a": 64}

    def resolved(**kwargs):
        s = Settings.parse(**kwargs)
        return target(s).resolve(s, linears).weights.float_target

    assert resolved(target="simulate") is True
    assert resolved(target="simulate", float_target=False) is False
    for kwargs in (dict(a_bits=16), dict(a_bits=8), dict(w_bits=8), dict(format="nvfp4"), dict(format="mxfp4"),
                   dict(fused_ops=True, block="16")):
        assert resolved(target="simulate", **kwargs) is False, kwargs
    for name in ("ort", "genai", "tensorrt"):
        assert resolved(target=name) is False, name
    stats = calibrate(path, random_ids(vocab=VOCAB, batch=2, seq=32, seed=1), progress=False)
    report = optimize(path, tmp_path / "out.onnx", Settings.parse(target="simulate", rounding="rtn", w_clip="mse",
                                                                   calib_samples=2, seq_len=32),
                      stats=stats, progress=False)
    assert any("toward the float output" in s for s in report.summaries)
