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

Not checked: nodes inside If/Loop/Scan subgraphs; values of scales too large to read cheaply;
external data of an in-memory ModelProto (no base directory to read it from).
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import AttributeProto, NodeProto, TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

MIN_OPSET = 21
MAX_OPSET = 25
DEFAULT_DOMAINS = ("", "ai.onnx")
UNSUPPORTED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "ConvInteger",
                   "QLinearConv"}
QUANT_TYPES = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN,
               TensorProto.FLOAT4E2M1}
FOUR_BIT = {TensorProto.INT4, TensorProto.UINT4}
SCALE_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
GEMMS = {"MatMul", "Gemm"}
INT4_BLOCK_SIZES = (64, 128)
MAX_VALUE_ELEMENTS = 1 << 20
MODEL = "<model>"
_MAX_INLINE_DEPTH = 16


@dataclass(frozen=True)
class Violation:
    node: str      # node name (or MODEL for model-level rules)
    rule: str      # short rule id, e.g. "int4-block-size"
    reason: str    # one sentence in the user's terms


def _type_name(t: int | None) -> str:
    return "unknown" if t is None else TensorProto.DataType.Name(t)


def _attr(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ---------------------------------------------------------------------------------------------
# The flattened graph: local functions inlined, tensors indexed, constants readable on demand.
# ---------------------------------------------------------------------------------------------

def _inline(nodes, functions, scope: str, depth: int) -> list[tuple[str, NodeProto]]:
    out = []
    for i, node in enumerate(nodes):
        name = f"{scope}{node.name or f'{node.op_type}_{i}'}"
        fn = functions.get((node.domain, node.op_type))
        if fn is None or depth >= _MAX_INLINE_DEPTH:
            out.append((name, node))
            continue
        rename = dict(zip(fn.input, node.input))
        rename.update(zip(fn.output, node.output))
        given = {a.name: a for a in node.attribute}
        defaults = {a.name: a for a in fn.attribute_proto}

        def local(x, rename=rename, name=name):
            return "" if x == "" else rename.get(x, f"{name}/{x}")

        body = []
        for b in fn.node:
            nb = NodeProto()
            nb.CopyFrom(b)
            del nb.input[:], nb.output[:]
            nb.input.extend(local(x) for x in b.input)
            nb.output.extend(local(x) for x in b.output)
            attrs = []
            for a in b.attribute:
                if a.ref_attr_name:
                    src = given.get(a.ref_attr_name) or defaults.get(a.ref_attr_name)
                    if src is None:
                        continue
                    a2 = AttributeProto()
                    a2.CopyFrom(src)
                    a2.name = a.name
                    attrs.append(a2)
                else:
                    attrs.append(a)
            del nb.attribute[:]
            nb.attribute.extend(attrs)
            body.append(nb)
        out.extend(_inline(body, functions, f"{name}/", depth + 1))
    return out


class _Graph:
    def __init__(self, model: onnx.ModelProto, base_dir: pathlib.Path | None):
        self.model = model
        self.base_dir = base_dir
        functions = {(f.domain, f.name): f for f in model.functions}
        self.nodes = _inline(model.graph.node, functions, "", 0)
        self.init = {t.name: t for t in model.graph.initializer}
        self.producer: dict[str, tuple[str, NodeProto]] = {}
        self.consumers: dict[str, list[tuple[str, NodeProto, int]]] = {}
        for name, node in self.nodes:
            for o in node.output:
                self.producer[o] = (name, node)
            for k, x in enumerate(node.input):
                if x:
                    self.consumers.setdefault(x, []).append((name, node, k))
        self.graph_outputs = {o.name for o in model.graph.output}
        self.elem_type = {}
        for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
            if vi.type.HasField("tensor_type"):
                self.elem_type[vi.name] = vi.type.tensor_type.elem_type

    def constant(self, x: str) -> TensorProto | None:
        """The TensorProto behind a build-time constant (initializer or Constant node)."""
        if x in self.init:
            return self.init[x]
        prod = self.producer.get(x)
        if prod is None or prod[1].op_type != "Constant" or prod[1].domain not in DEFAULT_DOMAINS:
            return None
        for a in prod[1].attribute:
            if a.name == "value":
                return a.t
            if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                return numpy_helper.from_array(np.asarray(onnx.helper.get_attribute_value(a),
                    np.float32 if "float" in a.name else np.int64), x)
        return None

    def is_constant(self, x: str) -> bool:
        return self.constant(x) is not None

    def dtype(self, x: str) -> int | None:
        t = self.constant(x)
        if t is not None:
            return t.data_type
        prod = self.producer.get(x)
        if prod is not None and prod[1].op_type == "QuantizeLinear":
            return self.quant_type(prod[1])
        return self.elem_type.get(x) or None

    def dims(self, x: str) -> list[int] | None:
        t = self.constant(x)
        return None if t is None else list(t.dims)

    def value(self, x: str, max_elements: int | None = MAX_VALUE_ELEMENTS) -> np.ndarray | None:
        """Values of a constant, read only if it has at most max_elements elements."""
        t = self.constant(x)
        if t is None:
            return None
        if max_elements is not None and math.prod(t.dims) > max_elements:
            return None
        if t.data_location == TensorProto.EXTERNAL:
            if self.base_dir is None:
                return None
            loaded = TensorProto()
            loaded.CopyFrom(t)
            try:
                load_external_data_for_tensor(loaded, str(self.base_dir))
            except (OSError, ValueError):
                return None
            t = loaded
        return numpy_helper.to_array(t)

    def quant_type(self, node: NodeProto) -> int | None:
        """The low-precision type of a Q (its output) or DQ (its input)."""
        if node.op_type == "DequantizeLinear":
            return self.dtype(node.input[0])
        out = _attr(node, "output_dtype", 0)
        if out:
            return out
        if len(node.input) > 2 and node.input[2]:
            return self.dtype(node.input[2])
        return TensorProto.UINT8  # ONNX default when neither is given


# ---------------------------------------------------------------------------------------------
# Rules. Model rules: (g) -> violations. Node rules: (g, name, node) -> violations.
# ---------------------------------------------------------------------------------------------

def rule_opset_version(g: _Graph) -> Iterator[Violation]:
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
    if node.domain not in DEFAULT_DOMAINS:
        hint = (" (an onnxruntime contrib op)" if node.domain == "com.microsoft" else "")
        yield Violation(name, "custom-domain",
                        f"{node.domain}.{node.op_type}{hint} is not a standard ONNX operator and "
                        f"is not a model-local function, so TensorRT cannot import it without a "
                        f"plugin.")


def rule_unsupported_op(g, name, node):
    if node.domain in DEFAULT_DOMAINS and node.op_type in UNSUPPORTED_OPS:
        yield Violation(name, "unsupported-op",
                        f"TensorRT's ONNX parser does not support {node.op_type}.")


def _qdq(node) -> bool:
    return node.domain in DEFAULT_DOMAINS and node.op_type in ("QuantizeLinear",
                                                               "DequantizeLinear")


def rule_quant_dtype(g, name, node):
    if not _qdq(node):
        return
    qt = g.quant_type(node)
    if qt is not None and qt not in QUANT_TYPES:
        yield Violation(name, "quant-dtype",
                        f"{node.op_type} uses {_type_name(qt)}; TensorRT quantizes only to signed "
                        f"INT8, signed INT4, FP8 E4M3 or FP4 E2M1.")


def rule_zero_point(g, name, node):
    if not _qdq(node) or len(node.input) < 3 or not node.input[2]:
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
    if _qdq(node) and not g.is_constant(node.input[1]):
        yield Violation(name, "scale-static",
                        f"The scale '{node.input[1]}' is computed at run time; TensorRT needs a "
                        f"build-time constant scale.")


def rule_scale_dtype(g, name, node):
    if not _qdq(node):
        return
    st = g.dtype(node.input[1])
    if st is not None and st not in SCALE_TYPES:
        yield Violation(name, "scale-dtype",
                        f"The scale '{node.input[1]}' is {_type_name(st)}; TensorRT scales are "
                        f"FLOAT, FLOAT16 or BFLOAT16.")


def rule_scale_positive(g, name, node):
    if not _qdq(node):
        return
    v = g.value(node.input[1])
    if v is not None and not np.all(v.astype(np.float32) > 0):
        yield Violation(name, "scale-positive",
                        f"The scale '{node.input[1]}' has zero or negative entries; TensorRT "
                        f"needs strictly positive scales.")


def rule_int4_activation(g, name, node):
    if _qdq(node) and g.quant_type(node) in FOUR_BIT and not g.is_constant(node.input[0]):
        yield Violation(name, "int4-activation",
                        f"{node.op_type} puts the activation '{node.input[0]}' through a 4-bit "
                        f"type; TensorRT supports INT4 for constant weights only.")


def _gemm_k_axis(node: NodeProto, index: int, rank: int) -> int | None:
    """The input-feature (K) axis of a GEMM operand, or None if index is not an operand."""
    if node.op_type == "MatMul":
        return {0: rank - 1, 1: rank - 2}.get(index)
    if node.op_type == "Gemm":
        if index == 0:
            return 0 if _attr(node, "transA", 0) else 1
        if index == 1:
            return 1 if _attr(node, "transB", 0) else 0
    return None


def rule_int4_block(g, name, node):
    """INT4 weight DQ: blocked along K with block 64/128 and a scale of the matching shape."""
    if not (node.op_type == "DequantizeLinear" and node.domain in DEFAULT_DOMAINS
            and g.quant_type(node) in FOUR_BIT and g.is_constant(node.input[0])):
        return
    w_dims = g.dims(node.input[0])
    rank = len(w_dims)
    block = _attr(node, "block_size", 0)
    axis = _attr(node, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    if block not in INT4_BLOCK_SIZES:
        what = "no block_size (per-tensor/per-channel)" if not block else f"block_size {block}"
        yield Violation(name, "int4-block-size",
                        f"The INT4 weight '{node.input[0]}' has {what}; TensorRT INT4 weights "
                        f"need block quantization with block_size in {INT4_BLOCK_SIZES}.")
        return
    for _, user, k in g.consumers.get(node.output[0], []):
        if user.op_type in GEMMS and user.domain in DEFAULT_DOMAINS:
            k_axis = _gemm_k_axis(user, k, rank)
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
    if node.op_type != "DequantizeLinear" or node.domain not in DEFAULT_DOMAINS:
        return
    out = node.output[0]
    users = g.consumers.get(out, [])
    bad = sorted({f"{u.op_type} '{uname}'" for uname, u, k in users
                  if not (u.op_type in GEMMS and u.domain in DEFAULT_DOMAINS
                          and _gemm_k_axis(u, k, 2) is not None)})
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
    if not _qdq(node) or g.is_constant(node.input[0]) or g.quant_type(node) in FOUR_BIT:
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


def _same_constant(g: _Graph, a: str, b: str) -> bool:
    if a == b:
        return True
    va, vb = g.value(a), g.value(b)
    if va is None or vb is None:
        return False
    return va.shape == vb.shape and np.array_equal(va.astype(np.float32), vb.astype(np.float32))


MODEL_RULES: list[Callable[[_Graph], Iterator[Violation]]] = [rule_opset_version]
NODE_RULES: list[Callable[[_Graph, str, NodeProto], Iterator[Violation]]] = [
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
]


def check_tensorrt(model: onnx.ModelProto | str | pathlib.Path) -> list[Violation]:
    """Every TensorRT constraint the model breaks, in graph order (model-level rules first)."""
    base_dir = None
    if not isinstance(model, onnx.ModelProto):
        path = pathlib.Path(model)
        base_dir = path.parent
        model = onnx.load(str(path), load_external_data=False)
    g = _Graph(model, base_dir)
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
