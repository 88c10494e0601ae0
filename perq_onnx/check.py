"""Check an ONNX model against what TensorRT accepts for quantized (Q/DQ) networks.

TensorRT cannot be installed here, so this checker stands in for it: it reads the model the way
TensorRT's ONNX parser would see it and reports every node that breaks a documented constraint,
by node name. ``check_tensorrt`` returns a list of ``Violation``; ``summary`` formats it.

Paths are loaded with ``load_external_data=False``: only initializer metadata (dims, data type)
is used, plus the values of small tensors (zero points, and scales of at most
``MAX_VALUE_ELEMENTS`` elements), which are read one tensor at a time from the external file.

Sources, by rule id (paraphrased; "TRT" = NVIDIA TensorRT documentation, 10.x / 11.x):

``opset-version``
    ONNX operator specs for QuantizeLinear-21 / DequantizeLinear-21 and the ONNX 1.16 release
    notes: the int4 type and the ``block_size`` attribute (blocked quantization) exist only from
    ai.onnx opset 21 (IR 10). Upper bound: TRT "ONNX Opset Guide" (TensorRT 11.x parser accepts up
    to opset 25; onnx-tensorrt ``docs/operators.md`` for 10.15 says 9..24).
``custom-domain``
    onnx-tensorrt ``docs/operators.md`` lists only ai.onnx operators; anything else needs a
    TensorRT plugin, and TensorRT cannot load onnxruntime custom-op libraries (``perq``,
    ``com.microsoft`` such as MatMulNBits, ``ai.onnx.ml``).
    Model-local functions: the onnx-tensorrt parser imports a node that calls a model-local
    function by importing the function body (onnx-tensorrt Changelog 10.6/10.7; NVIDIA/TensorRT
    issue #4113, where plugins with the same name only later got priority). So a call is accepted
    when its body is; the checker inlines local functions and checks the body nodes, reported as
    ``<call node>/<body node>``.
``unsupported-op``
    onnx-tensorrt ``docs/operators.md``: DynamicQuantizeLinear, MatMulInteger, QLinearMatMul,
    ConvInteger and QLinearConv are marked not supported.
``quant-dtype``
    TRT "Working with Quantized Types" (introduction): TensorRT quantizes symmetrically to signed
    INT8, signed INT4, FP8 E4M3 or FP4 E2M1; onnx-tensorrt operators.md gives DequantizeLinear
    types INT8, FP8, FP4, INT4. Unsigned (uint8/uint4), 16-bit and FP8 E5M2 are rejected. ONNX
    QuantizeLinear-21: with neither a zero point nor ``output_dtype`` the output is uint8.
``zero-point``
    onnx-tensorrt operators.md (DequantizeLinear ``x_zero_point`` / QuantizeLinear
    ``y_zero_point`` must be zero) and TRT operator reference pages "Quantize"/"Dequantize": the
    zero point is optional, must be all zeros and a build-time constant (symmetric only).
``scale-static``
    TRT operator reference "Quantize"/"Dequantize": the scale tensor must be a build-time
    constant. A scale computed in the graph (e.g. ReduceMax of the activation) is dynamic.
``scale-dtype``
    TRT operator reference "Dequantize" (scale type float32/float16/bfloat16) and "Quantize"
    (scale has the input's float type); ONNX opset 21 allows float16/bfloat16 scales.
``scale-positive``
    TRT C++ API ``IDequantizeLayer`` / ``IQuantizeLayer`` class notes: every scale coefficient
    must be strictly positive. Checked only when the scale is small enough to read.
``int4-activation``
    TRT "Working with Quantized Types": INT4 is weight-only. A 4-bit Q/DQ whose data input is not
    a constant weight (initializer or Constant) is INT4 activation quantization.
``int4-block-size`` / ``int4-block-axis`` / ``int4-scale-shape``
    TRT operator reference "Dequantize" and ``IDequantizeLayer`` notes: INT4 weights use block
    quantization with a scale of the same rank as the weight (rank at most 2), equal to it except
    along the blocked dimension, which is the last or second-to-last one. ONNX
    DequantizeLinear-21: scale.shape[axis] = ceil(K / block_size). Team decisions (not stated in
    the TensorRT pages we could read): the block runs along the GEMM's input (K) axis of the
    weight, and block_size is 64 or 128 (``INT4_BLOCK_SIZES``).
``dq-feeds-gemm``
    TRT "Explicit Quantization" / "Quantized Weights": pre-quantized weights need a Dequantize
    between the weights and the linear operator that uses them. Team decision for the target form
    (TensorRT fuses Q/DQ into the GEMM when the DQ output goes straight into it): every
    DequantizeLinear output feeds MatMul/Gemm directly, for weights and for INT8/FP8 activations.
``activation-per-tensor``
    Team decision backed by the TensorRT Model Optimizer support matrix (INT8/FP8 activations are
    per-tensor for TensorRT): activation Q/DQ scales are a single value.
``qdq-pair-scale`` / ``q-feeds-dq``
    Team decision for a well-formed fake-quant pair: a QuantizeLinear output goes only into
    DequantizeLinear nodes (TensorRT has no other consumer for a quantized activation), and each
    Q -> DQ pair uses the same scale and quantized type.

NVFP4 (FP4 E2M1 weights and activations with E4M3 block scales): the rules of ``check_fp4.py``.

Not checked: nodes inside If/Loop/Scan subgraphs; values of scales too large to read cheaply;
external data of an in-memory ModelProto (no base directory to read it from).
"""
from __future__ import annotations

