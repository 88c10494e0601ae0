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
    model = upgrade_opset(model, path)
    from .fused_ops import canonicalize_linears, proxy_for_shape_inference, restore_nodes
    canonicalize_linears(model)  # FusedMatMul / Gemm by a constant weight -> MatMul (+ Add)
    originals = proxy_for_shape_inference(model)  # onnxruntime's contrib ops have no ONNX shape inference
    try:  # shapes (with constant propagation) let the analysis check head layouts
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a help, not a requirement
        pass
    restore_nodes(model, originals)
    initializers = {i.name for i in model.graph.initializer}
    graph = gs.import_onnx(model)
    # initializers also listed as graph inputs (IR < 4 style, or overridable at run time)
    graph.overridable = {i.name for i in model.graph.input if i.name in initializers}
    graph.ir_version = model.ir_version
    graph.metadata = {p.key: p.value for p in model.metadata_props}
    map_external(graph, path.parent)
    return graph


TARGET_OPSET = 21  # what perq-onnx rewrites in: int4 Q/DQ types and the function bodies need 21
_STUB = "perq-onnx:weightless-stub"


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def upgrade_opset(model: onnx.ModelProto, path) -> onnx.ModelProto:
    """The model converted to opset TARGET_OPSET with onnx's version converter when it is older
    (optimum exports opset 14..18; Reduce* take axes as an input from 18, int4 Q/DQ need 21).

    The converter is given a weightless skeleton (initializers replaced by stubs with their name,
    type and shape, marked as external data), so neither external nor embedded weights are read
    or copied; the converted nodes, value infos and opset imports are moved back into `model`,
    whose initializers stay as they were. A conversion that fails, or that would need a weight's
    bytes, is refused naming the opset. Newer opsets are kept (the function bodies perq-onnx adds
    are written at the model's opset, see export_structure)."""
    version = default_opset(model)
    if version is None:
        raise PerqError(f"{path}: the model imports no version of the default ONNX domain")
    if version >= TARGET_OPSET:
        return model
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g = skeleton.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    stashed = _stash_schemaless(skeleton)  # onnxruntime's own default-domain ops (SimplifiedLayerNormalization)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    g.sparse_initializer.extend(model.graph.sparse_initializer)
    names = set()
    for t in model.graph.initializer:
        stub = g.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", _STUB
        names.add(t.name)
    refusal = f"{path}: cannot convert the model from opset {version} to opset {TARGET_OPSET} (perq-onnx rewrites in {TARGET_OPSET}):"
    try:
        converted = onnx.version_converter.convert_version(skeleton, TARGET_OPSET)
    except Exception as exc:  # noqa: BLE001 - the converter raises several types
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise PerqError(f"{refusal} {reason}; re-export it with --opset {TARGET_OPSET}") from None
    del skeleton
    added = []
    for t in converted.graph.initializer:
        is_stub = any(e.key == "location" and e.value == _STUB for e in t.external_data)
        if t.name in names:
            if not is_stub:
                raise PerqError(f"{refusal} the converter rewrote weight '{t.name}'; re-export it "
                                f"with --opset {TARGET_OPSET}")
        elif is_stub:
            raise PerqError(f"{refusal} the converter made '{t.name}' from a weight; re-export it "
                            f"with --opset {TARGET_OPSET}")
        else:
            added.append(t)
    if default_opset(converted) != TARGET_OPSET:
        raise PerqError(f"{refusal} the converter returned opset {default_opset(converted)}")
    _unstash(converted, stashed)
    model.graph.ClearField("node")
    model.graph.ClearField("value_info")
    model.ClearField("opset_import")
    model.graph.node.extend(converted.graph.node)
    model.graph.value_info.extend(converted.graph.value_info)
    model.opset_import.extend(converted.opset_import)
    model.graph.initializer.extend(added)
    model.ir_version = max(model.ir_version, 10)  # opset 21 is IR version 10
    return model


_STASH_DOMAIN = "perq-onnx.stash"


def _stash_schemaless(model: onnx.ModelProto) -> bool:
    """Move default-domain nodes that ONNX has no schema for (onnxruntime registers some of its
    own ops there: SimplifiedLayerNormalization) to a placeholder domain, which the version
    converter leaves alone as it leaves com.microsoft ops; whether any were moved."""
    moved = False
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, ""):
            node.domain = _STASH_DOMAIN
            moved = True
    if moved:
        model.opset_import.append(onnx.helper.make_opsetid(_STASH_DOMAIN, 1))
    return moved


def _unstash(model: onnx.ModelProto, stashed: bool) -> None:
    """Put the nodes _stash_schemaless moved back into the default domain."""
    if not stashed:
        return
    for node in model.graph.node:
        if node.domain == _STASH_DOMAIN:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != _STASH_DOMAIN]
    model.ClearField("opset_import")
    model.opset_import.extend(kept)


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
        raise PerqError(f"the graph is at opset {version} but its rewrite needs opset {min_opset}")
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


def _np_dtype(dtype) -> np.dtype:
    """A numpy dtype from what onnx-graphsurgeon reports (a numpy dtype, or the ONNX type number for
    types numpy lacks, such as bfloat16: then ml_dtypes' type)."""
    if isinstance(dtype, (int, np.integer)) or hasattr(dtype, "value") and isinstance(dtype.value, int):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(getattr(dtype, "value", dtype))))
    return np.dtype(dtype)


def constant_shape(tensor: gs.Tensor) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a constant tensor (as constant_value sees it) without reading it."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape), _np_dtype(tensor.dtype)
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Constant":
        value = node.attrs.get("value")
        return (tuple(value.shape), _np_dtype(value.dtype)) if isinstance(value, gs.Constant) else None
    if node.op == "Identity":
        return constant_shape(node.inputs[0])
    if node.op == "Transpose":
        inner = constant_shape(node.inputs[0])
        if inner is not None and len(inner[0]) == 2 and node.attrs.get("perm") in (None, [1, 0]):
            return inner[0][::-1], inner[1]
    return None
