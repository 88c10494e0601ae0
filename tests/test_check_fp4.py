"""perq_onnx.check_fp4: TensorRT's NVFP4 form (Model Optimizer's double-DequantizeLinear export)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from perq_onnx.check import check_tensorrt

K, N = 32, 8


def nvfp4_linear(opset=23, block=16, act_block=16, scale_type=TensorProto.FLOAT8E4M3FN, double_dq=True,
                 weight_axis=0, act_scale=0.01) -> onnx.ModelProto:
    """y = x @ W with W FP4 behind two DequantizeLinear and x through TRT_FP4DynamicQuantize."""
    rng = np.random.default_rng(0)
    w = rng.choice([0, 0.5, 1, 1.5, 2, 3, 4, 6, -1, -6], size=(K, N)).astype(ml_dtypes.float4_e2m1fn)
    s = rng.uniform(0.5, 2, size=(K // block, N)).astype(ml_dtypes.float8_e4m3fn)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(s, "w_block_scale"),
             numpy_helper.from_array(np.array(0.02, np.float32), "w_tensor_scale"),
             numpy_helper.from_array(np.array(act_scale, np.float32), "x_tensor_scale")]
    nodes = [helper.make_node("TRT_FP4DynamicQuantize", ["x", "x_tensor_scale"], ["x_fp4", "x_block_scale"],
                              "x_quantize", domain="trt", axis=-1, block_size=act_block, scale_type=scale_type),
             helper.make_node("DequantizeLinear", ["x_block_scale", "x_tensor_scale"], ["x_scale"], "x_scale_dq"),
             helper.make_node("DequantizeLinear", ["x_fp4", "x_scale"], ["x_dq"], "x_dq", axis=-1, block_size=act_block)]
    if double_dq:
        nodes.append(helper.make_node("DequantizeLinear", ["w_block_scale", "w_tensor_scale"], ["w_scale"], "w_scale_dq"))
    else:
        inits.append(numpy_helper.from_array(np.ones((K // block, N), np.float32), "w_scale"))
    nodes += [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["w_dq"], "w_dq", axis=weight_axis, block_size=block),
              helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], "matmul")]
    graph = helper.make_graph(nodes, "nvfp4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("trt", 1)])


def rules(model) -> set[str]:
    return {v.rule for v in check_tensorrt(model)}


def test_the_modelopt_form_passes():
    model = nvfp4_linear()
    onnx.checker.check_model(model)  # the standard ops are valid ONNX
    assert check_tensorrt(model) == []


@pytest.mark.parametrize("change, rule", [
    (dict(opset=21), "fp4-opset"),
    (dict(block=32), "fp4-block"),
    (dict(act_block=32), "fp4-dynamic-quantize"),
    (dict(scale_type=TensorProto.FLOAT), "fp4-dynamic-quantize"),
    (dict(act_scale=-1.0), "fp4-dynamic-quantize"),
    (dict(double_dq=False), "fp4-double-dq"),
    (dict(weight_axis=1, block=16), "fp4-block"),
])
def test_each_broken_rule_is_named(change, rule):
    assert rule in rules(nvfp4_linear(**change))
