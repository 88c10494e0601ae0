"""TensorRT's NVFP4 form, as NVIDIA's Model Optimizer exports it, checked node by node.

Sources (paraphrased): TRT "Working with Quantized Types" (FP4 E2M1 with FP8 E4M3 block scales
of 16 values and a float32 per-tensor scale; activations quantized dynamically), the onnx-tensorrt
importer's ``TRT_FP4DynamicQuantize`` (domain ``trt``: inputs data and the per-tensor scale,
attributes ``axis``, ``block_size``, ``scale_type``; outputs the FP4 data and its FP8 block scales),
and Model Optimizer's ONNX exporter, whose graphs dequantize twice: the E4M3 block scales by the
per-tensor scale, then the FP4 values by those block scales, straight into the GEMM. ONNX
DequantizeLinear-23 is the first to accept FLOAT4E2M1.

Rules (ids as reported):
``fp4-opset``          FP4 DequantizeLinear needs ai.onnx opset 23 or newer.
``fp4-dynamic-quantize`` a ``trt::TRT_FP4DynamicQuantize`` has block_size 16 on the last axis, E4M3
                       block scales (scale_type FLOAT8E4M3FN), a constant positive scalar per-tensor
                       scale, and both outputs go only into DequantizeLinear.
``fp4-double-dq``      an FP4 DequantizeLinear's scale is the output of a DequantizeLinear of E4M3
                       block scales (a constant for weights, the dynamic quantizer's second output
                       for activations) by a constant positive float32 scalar.
``fp4-block``          an FP4 DequantizeLinear has block_size 16, along the GEMM's input-feature axis.
The generic rules of check.py still apply, except where the double-DQ form is the documented
exception: the FP4 DequantizeLinear's scale is computed in the graph (by the scale DQ), and the
scale DQ feeds a DequantizeLinear's scale input rather than a GEMM.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from onnx import TensorProto

from .check_graph import DEFAULT_DOMAINS, MODEL, FlatGraph, Violation, attribute, gemm_k_axis

FP4_MIN_OPSET = 23
FP4_BLOCK = 16
TRT_DOMAIN = "trt"
DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
GEMMS = {"MatMul", "Gemm"}


def is_dynamic_quantize(node) -> bool:
    return node.domain == TRT_DOMAIN and node.op_type == DYNAMIC_QUANTIZE


def is_fp4_dq(g: FlatGraph, node) -> bool:
    return (node.op_type == "DequantizeLinear" and node.domain in DEFAULT_DOMAINS
            and _fp4_source(g, node.input[0]))


def _fp4_source(g: FlatGraph, x: str) -> bool:
    prod = g.producer.get(x)
    if prod is not None and is_dynamic_quantize(prod[1]):
        return prod[1].output[0] == x
    return g.dtype(x) == TensorProto.FLOAT4E2M1


def is_scale_dq(g: FlatGraph, node) -> bool:
    """A DequantizeLinear whose output is only ever the scale of FP4 DequantizeLinears."""
    users = g.consumers.get(node.output[0], [])
    return (node.op_type == "DequantizeLinear" and bool(users)
            and all(k == 1 and is_fp4_dq(g, u) for _, u, k in users))


def _positive_scalar(g: FlatGraph, x: str) -> bool:
    v = g.value(x)
    return v is not None and v.size == 1 and v.dtype == np.float32 and bool(np.all(v > 0))


def rule_fp4_opset(g: FlatGraph) -> Iterator[Violation]:
    if not any(is_fp4_dq(g, node) for _, node in g.nodes):
        return
    versions = [o.version for o in g.model.opset_import if o.domain in DEFAULT_DOMAINS]
    if versions and versions[0] < FP4_MIN_OPSET:
        yield Violation(MODEL, "fp4-opset", f"The model dequantizes FP4 (E2M1) with ai.onnx opset {versions[0]}; "
                                            f"DequantizeLinear accepts FLOAT4E2M1 from opset {FP4_MIN_OPSET}.")


def rule_dynamic_quantize(g: FlatGraph, name, node):
    if not is_dynamic_quantize(node):
        return
    problems = []
    if attribute(node, "block_size") != FP4_BLOCK:
        problems.append(f"block_size {attribute(node, 'block_size')} (needs {FP4_BLOCK})")
    if attribute(node, "axis", -1) != -1:
        problems.append(f"axis {attribute(node, 'axis')} (needs -1, the channels)")
    if attribute(node, "scale_type") != TensorProto.FLOAT8E4M3FN:
        problems.append(f"scale_type {attribute(node, 'scale_type')} (needs FLOAT8E4M3FN = {TensorProto.FLOAT8E4M3FN})")
    if len(node.input) < 2 or not _positive_scalar(g, node.input[1]):
        problems.append("a per-tensor scale that is not a constant positive float32 scalar")
    for out in node.output:
        if any(u.op_type != "DequantizeLinear" for _, u, _ in g.consumers.get(out, [])):
            problems.append(f"output '{out}' read by something other than DequantizeLinear")
    if problems:
        yield Violation(name, "fp4-dynamic-quantize", f"{DYNAMIC_QUANTIZE} has " + "; ".join(problems) + ".")


def rule_double_dq(g: FlatGraph, name, node):
    if not is_fp4_dq(g, node):
        return
    prod = g.producer.get(node.input[1])
    scale_dq = prod[1] if prod is not None and prod[1].op_type == "DequantizeLinear" else None
    if scale_dq is None:
        yield Violation(name, "fp4-double-dq", f"The FP4 scale '{node.input[1]}' is not the output of a "
                                               "DequantizeLinear of E4M3 block scales.")
        return
    source = g.producer.get(scale_dq.input[0])
    dynamic = source is not None and is_dynamic_quantize(source[1]) and source[1].output[1] == scale_dq.input[0]
    if not dynamic and g.dtype(scale_dq.input[0]) != TensorProto.FLOAT8E4M3FN:
        yield Violation(prod[0], "fp4-double-dq", f"The FP4 block scales '{scale_dq.input[0]}' are "
                                                  f"{g.dtype(scale_dq.input[0])}, not FLOAT8E4M3FN.")
    if not _positive_scalar(g, scale_dq.input[1]):
        yield Violation(prod[0], "fp4-double-dq", f"The per-tensor scale '{scale_dq.input[1]}' is not a constant "
                                                  "positive float32 scalar.")


def rule_fp4_block(g: FlatGraph, name, node):
    if not is_fp4_dq(g, node):
        return
    block = attribute(node, "block_size", 0)
    if block != FP4_BLOCK:
        yield Violation(name, "fp4-block", f"The FP4 DequantizeLinear has block_size {block}; NVFP4 has one scale "
                                           f"per {FP4_BLOCK} values.")
        return
    dims = g.dims(node.input[0])
    rank = len(dims) if dims is not None else None
    axis = attribute(node, "axis", 1)
    for _, user, k in g.consumers.get(node.output[0], []):
        if user.op_type not in GEMMS:
            continue
        if rank is None:  # an activation: blocks along its last axis, the GEMM's K for input 0
            if not (k == 0 and axis == -1):
                yield Violation(name, "fp4-block", f"The FP4 activation is blocked on axis {axis}; it must be "
                                                   "blocked along its last axis (the GEMM's input features).")
            continue
        k_axis = gemm_k_axis(user, k, rank)
        if k_axis is not None and (axis + rank) % rank != k_axis:
            yield Violation(name, "fp4-block", f"The FP4 weight '{node.input[0]}' is blocked on axis {axis}, "
                                               f"but its input-feature (K) axis in the GEMM is {k_axis}.")


MODEL_RULES = [rule_fp4_opset]
NODE_RULES = [rule_dynamic_quantize, rule_double_dq, rule_fp4_block]
