"""The model as TensorRT's ONNX parser sees it, for the rule checkers (check.py, check_fp4.py).

``FlatGraph`` flattens a model: model-local functions are inlined (TensorRT imports a function call
by importing its body), every tensor is indexed by producer and consumers, and constants are
readable on demand (initializers and Constant nodes; large or external values only when asked,
one tensor at a time).
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, NodeProto, TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_VALUE_ELEMENTS = 1 << 20
MODEL = "<model>"
_MAX_INLINE_DEPTH = 16


@dataclass(frozen=True)
class Violation:
    node: str      # node name (or MODEL for model-level rules)
    rule: str      # short rule id, e.g. "int4-block-size"
    reason: str    # one sentence in the user's terms


def type_name(t: int | None) -> str:
    return "unknown" if t is None else TensorProto.DataType.Name(t)


def attribute(node: NodeProto, name: str, default=None):
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


class FlatGraph:
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
        out = attribute(node, "output_dtype", 0)
        if out:
            return out
        if len(node.input) > 2 and node.input[2]:
            return self.dtype(node.input[2])
        return TensorProto.UINT8  # ONNX default when neither is given


def is_qdq(node) -> bool:
    return node.domain in DEFAULT_DOMAINS and node.op_type in ("QuantizeLinear",
                                                               "DequantizeLinear")


def gemm_k_axis(node: NodeProto, index: int, rank: int) -> int | None:
    """The input-feature (K) axis of a GEMM operand, or None if index is not an operand."""
    if node.op_type == "MatMul":
        return {0: rank - 1, 1: rank - 2}.get(index)
    if node.op_type == "Gemm":
        if index == 0:
            return 0 if attribute(node, "transA", 0) else 1
        if index == 1:
            return 1 if attribute(node, "transB", 0) else 0
    return None
