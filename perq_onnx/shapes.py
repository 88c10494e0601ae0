"""Constants and shape tensors, evaluated statically: the one evaluator the front end and the
analysis share.

* ``constant_value`` / ``constant_shape``: a tensor that is constant (an initializer, a Constant
  node's output, or an Identity / 2-D Transpose of one), read or only described;
* ``shape_value``: a small integer tensor computed in the graph from constants and the static
  dims of ``Shape`` nodes (Gather / Split / Concat / Squeeze / Unsqueeze / Cast / Identity and
  Add / Sub / Mul / Div), as a float64 vector whose unknown entries are NaN. It reads optimum's
  ``chunk`` bounds (Shape -> Gather(-1) -> Add/Div -> Unsqueeze) and onnxruntime's Split-based
  rewrite of Shape -> Gather -> Unsqueeze -> Concat, which ONNX data propagation does not follow;
* ``shape_element`` and ``reshape_last_dim`` on top of it.

perq_onnx/check.py reads constants from a ModelProto with its own reader (it checks written
files, without onnx-graphsurgeon).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .weights import read


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor that is constant: an initializer, a Constant node's output, or an
    Identity / 2-D Transpose of one. None otherwise."""
    if isinstance(tensor, gs.Constant):
        return read(tensor)
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Constant":
        value = node.attrs.get("value")
        return read(value) if isinstance(value, gs.Constant) else None
    if node.op == "Identity":
        return constant_value(node.inputs[0])
    if node.op == "Transpose":
        inner = constant_value(node.inputs[0])
        perm = node.attrs.get("perm")
        if inner is not None and inner.ndim == 2 and perm in (None, [1, 0]):
            return inner.T
    return None


def np_dtype(dtype) -> np.dtype:
    """A numpy dtype from what onnx-graphsurgeon reports (a numpy dtype, or the ONNX type number for
    types numpy lacks, such as bfloat16: then ml_dtypes' type)."""
    if isinstance(dtype, (int, np.integer)) or hasattr(dtype, "value") and isinstance(dtype.value, int):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(getattr(dtype, "value", dtype))))
    return np.dtype(dtype)


def constant_shape(tensor: gs.Tensor) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a constant tensor (as constant_value sees it) without reading it."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape), np_dtype(tensor.dtype)
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Constant":
        value = node.attrs.get("value")
        return (tuple(value.shape), np_dtype(value.dtype)) if isinstance(value, gs.Constant) else None
    if node.op == "Identity":
        return constant_shape(node.inputs[0])
    if node.op == "Transpose":
        inner = constant_shape(node.inputs[0])
        if inner is not None and len(inner[0]) == 2 and node.attrs.get("perm") in (None, [1, 0]):
            return inner[0][::-1], inner[1]
    return None


def _dims(shape) -> np.ndarray:
    return np.array([d if isinstance(d, (int, np.integer)) and d >= 0 else np.nan for d in shape], np.float64)


def _static_length(tensor: gs.Tensor) -> int | None:
    """The number of elements of a 0-D/1-D tensor with a static shape."""
    shape = tensor.shape
    if shape is not None and len(shape) <= 1 and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return int(np.prod(shape)) if len(shape) else 1
    return None


def shape_value(tensor: gs.Tensor, shapes: dict[str, list] | None = None, depth: int = 12) -> np.ndarray | None:
    """The value of a small integer tensor as a flat float64 array, unknown entries NaN (see the
    module docstring); None when not even its length is known. `shapes` gives the shape of
    tensors whose own static shape is missing or to be overridden (tensor name -> dims)."""
    shapes = shapes or {}
    value = constant_value(tensor)
    if value is not None:
        return np.asarray(value, np.float64).reshape(-1) if np.issubdtype(value.dtype, np.integer) else None
    node = producer(tensor)
    result = None if node is None or depth == 0 else _evaluate(node, tensor, shapes, depth - 1)
    if result is None and (n := _static_length(tensor)) is not None:
        result = np.full(n, np.nan)  # a computed value of known length: its entries unknown
    return result


def _evaluate(node: gs.Node, tensor: gs.Tensor, shapes: dict, depth: int) -> np.ndarray | None:
    if node.op == "Shape":
        shape = shapes.get(node.inputs[0].name, node.inputs[0].shape)
        if shape is None:
            return None
        dims = _dims(shape)
        return dims[node.attrs.get("start", 0):node.attrs.get("end", len(dims))]
    if node.op == "Split" and node.attrs.get("axis", 0) == 0:
        whole = shape_value(node.inputs[0], shapes, depth)
        sizes = shape_value(node.inputs[1], shapes, depth) if len(node.inputs) > 1 and node.inputs[1].name else None
        if sizes is None:
            sizes = np.array([_static_length(o) if _static_length(o) is not None else np.nan for o in node.outputs])
        if whole is None or np.isnan(sizes).any():
            return None
        k = next(i for i, o in enumerate(node.outputs) if o is tensor)
        start = int(sizes[:k].sum())
        return whole[start:start + int(sizes[k])]
    args = [shape_value(t, shapes, depth) for t in node.inputs]
    if node.op in ("Identity", "Cast", "Unsqueeze", "Squeeze"):
        return args[0]
    if any(a is None for a in args):
        return None
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0 and not np.isnan(args[1]).any():
        index = args[1].astype(np.int64)
        inside = np.all((index >= -args[0].size) & (index < args[0].size))
        return np.take(args[0], index).reshape(-1) if inside else None
    if node.op == "Concat":
        return np.concatenate(args)
    ops = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply,
           "Div": lambda a, b: np.trunc(a / np.where(b == 0, np.nan, b))}  # integer Div truncates
    if node.op in ops and len(args) == 2 and (args[0].size == args[1].size or 1 in (args[0].size, args[1].size)):
        with np.errstate(invalid="ignore"):
            return np.asarray(ops[node.op](args[0], args[1]), np.float64).reshape(-1)
    return None


def shape_element(tensor: gs.Tensor, index: int) -> int | None:
    """Element `index` of a 1-D shape tensor computed in the graph, when it is known."""
    value = shape_value(tensor)
    if value is None or not -value.size <= index < value.size or np.isnan(value[index]):
        return None
    return int(value[index])


def reshape_last_dim(node: gs.Node) -> int | None:
    """The (positive) last dimension a Reshape produces: from its shape input, else from its
    output's inferred shape; None when neither tells."""
    last = shape_element(node.inputs[1], -1)
    if last is not None and last > 0:
        return last
    shape = node.outputs[0].shape
    return shape[-1] if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None
