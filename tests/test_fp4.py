"""Microscaling FP4 through the pipeline: simulate (standard ops, bit-exact to formats.py) and
TensorRT's NVFP4 form (the same weights, bit for bit), and clear refusals."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from perq_onnx.calibration import with_outputs
from perq_onnx.check import check_tensorrt
from perq_onnx.errors import PerqError
from perq_onnx.formats import MXFP4, NVFP4, e2m1_bit_values, e8m0_values
from perq_onnx.pipeline import optimize
from perq_onnx.runtime import make_feeds, session
from perq_onnx.settings import Settings
from perq_onnx.targets import target

from conftest import random_ids

pytestmark = pytest.mark.slow

COMMON = dict(calib_samples=2, seq_len=16, rounding="rtn", w_clip="mse")


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models("llama")


def build(path, out, **options):
    optimize(path, out, Settings.parse(**{**COMMON, **options}), progress=False)
    return onnx.load(str(out))


def initializers(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def run_tensors(path, names):
    sess = session(with_outputs(onnx.load(str(path)), names))
    return dict(zip(names, sess.run(names, make_feeds(sess, random_ids(seq=32)))))


def simulate_weights(path, model) -> dict[str, np.ndarray]:
    """Each decoder linear's weight as the simulate model computes it (keyed by MatMul name)."""
    weights = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul" and "/weight_fp4/" in n.input[1]}
    values = run_tensors(path, list(weights.values()))
    return {name: values[t] for name, t in weights.items()}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_simulate_weights_and_activations_equal_the_numpy_reference(llama, tmp_path, fmt):
    out = tmp_path / "model.onnx"
    model = build(llama, out, format=fmt)
    inits = initializers(model)
    ref = NVFP4 if fmt == "nvfp4" else MXFP4
    # weights: the lookup chain's output is code * block scale computed from the stored bits
    weights = simulate_weights(out, model)
    assert len(weights) == 14
    for name, w in weights.items():
        codes = inits[f"{name}.weight.e2m1"].astype(np.uint8)
        scale = inits[f"{name}.weight.block_scale"]
        values = e2m1_bit_values()[codes]
        if fmt == "nvfp4":
            ts = next(v for k, v in inits.items() if k.startswith(f"{name}/weight_fp4/tensor_scale"))
            step = scale.astype(np.float32) * np.float32(ts)
        else:
            step = e8m0_values()[scale.astype(np.uint8)]
        expected = values * np.repeat(step, ref.group, axis=0)
        np.testing.assert_array_equal(w, expected)
        assert not np.array_equal(w, 0) and len(np.unique(codes)) > 4
    # activations: every quantize-dequantize output equals formats.py's qdq of its input
    records = [r for r in __import__("json").loads(next(p.value for p in model.metadata_props
                                                         if p.key == "perq.activation_qdq"))]
    assert len(records) == 8
    values = run_tensors(out, [n for r in records for n in (r["input"], r["output"])])
    for r in records:
        x, y = values[r["input"]], values[r["output"]]
        if fmt == "nvfp4":
            ts = inits[r["output"].replace("/output", "/tensor_scale")]
            reference = NVFP4(float(ts)).qdq(x)
        else:
            reference = MXFP4().qdq(x)
        np.testing.assert_array_equal(y, reference)
        assert not np.array_equal(x, y)


@pytest.mark.slow
def test_tensorrt_nvfp4_is_modelopts_form_with_the_simulate_weights(llama, tmp_path):
    sim_path, trt_path = tmp_path / "sim" / "model.onnx", tmp_path / "trt" / "model.onnx"
    sim = build(llama, sim_path, format="nvfp4")
    trt = build(llama, trt_path, format="nvfp4", target="tensorrt")
    onnx.checker.check_model(str(trt_path), full_check=True)
    assert check_tensorrt(trt_path) == []
    ops = [(n.domain, n.op_type) for n in trt.graph.node]
    assert ops.count(("trt", "TRT_FP4DynamicQuantize")) == 8
    assert not any(d == "perq" for d, _ in ops)
    inits = initializers(trt)
    decoded = {}
    for node in trt.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith(".weight.fp4"):
            scale_dq = next(n for n in trt.graph.node if n.output[0] == node.input[1])
            codes = inits[node.input[0]]
            assert codes.dtype == ml_dtypes.float4_e2m1fn and node.attribute[1].i == 16
            step = inits[scale_dq.input[0]].astype(np.float32) * np.float32(inits[scale_dq.input[1]])
            decoded[node.input[0][:-len(".weight.fp4")]] = codes.astype(np.float32) * np.repeat(step, 16, axis=0)
    expected = simulate_weights(sim_path, sim)
    assert decoded.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(decoded[name], expected[name])


