"""Each deployment target's output: its structure in the file, what onnxruntime makes of it, and
(for tensorrt) the documented-constraints checker."""
from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest

from perq_onnx.check import check_tensorrt
from perq_onnx.errors import PerqError
from perq_onnx.evaluate import compare_logits
from perq_onnx.pipeline import optimize
from perq_onnx.runtime import deploy_config, session_options
from perq_onnx.settings import Settings

from conftest import random_ids

CALIB = dict(calib_samples=2, seq_len=32)


def optimized_graph(path, tmp_path, config) -> onnx.ModelProto:
    """The graph onnxruntime runs after its EXTENDED optimizations, with the model's session settings."""
    opts = session_options(config=config)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "ort_optimized.onnx"))


@pytest.fixture(scope="module")
def ort_output(tiny_models, tmp_path_factory):
    path = tiny_models("llama", past=True)
    out = tmp_path_factory.mktemp("ort") / "model.onnx"
    optimize(path, out, Settings.parse(block="16", target="ort", **CALIB), progress=False)
    return path, out


@pytest.mark.slow
def test_ort_target_fuses_every_weight_into_matmulnbits(ort_output, tmp_path):
    _, out = ort_output
    config = deploy_config(out)
    assert config == {"session.qdq_matmulnbits_accuracy_level": "4"}
    model = onnx.load(str(out))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 * 7 + 1  # every decoder linear and lm_head
    assert all(dict((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute).get("block_size") == 32
               for n in dq)
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear"]  # activations float in the graph
    fused = optimized_graph(out, tmp_path, config)
    nbits = [n for n in fused.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 15
    levels = {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    assert not [n for n in fused.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("quantized")]


@pytest.mark.slow
def test_ort_target_embedding_is_int8_gathered_first(ort_output):
    path, out = ort_output
    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(gathers) == 1 and len(inits[gathers[0].input[0]].dims) == 2
    d = compare_logits(path, out, ids=random_ids())
    assert d.top1 > 0.5 and d.cosine > 0.9  # a 4-bit model of a random tiny net: loose, but not broken


@pytest.mark.slow
def test_ort_target_refuses_activation_bits(tiny_models, tmp_path):
    with pytest.raises(PerqError, match="ort target leaves activations"):
        optimize(tiny_models("llama"), tmp_path / "x.onnx", Settings.parse(target="ort", a_bits=4), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("a_bits", [16, 8])
def test_tensorrt_target_passes_the_checker_and_runs(tiny_models, tmp_path, a_bits):
    path = tiny_models("llama", past=True)
    out = tmp_path / "trt.onnx"
    optimize(path, out, Settings.parse(block="16", target="tensorrt", a_bits=a_bits, **CALIB), progress=False)
    assert check_tensorrt(out) == []
    model = onnx.load(str(out))
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")] and not model.functions
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q) == (2 * 4 if a_bits == 8 else 0)
    d = compare_logits(path, out, ids=random_ids())
    assert d.top1 > 0.5 and d.cosine > 0.9


@pytest.mark.slow
def test_tensorrt_target_float_rewrite_is_exact(tiny_models, tmp_path):
    """Inlining the online rotation as standard ops changes nothing."""
    path = tiny_models("llama")
    out = tmp_path / "trt-float.onnx"
    optimize(path, out, Settings.parse(block="16", target="tensorrt", quantize=False, **CALIB), progress=False)
    assert compare_logits(path, out, ids=random_ids()).relative < 1e-4
    assert not onnx.load(str(out)).functions


@pytest.mark.slow
def test_tensorrt_target_refuses_what_tensorrt_cannot_run(tiny_models, tmp_path):
    for kwargs, match in ((dict(w_group=32), "64 or 128"), (dict(a_bits=4), "weight-only"),
                          (dict(w_symmetric=False), "INT4 weights are symmetric")):
        with pytest.raises(PerqError, match=match):
            optimize(tiny_models("llama"), tmp_path / "x.onnx", Settings.parse(target="tensorrt", **kwargs),
                     progress=False)


def test_target_weight_blocks_fit_the_model(tmp_path):
    """tensorrt takes the first of its blocks (128, 64) that divides every linear's input, and
    says so when none does; there an explicit --w-group that does not divide names the node
    (ort and simulate take ragged blocks); MatMulNBits needs power-of-two blocks >= 16."""
    from handmade import build_decoder
    path = build_decoder(tmp_path / "model.onnx")  # hidden 32, intermediate 64
    with pytest.raises(PerqError, match=r"weight blocks \(128, 64\) divide no common input size"):
        optimize(path, tmp_path / "x.onnx", Settings.parse(target="tensorrt", **CALIB), progress=False)
    with pytest.raises(PerqError, match=r"--w-group 64 does not divide the 32 input channels of node"):
        optimize(path, tmp_path / "x.onnx", Settings.parse(target="tensorrt", w_group=64, **CALIB), progress=False)
    with pytest.raises(PerqError, match=r"--w-group 24: MatMulNBits takes blocks of a power of two"):
        optimize(path, tmp_path / "x.onnx", Settings.parse(target="ort", w_group=24, **CALIB), progress=False)
    optimize(path, tmp_path / "ok.onnx", Settings.parse(target="ort", w_group=16, **CALIB), progress=False)
    assert check_tensorrt(tmp_path / "ok.onnx")  # block 16 is not TensorRT's form


def _dequantized_weights(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each DequantizeLinear weight as onnxruntime computes it, and as numpy computes it from the
    node's initializers ((codes - zero point) * scale, a ragged last block cut short)."""
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    result = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        codes = inits[node.input[0]].astype(np.float32)
        scale = inits[node.input[1]]
        zero = inits[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.zeros_like(scale)
        if attrs.get("block_size"):
            b, k = attrs["block_size"], codes.shape[0]
            scale, zero = (np.repeat(a, b, axis=0)[:k] for a in (scale, zero))
        single = onnx.helper.make_model(onnx.helper.make_graph(
            [onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"][:len(node.input)], ["y"], **attrs)], "dq", [],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [onnx.numpy_helper.from_array(inits[n], v) for n, v in zip(node.input, "qsz")]),
            opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
        ours = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        result[node.name] = ours, (codes - zero) * scale
    return result


@pytest.mark.parametrize("target,group", [("simulate", 24), ("ort", 64)])
def test_ragged_asymmetric_weight_blocks(tmp_path, target, group):
    """--w-asymmetric with blocks that do not divide K (24 on 32 and 64 rows; 64 on 32): uint4
    codes with zero points, the last block shorter; onnxruntime dequantizes every weight as numpy
    does, and the model stays close to the float one."""
    from handmade import build_decoder
    path = build_decoder(tmp_path / "model.onnx")  # hidden 32, intermediate 64
    out = tmp_path / "out.onnx"
    optimize(path, out, Settings.parse(target=target, w_group=group, w_symmetric=False, a_bits=16,
                                       rounding="gptq", w_clip="act", **CALIB), progress=False)
    weights = _dequantized_weights(out)
    assert len(weights) >= 14
    for name, (ours, expected) in weights.items():
        np.testing.assert_array_equal(ours, expected, err_msg=name)
    model = onnx.load(str(out))
    types = {t.data_type for t in model.graph.initializer if t.name.endswith(".weight.quantized")}
    assert types == {onnx.TensorProto.UINT4}
    assert compare_logits(path, out, ids=random_ids(vocab=64)).cosine > 0.99
