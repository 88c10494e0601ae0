"""Matching primitives the analysis modules share: linear layers (a MatMul by a constant 2-D
weight, with its bias Add), single readers, scalars, and the Casts the rewritten values may pass
through (by the graph's float type, passed explicitly: the analysis keeps no state).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from .records import AnalysisError, Linear
from .shapes import constant_shape, constant_value, producer


def single(items, node, what):
    """The one non-Shape node of items, else AnalysisError naming node."""
    items = [i for i in items if i.op != "Shape"]
    if len(items) != 1:
        raise AnalysisError(node, f"expected one {what}, found {len(items)}")
    return items[0]


def scalar(tensor) -> float | None:
    """The value of a one-element constant, else None."""
    v = constant_value(tensor)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    """The operand of binary node that is not tensor."""
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def as_linear(node: gs.Node) -> Linear | None:
    """node as a Linear when it is a MatMul by a constant 2-D weight (bias Add included)."""
    if node.op != "MatMul":
        return None
    w = constant_shape(node.inputs[1])
    if w is None or len(w[0]) != 2 or not np.issubdtype(w[1], np.floating):
        return None
    out = node.outputs[0]
    lin = Linear(node.name, node.inputs[0].name, out.name, *w[0])
    outs = [c for c in out.outputs if c.op != "Shape"]
    if len(outs) == 1 and outs[0].op == "Add":
        add = outs[0]
        idx = 0 if add.inputs[1] is out else 1
        b = constant_shape(add.inputs[idx])
        if b is not None and b[0] == (w[0][1],):
            lin = replace(lin, output=add.outputs[0].name, bias=add.name, bias_index=idx)
    return lin


def linear_producing(tensor) -> Linear | None:
    """The Linear whose output (its bias Add's, when it has one) tensor is, else None."""
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Add":  # bias Add after the MatMul
        for t in node.inputs:
            p = producer(t)
            if p is not None and p.op == "MatMul":
                lin = as_linear(p)
                if lin is not None and lin.bias == node.name:
                    return lin
        return None
    lin = as_linear(node)
    return lin if lin is not None and lin.bias is None else None


def only_reader(tensor: gs.Tensor, reader: gs.Node, what: str) -> None:
    """Refuse a tensor the rewrite changes when anything but `reader` reads it."""
    others = [c for c in tensor.outputs if c is not reader and c.op != "Shape"]
    if others:
        raise AnalysisError(others[0], f"reads {what} ('{tensor.name}'), which the rewrite changes")


# Casts the rewritten values may pass through, by the graph's float type (the token-embedding
# table's, i.e. the residual stream's): a Cast to a type at least as precise as the graph's own.
# In a float32 graph that is float32/float64 -- exact, so the rewrite is exact to float32 rounding.
# In a float16 graph (optimum --dtype fp16 computes RMSNorm in float32: Cast up, normalize, Cast
# back to float16; onnxruntime's float16 converter keeps everything in float16) a Cast back to
# float16 rounds exactly as every float16 op of the graph does: a rotation changes *which* values
# are rounded, so the rewritten float16 model equals its input to float16 rounding noise (of the
# order of the input's own deviation from its float32 original), not bit for bit. Narrower
# Casts (float32 -> float16/bfloat16 in a float32 graph, float16 -> bfloat16) round in the
# original channel basis at a precision below the graph's and are refused.
LOSSLESS_CASTS = {1: {1, 11}, 10: {10, 1, 11}, 11: {11}}  # graph float type -> allowed Cast targets
_NP_TO_ONNX = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}


def float_type(dtype) -> int | None:
    """The ONNX type number of a numpy float dtype (bfloat16 from ml_dtypes included), else None."""
    dtype = np.dtype(dtype)
    if dtype in _NP_TO_ONNX:
        return _NP_TO_ONNX[dtype]
    return 16 if dtype.name == "bfloat16" else None


def lossless_cast(node: gs.Node, graph_float: int) -> bool:
    """Whether node is a Cast the rewritten values may pass through in a graph of float type
    `graph_float` (the ONNX type number of its residual stream)."""
    return node.op == "Cast" and node.attrs.get("to") in LOSSLESS_CASTS[graph_float]
