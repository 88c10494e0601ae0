"""Loading, editing helpers and atomic saving of ONNX models (onnx-graphsurgeon graphs).

Weights are read through Identity / Transpose chains (optimum shares identical initializers
through Identity nodes); every write gives the consuming node a fresh constant of its own, so a
shared initializer is never changed behind another reader's back.
"""
from __future__ import annotations

import os
import pathlib
import tempfile

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import PerqError

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes; protobuf files cannot exceed 2 GB


def load_model(path) -> onnx.ModelProto:
    """Read an ONNX file (external data included) or raise a one-line PerqError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PerqError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PerqError(f"{path}: not a readable ONNX model ({reason})") from None
    if not model.graph.node:
        raise PerqError(f"{path}: not an ONNX model (no graph nodes; truncated or another file type?)")
    return model


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, functions=(), min_opset: int | None = None) -> onnx.ModelProto:
    """Export a graph, attaching model-local functions and raising the default opset if asked."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    if min_opset is not None:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < min_opset:
                opset.version = min_opset
    for fn in functions:
        model.functions.append(fn)
        if not any(o.domain == fn.domain for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(fn.domain, 1))
    if min_opset and min_opset >= 21:  # int4 types need IR version 10
        model.ir_version = max(model.ir_version, 10)
    return model


def save_model(model: onnx.ModelProto, path) -> None:
    """Write atomically: into a temporary file next to the target, then rename. Models over
    ~1.8 GB get their tensors in '<name>.data' beside the file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    except ValueError:  # over protobuf's limit
        large = True
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_model = pathlib.Path(tmp) / path.name
        if large:
            data_name = path.name + ".data"
            onnx.save_model(model, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(pathlib.Path(tmp) / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, path)


# ---------------------------------------------------------------------------------- graph view

class GraphView:
    """A networkx DiGraph (node name -> node name) of the data flow of a gs.Graph.

    Edges into Shape/Size nodes are left out: a shape computation carries no channel data, so
    a tensor whose shape is read is not thereby an ancestor of what the shape feeds."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        for i, node in enumerate(graph.nodes):
            if not node.name:
                node.name = f"{node.op}_{i}"
        self.digraph = nx.DiGraph()
        self.by_name = {}
        for node in graph.nodes:
            self.by_name[node.name] = node
            self.digraph.add_node(node.name)
        for node in graph.nodes:
            for out in node.outputs:
                for consumer in out.outputs:
                    if consumer.op in ("Shape", "Size"):
                        continue
                    self.digraph.add_edge(node.name, consumer.name)
        self.order = {name: i for i, name in enumerate(nx.topological_sort(self.digraph))}

    def descendants(self, node: gs.Node) -> set[str]:
        return nx.descendants(self.digraph, node.name)

    def ancestors(self, node: gs.Node) -> set[str]:
        return nx.ancestors(self.digraph, node.name)

    def between(self, start: gs.Node, end: gs.Node) -> list[gs.Node]:
        """Nodes on some path start -> end (both excluded), in topological order."""
        names = self.descendants(start) & self.ancestors(end)
        return sorted((self.by_name[n] for n in names), key=lambda n: self.order[n.name])


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor that is constant: an initializer, a Constant node's output, or an
    Identity / 2-D Transpose of one. None otherwise."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Constant":
        value = node.attrs.get("value")
        return np.asarray(value.values) if isinstance(value, gs.Constant) else None
    if node.op == "Identity":
        return constant_value(node.inputs[0])
    if node.op == "Transpose":
        inner = constant_value(node.inputs[0])
        perm = node.attrs.get("perm")
        if inner is not None and inner.ndim == 2 and perm in (None, [1, 0]):
            return inner.T
    return None


_unique = {"n": 0}


def set_constant_input(node: gs.Node, index: int, value: np.ndarray, name: str) -> gs.Constant:
    """Give node.inputs[index] a new constant of its own (un-sharing whatever was there)."""
    _unique["n"] += 1
    const = gs.Constant(f"{name}.perq{_unique['n']}", np.ascontiguousarray(value))
    node.inputs[index] = const
    return const


def bypass(node: gs.Node, keep_input: gs.Tensor) -> None:
    """Remove a single-output node by rewiring its consumers to keep_input (its output must not be
    a graph output; RMSNorm outputs never are)."""
    out = node.outputs[0]
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = keep_input
    node.outputs.clear()