import math
import pathlib
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import NodeProto, TensorProto

from . import check_fp4
from .check_fp4 import is_dynamic_quantize, is_fp4_dq, is_scale_dq
from .check_graph import (DEFAULT_DOMAINS, MODEL, FlatGraph, Violation, attribute, gemm_k_axis, is_qdq,  # noqa: F401
                          type_name)

MIN_OPSET = 21
MAX_OPSET = 25
UNSUPPORTED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "ConvInteger",
                   "QLinearConv"}
QUANT_TYPES = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN,
               TensorProto.FLOAT4E2M1}
FOUR_BIT = {TensorProto.INT4, TensorProto.UINT4}
SCALE_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
GEMMS = {"MatMul", "Gemm"}
INT4_BLOCK_SIZES = (64, 128)


# ---------------------------------------------------------------------------------------------
# Rules. Model rules: (g) -> violations. Node rules: (g, name, node) -> violations.
# ---------------------------------------------------------------------------------------------

def rule_opset_version(g: FlatGraph) -> Iterator[Violation]:
    versions = [o.version for o in g.model.opset_import if o.domain in DEFAULT_DOMAINS]
    if not versions:
        yield Violation(MODEL, "opset-version", "The model imports no ai.onnx opset.")
    elif versions[0] < MIN_OPSET:
        yield Violation(MODEL, "opset-version",
                        f"The model uses ai.onnx opset {versions[0]}; INT4 weights and block "
                        f"quantization need opset {MIN_OPSET} or newer.")
    elif versions[0] > MAX_OPSET:
        yield Violation(MODEL, "opset-version",
                        f"The model uses ai.onnx opset {versions[0]}; TensorRT's parser "
                        f"supports up to opset {MAX_OPSET}.")


def rule_custom_domain(g, name, node):
    if node.domain not in DEFAULT_DOMAINS and not is_dynamic_quantize(node):
        hint = (" (an onnxruntime contrib op)" if node.domain == "com.microsoft" else "")
        yield Violation(name, "custom-domain",
                        f"{node.domain}.{node.op_type}{hint} is not a standard ONNX operator and "
                        f"is not a model-local function, so TensorRT cannot import it without a "
                        f"plugin.")


def rule_unsupported_op(g, name, node):
    if node.domain in DEFAULT_DOMAINS and node.op_type in UNSUPPORTED_OPS:
        yield Violation(name, "unsupported-op",
                        f"TensorRT's ONNX parser does not support {node.op_type}.")


def rule_quant_dtype(g, name, node):
    if not is_qdq(node):
        return
    qt = g.quant_type(node)
    if qt is not None and qt not in QUANT_TYPES:
        yield Violation(name, "quant-dtype",
                        f"{node.op_type} uses {type_name(qt)}; TensorRT quantizes only to signed "
                        f"INT8, signed INT4, FP8 E4M3 or FP4 E2M1.")