@pytest.mark.slow
@pytest.mark.parametrize("options, message", [
    (dict(format="nvfp4", target="ort"), "--format nvfp4: the ort target expresses int only"),
    (dict(format="mxfp4", target="tensorrt"), "--format mxfp4: the tensorrt target expresses int, nvfp4 only"),
])
def test_a_format_the_target_cannot_express_is_refused(options, message):
    settings = Settings.parse(**options)
    with pytest.raises(PerqError, match=message):
        target(settings).resolve(settings, {"/model/layers.0/mlp/down_proj/MatMul": 256})


@pytest.mark.slow
def test_a_layer_the_format_block_does_not_divide_is_named():
    settings = Settings.parse(format="mxfp4")
    with pytest.raises(PerqError, match=r"blocks of 32 do not divide the 48 input channels of node 'odd'"):
        target(settings).resolve(settings, {"even": 64, "odd": 48})


@pytest.mark.parametrize("options, message", [
    (dict(format="nvfp4", w_group=32), "--w-group 32: --format nvfp4 has one scale per 16"),
    (dict(format="mxfp4", a_bits=8), "--a-bits 8: --format mxfp4"),
    (dict(format="nvfp4", fused_ops=True, a_bits=16), "--fused-ops"),
])
def test_format_options_are_checked_once(options, message):
    with pytest.raises(PerqError, match=message):
        Settings.parse(**options)


def test_nvfp4_turns_r1_and_r2_off_unless_asked(llama, tmp_path):
    """NVFP4 defaults to the online block rotation only (the report says so); an explicit
    --residual-rotation full / --head-rotation is kept; MXFP4 keeps all three, at its block of 32,
    its R1 the online residual rotation."""
    default = optimize(llama, tmp_path / "a.onnx", Settings.parse(**COMMON, format="nvfp4"), progress=False)
    assert any("R1 and R2 off by default" in s for s in default.summaries)
    assert not any(s.startswith(("RotateResidual", "RotateHeads")) for s in default.summaries)
    assert any(s.startswith("InsertOnlineRotation: online block Hadamard b=16") for s in default.summaries)
    mx = optimize(llama, tmp_path / "m.onnx", Settings.parse(**COMMON, format="mxfp4"), progress=False)
    assert any("residual rotation online by default" in s for s in mx.summaries)  # its R1: online
    assert any(s.startswith("RotateResidualOnline") for s in mx.summaries)
    assert not any(s.startswith("RotateResidual:") for s in mx.summaries)
    assert any(s.startswith("InsertOnlineRotation: online block Hadamard b=32") for s in mx.summaries)
    forced = optimize(llama, tmp_path / "b.onnx", Settings.parse(**COMMON, format="nvfp4", residual_rotation="full",
                                                                   head_rotation=True), progress=False)
    assert any(s.startswith("RotateResidual") for s in forced.summaries)
    assert any(s.startswith("RotateHeads") for s in forced.summaries)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fused_fp4_op_model_matches_unfused(llama, tmp_path, fmt):
    """--fused-ops: each down_proj input's rotation and FP4 quantizer become one
    perq.BlockHadamardQuantizeFP4 (NVFP4: its own calibrated tensor scale per node). Its function
    body gives the unfused model's logits exactly; the op library's kernel, up to the rotation's
    last bits (README of runtime_ops)."""
    from perq_onnx import ops
    unfused = tmp_path / "unfused.onnx"
    fused = tmp_path / "fused.onnx"
    build(llama, unfused, format=fmt)
    model = build(llama, fused, format=fmt, fused_ops=True)
    nodes = [n for n in model.graph.node if n.op_type == "BlockHadamardQuantizeFP4"]
    assert len(nodes) == 2  # one per layer; a function body for each perq op left in the graph, no more
    assert sorted(f.name for f in model.functions) == sorted({n.op_type for n in model.graph.node if n.domain == "perq"})
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert all(a["format"] == fmt.encode() for a in attrs)
    if fmt == "nvfp4":  # each node's tensor scale is its own input's calibrated amax / 2688
        scales = [a["tensor_scale"] for a in attrs]
        assert len(set(scales)) == 2 and all(s > 0 for s in scales)
    else:
        assert all("tensor_scale" not in a for a in attrs)
    ids = random_ids(seq=32)
    a, b = (session(p).run(None, make_feeds(session(p), ids))[0] for p in (unfused, fused))
    np.testing.assert_array_equal(a, b)
    with_library = ops.session(str(fused))
    c = with_library.run(None, make_feeds(with_library, ids))[0]
    assert np.abs(c - a).max() <= 0.05 * np.abs(a).max()
