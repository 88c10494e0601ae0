"""The standard-op definitions of what perq-onnx inserts at run time.

Two things are defined here, once, and used everywhere (graph passes, model-local functions,
the custom-op library's tests):

* ``BlockHadamard(X; block_size=b)`` in domain ``perq``: Y = X with every consecutive block of b
  channels of the last axis multiplied by the orthonormal Sylvester Hadamard H_b (H_b[i, j] =
  (-1)^popcount(i & j) / sqrt(b)). Body: Shape -> Reshape [-1, b] -> MatMul(H_b) -> Reshape.
* The dynamic per-token activation quantize-dequantize (over the last axis), asymmetric or
  symmetric, n bits, in exactly this order of float32 operations (in a float16 graph the same
  operations in float16, with float16 constants and EPS = 2^-14; a function body computes in
  float32 between Cast(X, float) and CastLike(Y, X)):

  asymmetric (qmax = 2^n - 1):
      lo = Min(ReduceMin(x), 0); hi = Max(ReduceMax(x), 0)  # times c with a clip ratio c < 1
      scale = Max((hi - lo) / qmax, EPS); zp = Round(-lo / scale)
      q = QuantizeLinear(x / scale + zp, 1, uint_n 0)      # round half to even, clip [0, qmax]
      y = (DequantizeLinear(q, 1, uint_n 0) - zp) * scale
  symmetric (qmax = 2^(n-1) - 1):
      scale = Max(ReduceMax(Abs(x)) / qmax, EPS)           # ReduceMax(Abs(x)) * c with c < 1
      q = QuantizeLinear(x / scale, 1, int_n 0)            # round half to even, clip [-qmax-1, qmax]
      y = DequantizeLinear(q, 1, int_n 0) * scale

* ``BlockHadamardQuantize(X; block_size, bits, symmetric)`` in domain ``perq``: the two above
  fused, rotation first.
* ``BlockHadamardQuantizeFP4(X; block_size, format, tensor_scale)`` in domain ``perq``: the
  rotation, then the dynamic FP4 quantize-dequantize of perq_onnx.formats
  (``emit_fp4_activation_qdq``) over the last axis in the format's blocks: ``format`` "nvfp4"
  (blocks of 16, E4M3 block scales times the float ``tensor_scale``) or "mxfp4" (blocks of 32,
  power-of-two scales; ``tensor_scale`` unused). The body reads ``tensor_scale`` through an
  attribute reference, so every node carries its own.

Code emits these through an ``Emitter`` so the same builder writes graph nodes (onnx-graphsurgeon)
and function bodies (FunctionProto).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .formats import format_for, emit_fp4_activation_qdq
from .hadamard import hadamard

DOMAIN = "perq"
EPS = 1e-8
BLOCK_HADAMARD = "BlockHadamard"
BLOCK_HADAMARD_QUANTIZE = "BlockHadamardQuantize"
BLOCK_HADAMARD_QUANTIZE_FP4 = "BlockHadamardQuantizeFP4"
PER_NODE_ATTRIBUTES = frozenset({"tensor_scale"})  # read by attribute reference: may differ between nodes
QDQ_TYPES = {  # (bits, symmetric) -> onnx integer type used by QuantizeLinear
    (4, False): TensorProto.UINT4,
    (4, True): TensorProto.INT4,
    (8, False): TensorProto.UINT8,
    (8, True): TensorProto.INT8,
}


class FunctionEmitter:
    """Emits NodeProtos into a function body; constants become Constant nodes."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def _name(self, hint):
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value: np.ndarray, hint: str) -> str:
        out = self._name(hint)
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(value, out)))
        return out

    def float_attribute(self, name: str) -> str:
        """A float32 scalar from the calling node's float attribute ``name`` (attribute reference)."""
        out = self._name(name)
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT, ref_attr_name=name))
        self.nodes.append(node)
        return out

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, output: str | None = None, **attrs) -> str:
        out = output or self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def zero_point(bits: int, symmetric: bool) -> np.ndarray:
    """The scalar zero point (value 0) of the integer type that holds n-bit codes."""
    tensor = helper.make_tensor("zp", QDQ_TYPES[(bits, symmetric)], [], [0])
    return numpy_helper.to_array(tensor)


def emit_block_hadamard(e, x, block_size: int, output=None):
    """Y = blockwise X @ H_b over the last axis (H_b cast like X)."""
    h = e.const(hadamard(block_size, np.float32), "hadamard")
    shape = e.op("Shape", [x], "shape")
    flat = e.op("Reshape", [x, e.const(np.array([-1, block_size], np.int64), "blocks")], "blocks")
    rotated = e.op("MatMul", [flat, e.op("CastLike", [h, x], "hadamard_cast")], "rotated")
    return e.op("Reshape", [rotated, shape], "unblocked", output=output)


def activation_eps(dtype) -> float:
    """EPS, raised to the smallest normal number of dtype where EPS would underflow (float16:
    2^-14; float32 keeps 1e-8)."""
    return float(max(EPS, np.finfo(dtype).tiny))


def emit_activation_qdq(e, x, bits: int, symmetric: bool, output=None, dtype=None, clip: float = 1.0):
    """Dynamic per-token (last axis) fake quantization of x, as documented in the module; with
    ``clip`` < 1 (graph nodes only) each token's range is that fraction of its extremes, the rest
    saturating.

    dtype: x's float type, when the caller knows it (graph nodes): the chain's constants, and so
    its scales and zero points, are of that type (float16 models get a float16 chain, EPS raised
    to float16's smallest normal). Without it (a function body, which serves every input type)
    the chain runs in float32 between a Cast of x and a CastLike back to x's type, with the
    float32 constants documented above; for float32 inputs both are identities."""
    if dtype is None:
        x32 = e.op("Cast", [x], "x_float", to=TensorProto.FLOAT)
        y32 = _qdq(e, x32, bits, symmetric, np.dtype(np.float32), None)
        return e.op("CastLike", [y32, x], "y_like_x", output=output)
    return _qdq(e, x, bits, symmetric, np.dtype(dtype), output, clip)


