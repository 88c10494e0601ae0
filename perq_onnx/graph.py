"""Loading and exporting ONNX models as onnx-graphsurgeon graphs whose weights stay on disk.

``load_graph`` reads a model without its external data and runs the front end (frontend.py:
opset, canonical linears, shape inference, unique node names); ``export_structure`` writes the
graph back as a ModelProto whose initializers still point where their bytes live, and
``check_model_file`` runs onnx.checker on a written file. ``GraphView`` is the data-flow view the
analysis walks. Weights are read through Identity / Transpose chains (optimum shares identical
initializers through Identity nodes; shapes.constant_value); every write gives the consuming node a fresh
constant of its own, so a shared initializer is never changed behind another reader's back.
Weight bytes are handled by ``weights`` (memory-mapped reads, streamed writes); this module
never loads them all.
"""
from __future__ import annotations

import pathlib

import networkx as nx
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.logger import G_LOGGER

from .errors import PerqError
from .frontend import TARGET_OPSET, canonicalize, default_opset, name_nodes, stash_schemaless
from .weights import map_external

# graphsurgeon warns about every tensor type numpy lacks (float8, float4), which it keeps as they are
G_LOGGER.severity = G_LOGGER.ERROR


def load_graph(path) -> gs.Graph:
    """Import an ONNX file without loading its external data (mapped lazily instead), in the
    front end's canonical form (frontend.py), or raise a one-line PerqError."""
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
    model = canonicalize(model, path)
    initializers = {i.name for i in model.graph.initializer}
    graph = gs.import_onnx(model)
    name_nodes(graph)
    # initializers also listed as graph inputs (IR < 4 style, or overridable at run time)
    graph.overridable = {i.name for i in model.graph.input if i.name in initializers}
    graph.ir_version = model.ir_version
    graph.metadata = {p.key: p.value for p in model.metadata_props}
    map_external(graph, path.parent)
    return graph


RAISABLE_OPSET = 23  # export may declare up to this opset: 22/23 added types only to the ops decoders use


def export_structure(graph: gs.Graph, functions=(), min_opset: int | None = None,
                     metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """The graph as a ModelProto whose initializers still point where their bytes live (see
    weights.WeightStore.write_model), with model-local functions, a raised default opset and
    metadata."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    version = default_opset(model)
    if min_opset is not None and (version is None or version < min_opset):
        # load_graph converted the model to TARGET_OPSET; a raise here means a graph made otherwise
        if version is None or version < TARGET_OPSET or min_opset > RAISABLE_OPSET:
            raise PerqError(f"the graph is at opset {version} but its rewrite needs opset {min_opset}")
        for opset in model.opset_import:  # 22 and 23 only added types (bfloat16, float4) to these ops
            if opset.domain in ("", "ai.onnx"):
                opset.version = version = min_opset
    for fn in functions:
        fn = _at_opset(fn, version)
        model.functions.append(fn)
        if not any(o.domain == fn.domain for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(fn.domain, 1))
    model.ir_version = getattr(graph, "ir_version", model.ir_version)
    if version is not None and version >= 21:  # opset 21 (int4 types) is IR version 10
        model.ir_version = max(model.ir_version, 10)
    for key, value in {**getattr(graph, "metadata", {}), **(metadata or {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def _at_opset(fn: onnx.FunctionProto, version: int | None) -> onnx.FunctionProto:
    """fn importing the model's default-domain opset (a function must import the same version as
    its model; the bodies in functions.py use ops whose meaning is the same from opset 21 on)."""
    if version is None:
        return fn
    out = onnx.FunctionProto()
    out.CopyFrom(fn)
    for opset in out.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = version
    return out


def check_model_file(path) -> None:
    """onnx.checker (full check) of a written model; onnxruntime's own default-domain ops
    (SimplifiedLayerNormalization), which ONNX has no schema for, are checked as ops of a
    placeholder domain (as com.microsoft ops are), in a sibling copy without weights."""
    path = pathlib.Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if not stash_schemaless(model):
        onnx.checker.check_model(str(path), full_check=True)
        return
    copy = path.with_name(f".{path.stem}.checker.onnx")
    try:
        onnx.save(model, str(copy))
        onnx.checker.check_model(str(copy), full_check=True)
    finally:
        copy.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- graph view

class GraphView:
    """A networkx DiGraph (node name -> node name) of the data flow of a gs.Graph whose nodes
    have unique names (load_graph's front end gives them); read-only.

    Edges into Shape/Size nodes are left out: a shape computation carries no channel data, so
    a tensor whose shape is read is not thereby an ancestor of what the shape feeds."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.digraph = nx.DiGraph()
        self.by_name = {}
        for node in graph.nodes:
            if not node.name or node.name in self.by_name:
                raise PerqError(f"a {node.op} node has no name of its own ('{node.name}'); load the graph with "
                                "load_graph, which names every node")
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