def rule_zero_point(g, name, node):
    if not is_qdq(node) or len(node.input) < 3 or not node.input[2]:
        return
    zp = node.input[2]
    if not g.is_constant(zp):
        yield Violation(name, "zero-point",
                        f"The zero point '{zp}' is computed in the graph; TensorRT needs it to be "
                        f"a constant of zeros (or absent).")
        return
    v = g.value(zp, max_elements=None)
    if v is not None and np.any(v.astype(np.float32) != 0):
        yield Violation(name, "zero-point",
                        f"The zero point '{zp}' has non-zero entries; TensorRT supports only "
                        f"symmetric quantization (zero point 0 or absent).")


def rule_scale_static(g, name, node):
    if is_qdq(node) and not g.is_constant(node.input[1]) and not is_fp4_dq(g, node):  # FP4: check_fp4
        yield Violation(name, "scale-static",
                        f"The scale '{node.input[1]}' is computed at run time; TensorRT needs a "
                        f"build-time constant scale.")


def rule_scale_dtype(g, name, node):
    if not is_qdq(node):
        return
    st = g.dtype(node.input[1])
    if st is not None and st not in SCALE_TYPES:
        yield Violation(name, "scale-dtype",
                        f"The scale '{node.input[1]}' is {type_name(st)}; TensorRT scales are "
                        f"FLOAT, FLOAT16 or BFLOAT16.")


def rule_scale_positive(g, name, node):
    if not is_qdq(node):
        return
    v = g.value(node.input[1])
    if v is not None and not np.all(v.astype(np.float32) > 0):
        yield Violation(name, "scale-positive",
                        f"The scale '{node.input[1]}' has zero or negative entries; TensorRT "
                        f"needs strictly positive scales.")


def rule_int4_activation(g, name, node):
    if is_qdq(node) and g.quant_type(node) in FOUR_BIT and not g.is_constant(node.input[0]):
        yield Violation(name, "int4-activation",
                        f"{node.op_type} puts the activation '{node.input[0]}' through a 4-bit "
                        f"type; TensorRT supports INT4 for constant weights only.")