def _clipped(e, extreme, clip: float, dtype: np.dtype, hint: str):
    if clip == 1.0:
        return extreme
    return e.op("Mul", [extreme, e.const(np.array(clip, dtype), "clip_ratio")], hint)


def _qdq(e, x, bits: int, symmetric: bool, dtype: np.dtype, output, clip: float = 1.0):
    one = e.const(np.array(1.0, dtype), "one")
    zp_int = e.const(zero_point(bits, symmetric), "zero_point")
    eps = e.const(np.array(activation_eps(dtype), dtype), "eps")
    axes = e.const(np.array([-1], np.int64), "last_axis")
    if symmetric:
        qmax = e.const(np.array(2 ** (bits - 1) - 1, dtype), "qmax")
        amax = _clipped(e, e.op("ReduceMax", [e.op("Abs", [x], "abs"), axes], "amax", keepdims=1), clip, dtype,
                        "amax_clipped")
        scale = e.op("Max", [e.op("Div", [amax, qmax], "scale_raw"), eps], "scale")
        q = e.op("QuantizeLinear", [e.op("Div", [x, scale], "scaled"), one, zp_int], "q")
        return e.op("Mul", [e.op("DequantizeLinear", [q, one, zp_int], "dq"), scale], "y", output=output)
    qmax = e.const(np.array(2**bits - 1, dtype), "qmax")
    zero = e.const(np.array(0.0, dtype), "zero")
    lo = _clipped(e, e.op("Min", [e.op("ReduceMin", [x, axes], "xmin", keepdims=1), zero], "lo"), clip, dtype,
                  "lo_clipped")
    hi = _clipped(e, e.op("Max", [e.op("ReduceMax", [x, axes], "xmax", keepdims=1), zero], "hi"), clip, dtype,
                  "hi_clipped")
    scale = e.op("Max", [e.op("Div", [e.op("Sub", [hi, lo], "range"), qmax], "scale_raw"), eps], "scale")
    zp = e.op("Round", [e.op("Div", [e.op("Neg", [lo], "neg_lo"), scale], "zp_raw")], "zp")
    shifted = e.op("Add", [e.op("Div", [x, scale], "scaled"), zp], "shifted")
    q = e.op("QuantizeLinear", [shifted, one, zp_int], "q")
    centered = e.op("Sub", [e.op("DequantizeLinear", [q, one, zp_int], "dq"), zp], "centered")
    return e.op("Mul", [centered, scale], "y", output=output)


def _function(name: str, attributes: list[str], body) -> onnx.FunctionProto:
    e = FunctionEmitter()
    body(e)
    return helper.make_function(
        DOMAIN, name, ["X"], ["Y"], e.nodes,
        opset_imports=[helper.make_opsetid("", 21)], attributes=attributes,
    )


def block_hadamard_function(block_size: int) -> onnx.FunctionProto:
    """Model-local body of BlockHadamard for this model's block size."""
    return _function(BLOCK_HADAMARD, ["block_size"], lambda e: emit_block_hadamard(e, "X", block_size, output="Y"))


def block_hadamard_quantize_function(block_size: int, bits: int, symmetric: bool) -> onnx.FunctionProto:
    """Model-local body of BlockHadamardQuantize for this model's settings."""
    def body(e):
        rotated = emit_block_hadamard(e, "X", block_size)
        emit_activation_qdq(e, rotated, bits, symmetric, output="Y")
    return _function(BLOCK_HADAMARD_QUANTIZE, ["block_size", "bits", "symmetric"], body)


def block_hadamard_quantize_fp4_function(block_size: int, format: str) -> onnx.FunctionProto:
    """Model-local body of BlockHadamardQuantizeFP4 for this model's block size and format."""
    fmt = format_for(format)
    def body(e):
        rotated = emit_block_hadamard(e, "X", block_size)
        ts = e.float_attribute("tensor_scale") if fmt.name == "nvfp4" else None
        emit_fp4_activation_qdq(e, rotated, fmt, output="Y", tensor_scale=ts)
    return _function(BLOCK_HADAMARD_QUANTIZE_FP4, ["block_size", "format", "tensor_scale"], body)


def function_for(op_type: str, attrs: dict) -> onnx.FunctionProto:
    """The model-local function body of a perq node with these attributes."""
    if op_type == BLOCK_HADAMARD:
        return block_hadamard_function(attrs["block_size"])
    if op_type == BLOCK_HADAMARD_QUANTIZE:
        return block_hadamard_quantize_function(attrs["block_size"], attrs["bits"], bool(attrs["symmetric"]))
    if op_type == BLOCK_HADAMARD_QUANTIZE_FP4:
        return block_hadamard_quantize_fp4_function(attrs["block_size"], attrs["format"])
    raise KeyError(f"no function body for perq.{op_type}")


def single_op_model(op_type: str, channels: int, **attrs) -> onnx.ModelProto:
    """A one-node model Y = perq.<op_type>(X) with X of shape [batch, tokens, channels] (float32),
    carrying the model-local function, for tests and benchmarks of the op alone."""
    fn = function_for(op_type, attrs)
    node = helper.make_node(op_type, ["X"], ["Y"], domain=DOMAIN, **attrs)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "tokens", channels])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "tokens", channels])
    graph = helper.make_graph([node], op_type, [x], [y])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)], functions=[fn]
    )
    model.ir_version = 10
    return model
