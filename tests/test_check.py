"""perq_onnx.check: a hand-built TensorRT-form model passes; each one-place edit is named."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from perq_onnx.check import MODEL, Violation, check_tensorrt, summary

K, N, BLOCK = 256, 64, 128


def conforming() -> onnx.ModelProto:
    """x -> Q/DQ (INT8, static per-tensor) -> MatMul <- DQ (INT4, blocks of 128 on K) <- W."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("W", TensorProto.INT4, [K, N], rng.integers(-8, 8, K * N).tolist())
    w_scale = numpy_helper.from_array(rng.uniform(0.01, 0.1, (K // BLOCK, N)).astype(np.float32),
                                      "w_scale")
    a_scale = numpy_helper.from_array(np.array(0.05, np.float32), "a_scale")
    a_zp = helper.make_tensor("a_zp", TensorProto.INT8, [], [0])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["xq"], name="act_q"),
        helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zp"], ["xd"], name="act_dq"),
        helper.make_node("DequantizeLinear", ["W", "w_scale"], ["wd"], name="w_dq", axis=0,
                         block_size=BLOCK),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, N])],
        initializer=[w, w_scale, a_scale, a_zp])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def init(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


def set_attr(n, name, value):
    for a in list(n.attribute):
        if a.name == name:
            n.attribute.remove(a)
    n.attribute.append(helper.make_attribute(name, value))


def found(m):
    return {(v.node, v.rule) for v in check_tensorrt(m)}


def test_conforming_model_is_valid_onnx_and_passes():
    m = conforming()
    onnx.checker.check_model(m, full_check=True)
    from onnx.reference import ReferenceEvaluator
    x = np.random.default_rng(1).standard_normal((1, 4, K)).astype(np.float32)
    (y,) = ReferenceEvaluator(m).run(None, {"x": x})
    assert y.shape == (1, 4, N)
    assert check_tensorrt(m) == []
    assert summary([]) == "TensorRT check: no violations."


def test_block_size_32():
    m = conforming()
    set_attr(node(m, "w_dq"), "block_size", 32)
    assert found(m) == {("w_dq", "int4-block-size")}


def test_per_output_channel_axis():
    m = conforming()
    set_attr(node(m, "w_dq"), "axis", 1)
    assert found(m) == {("w_dq", "int4-block-axis")}


def test_nonzero_int4_zero_point():
    m = conforming()
    zp = helper.make_tensor("w_zp", TensorProto.INT4, [K // BLOCK, N], [1] * (K // BLOCK * N))
    m.graph.initializer.append(zp)
    node(m, "w_dq").input.append("w_zp")
    assert found(m) == {("w_dq", "zero-point")}


def test_zero_int4_zero_point_is_fine():
    m = conforming()
    zp = helper.make_tensor("w_zp", TensorProto.INT4, [K // BLOCK, N], [0] * (K // BLOCK * N))
    m.graph.initializer.append(zp)
    node(m, "w_dq").input.append("w_zp")
    assert found(m) == set()


def test_uint4_weights():
    m = conforming()
    w = init(m, "W")
    w.CopyFrom(helper.make_tensor("W", TensorProto.UINT4, [K, N], [3] * (K * N)))
    assert found(m) == {("w_dq", "quant-dtype")}


def test_opset_17():
    m = conforming()
    m.opset_import[0].version = 17
    assert found(m) == {(MODEL, "opset-version")}


def test_mul_between_dq_and_matmul():
    m = conforming()
    m.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    m.graph.node.insert(3, helper.make_node("Mul", ["wd", "two"], ["wd2"], name="w_mul"))
    node(m, "matmul").input[1] = "wd2"
    assert found(m) == {("w_dq", "dq-feeds-gemm")}


def test_dynamic_activation_scale():
    m = conforming()
    m.graph.node.insert(0, helper.make_node("ReduceMax", ["x"], ["dyn_scale"], name="amax",
                                            keepdims=0))
    node(m, "act_q").input[1] = "dyn_scale"
    node(m, "act_dq").input[1] = "dyn_scale"
    assert found(m) == {("act_q", "scale-static"), ("act_dq", "scale-static")}


def test_int4_activation_qdq():
    m = conforming()
    init(m, "a_zp").CopyFrom(helper.make_tensor("a_zp", TensorProto.INT4, [], [0]))
    assert found(m) == {("act_q", "int4-activation"), ("act_dq", "int4-activation")}


def test_node_in_perq_domain():
    m = conforming()
    m.opset_import.append(helper.make_opsetid("perq", 1))
    m.graph.node.insert(0, helper.make_node("BlockHadamard", ["x"], ["xr"], name="rotate",
                                            domain="perq", block_size=64))
    node(m, "act_q").input[0] = "xr"
    assert found(m) == {("rotate", "custom-domain")}


def test_matmulnbits_contrib_op():
    m = conforming()
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    mm = node(m, "matmul")
    mm.CopyFrom(helper.make_node("MatMulNBits", ["xd", "W", "w_scale"], ["y"], name="matmul",
                                 domain="com.microsoft", K=K, N=N, bits=4, block_size=BLOCK))
    m.graph.node.remove(node(m, "w_dq"))
    got = check_tensorrt(m)
    assert {(v.node, v.rule) for v in got} == {("matmul", "custom-domain"),
                                               ("act_dq", "dq-feeds-gemm")}
    assert "onnxruntime" in next(v.reason for v in got if v.rule == "custom-domain")


def test_unequal_scales_in_a_qdq_pair():
    m = conforming()
    m.graph.initializer.append(numpy_helper.from_array(np.array(0.07, np.float32), "b_scale"))
    node(m, "act_dq").input[1] = "b_scale"
    assert found(m) == {("act_dq", "qdq-pair-scale")}


def test_float64_scale():
    m = conforming()
    init(m, "a_scale").CopyFrom(numpy_helper.from_array(np.array(0.05, np.float64), "a_scale"))
    assert found(m) == {("act_q", "scale-dtype"), ("act_dq", "scale-dtype")}


def test_local_function_bodies_are_checked_as_inlined():
    """A perq function made of standard ops is accepted; a custom op inside one is named."""
    def with_function(body_domain):
        m = conforming()
        body = [helper.make_node("Neg", ["a"], ["t"], name="neg"),
                helper.make_node("Relu" if not body_domain else "Secret", ["t"], ["b"],
                                 name="inner", domain=body_domain)]
        opsets = [helper.make_opsetid("", 21)] + (
            [helper.make_opsetid(body_domain, 1)] if body_domain else [])
        m.functions.append(helper.make_function("perq", "Rot", ["a"], ["b"], body, opsets))
        m.opset_import.append(helper.make_opsetid("perq", 1))
        m.graph.node.insert(0, helper.make_node("Rot", ["x"], ["xr"], name="rot", domain="perq"))
        node(m, "act_q").input[0] = "xr"
        return m

    assert found(with_function("")) == set()
    assert found(with_function("vendor")) == {("rot/inner", "custom-domain")}


def test_path_with_external_data_reads_small_tensors(tmp_path):
    m = conforming()
    zp = helper.make_tensor("w_zp", TensorProto.INT4, [K // BLOCK, N], [0] * 127 + [2])
    m.graph.initializer.append(zp)
    node(m, "w_dq").input.append("w_zp")
    for t in m.graph.initializer:  # raw_data form, so that every tensor goes to the data file
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    stored = onnx.load(str(path), load_external_data=False).graph.initializer
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored)
    got = check_tensorrt(path)
    assert [(v.node, v.rule) for v in got] == [("w_dq", "zero-point")]
    assert isinstance(got[0], Violation)
    text = summary(got)
    assert "1 violation" in text and "[zero-point] w_dq" in text


@pytest.mark.parametrize("op", ["DynamicQuantizeLinear", "MatMulInteger"])
def test_unsupported_standard_ops(op):
    m = conforming()
    m.graph.node.append(helper.make_node(op, ["x"], ["z"], name="bad"))
    assert ("bad", "unsupported-op") in found(m)