def rule_int4_block(g, name, node):
    """INT4 weight DQ: blocked along K with block 64/128 and a scale of the matching shape."""
    if not (node.op_type == "DequantizeLinear" and node.domain in DEFAULT_DOMAINS
            and g.quant_type(node) in FOUR_BIT and g.is_constant(node.input[0])):
        return
    w_dims = g.dims(node.input[0])
    rank = len(w_dims)
    block = attribute(node, "block_size", 0)
    axis = attribute(node, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    if block not in INT4_BLOCK_SIZES:
        what = "no block_size (per-tensor/per-channel)" if not block else f"block_size {block}"
        yield Violation(name, "int4-block-size",
                        f"The INT4 weight '{node.input[0]}' has {what}; TensorRT INT4 weights "
                        f"need block quantization with block_size in {INT4_BLOCK_SIZES}.")
        return
    for _, user, k in g.consumers.get(node.output[0], []):
        if user.op_type in GEMMS and user.domain in DEFAULT_DOMAINS:
            k_axis = gemm_k_axis(user, k, rank)
            if k_axis is not None and axis != k_axis:
                yield Violation(name, "int4-block-axis",
                                f"The INT4 weight '{node.input[0]}' is blocked along axis {axis}, "
                                f"but its input-feature (K) axis in the GEMM is {k_axis}.")
                return
    s_dims = g.dims(node.input[1])
    if s_dims is None:
        return
    expected = list(w_dims)
    if 0 <= axis < rank:
        expected[axis] = -(-w_dims[axis] // block)
    if rank > 2 or s_dims != expected:
        yield Violation(name, "int4-scale-shape",
                        f"The block scale '{node.input[1]}' has shape {s_dims}; for a 2-D weight "
                        f"of shape {w_dims} blocked by {block} on axis {axis} TensorRT needs "
                        f"{expected}.")


def rule_dq_feeds_gemm(g, name, node):
    if node.op_type != "DequantizeLinear" or node.domain not in DEFAULT_DOMAINS or is_scale_dq(g, node):
        return
    out = node.output[0]
    users = g.consumers.get(out, [])
    bad = sorted({f"{u.op_type} '{uname}'" for uname, u, k in users
                  if not (u.op_type in GEMMS and u.domain in DEFAULT_DOMAINS
                          and gemm_k_axis(u, k, 2) is not None)})
    if out in g.graph_outputs:
        bad.append("the graph output")
    if not users and out not in g.graph_outputs:
        bad.append("nothing")
    if bad:
        yield Violation(name, "dq-feeds-gemm",
                        f"The dequantized tensor '{out}' goes to {', '.join(bad)}; TensorRT's "
                        f"target form has every DequantizeLinear feed a MatMul/Gemm operand "
                        f"directly.")


def rule_activation_per_tensor(g, name, node):
    if not is_qdq(node) or g.is_constant(node.input[0]) or g.quant_type(node) in FOUR_BIT:
        return
    dims = g.dims(node.input[1])
    if dims is not None and math.prod(dims) != 1:
        yield Violation(name, "activation-per-tensor",
                        f"The activation scale '{node.input[1]}' has shape {dims}; activation "
                        f"Q/DQ must use a single per-tensor scale.")


def rule_q_pairs(g, name, node):
    if node.op_type != "QuantizeLinear" or node.domain not in DEFAULT_DOMAINS:
        return
    for uname, user, _ in g.consumers.get(node.output[0], []):
        if user.op_type != "DequantizeLinear" or user.domain not in DEFAULT_DOMAINS:
            yield Violation(name, "q-feeds-dq",
                            f"The quantized tensor '{node.output[0]}' goes to {user.op_type} "
                            f"'{uname}'; a QuantizeLinear must feed only DequantizeLinear nodes.")
            continue
        if not _same_constant(g, node.input[1], user.input[1]):
            yield Violation(uname, "qdq-pair-scale",
                            f"The DequantizeLinear uses scale '{user.input[1]}' but its "
                            f"QuantizeLinear '{name}' uses '{node.input[1]}'; a Q/DQ pair must "
                            f"share one scale.")


def _same_constant(g: FlatGraph, a: str, b: str) -> bool:
    if a == b:
        return True
    va, vb = g.value(a), g.value(b)
    if va is None or vb is None:
        return False
    return va.shape == vb.shape and np.array_equal(va.astype(np.float32), vb.astype(np.float32))


MODEL_RULES: list[Callable[[FlatGraph], Iterator[Violation]]] = [rule_opset_version, *check_fp4.MODEL_RULES]
NODE_RULES: list[Callable[[FlatGraph, str, NodeProto], Iterator[Violation]]] = [
    rule_custom_domain,
    rule_unsupported_op,
    rule_quant_dtype,
    rule_zero_point,
    rule_scale_static,
    rule_scale_dtype,
    rule_scale_positive,
    rule_int4_activation,
    rule_int4_block,
    rule_dq_feeds_gemm,
    rule_activation_per_tensor,
    rule_q_pairs,
    *check_fp4.NODE_RULES,
]


def check_tensorrt(model: onnx.ModelProto | str | pathlib.Path) -> list[Violation]:
    """Every TensorRT constraint the model breaks, in graph order (model-level rules first)."""
    base_dir = None
    if not isinstance(model, onnx.ModelProto):
        path = pathlib.Path(model)
        base_dir = path.parent
        model = onnx.load(str(path), load_external_data=False)
    g = FlatGraph(model, base_dir)
    found: list[Violation] = []
    for rule in MODEL_RULES:
        found.extend(rule(g))
    for name, node in g.nodes:
        for rule in NODE_RULES:
            found.extend(rule(g, name, node))
    return found


def summary(violations) -> str:
    violations = list(violations)
    if not violations:
        return "TensorRT check: no violations."
    lines = [f"TensorRT check: {len(violations)} violation(s)"]
    for v in violations:
        lines.append(f"  [{v.rule}] {v.node}: {v.reason}")
    return "\n".join(lines)
