"""Loading and exporting ONNX models as onnx-graphsurgeon graphs whose weights stay on disk.

Weights are read through Identity / Transpose chains (optimum shares identical initializers
through Identity nodes); every write gives the consuming node a fresh constant of its own, so a
shared initializer is never changed behind another reader's back. Weight bytes are handled by
``weights`` (memory-mapped reads, streamed writes); this module never loads them all.
"""
from __future__ import annotations

import pathlib

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import PerqError
from .weights import map_external, read


def load_graph(path) -> gs.Graph:
    """Import an ONNX file without loading its external data (mapped lazily instead), or raise
    a one-line PerqError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PerqError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PerqError(f"{path}: not a readable ONNX model ({reason})") from None
    if not model.graph.node:
        raise PerqError(f"{path}: not an ONNX model (no graph nodes; truncated or another file type?)")
    try:  # shapes (with constant propagation) let the analysis check head layouts
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a help, not a requirement
        pass
    initializers = {i.name for i in model.graph.initializer}
    graph = gs.import_onnx(model)
    # initializers also listed as graph inputs (IR < 4 style, or overridable at run time)
    graph.overridable = {i.name for i in model.graph.input if i.name in initializers}
    graph.ir_version = model.ir_version
    graph.metadata = {p.key: p.value for p in model.metadata_props}
    map_external(graph, path.parent)
    return graph


def export_structure(graph: gs.Graph, functions=(), min_opset: int | None = None,
                     metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """The graph as a ModelProto whose initializers still point where their bytes live (see
    weights.WeightStore.write_model), with model-local functions, a raised default opset and
    metadata."""
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
    model.ir_version = getattr(graph, "ir_version", model.ir_version)
    if min_opset and min_opset >= 21:  # int4 types need IR version 10
        model.ir_version = max(model.ir_version, 10)
    for key, value in {**getattr(graph, "metadata", {}), **(metadata or {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


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
        self.tensors = graph.tensors()
        self.graph_inputs = {t.name for t in graph.inputs} | getattr(graph, "overridable", set())
        self.graph_outputs = {t.name for t in graph.outputs}

    def tensor(self, name: str) -> gs.Tensor:
        return self.tensors[name]

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


def constant_shape(tensor: gs.Tensor) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a constant tensor (as constant_value sees it) without reading it."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape), np.dtype(tensor.dtype)
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Constant":
        value = node.attrs.get("value")
        return (tuple(value.shape), np.dtype(value.dtype)) if isinstance(value, gs.Constant) else None
    if node.op == "Identity":
        return constant_shape(node.inputs[0])
    if node.op == "Transpose":
        inner = constant_shape(node.inputs[0])
        if inner is not None and len(inner[0]) == 2 and node.attrs.get("perm") in (None, [1, 0]):
            return inner[0][::-1], inner[1]
    return None


def bypass(graph: gs.Graph, node: gs.Node, keep_input: gs.Tensor) -> None:
    """Remove a single-output node by rewiring its consumers to keep_input (its output must not be
    a graph output: analysis refuses those)."""
    out = node.outputs[0]
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = keep_input
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.remove(node)
