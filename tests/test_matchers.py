"""Each matcher on its own, on tiny graphs built here with onnx.helper (as tests/handmade.py builds
its decoder): the decomposed and fused RMSNorms, fused-projection slices, the attention forms
(softmax @ V, onnxruntime's MultiHeadAttention), the shape evaluator and the front end's names."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from perq_onnx.errors import PerqError
from perq_onnx.frontend import canonicalize_linears, infer_shapes, name_nodes
from perq_onnx.fused_slices import split_fused
from perq_onnx.graph import GraphView
from perq_onnx.heads import match_attention
from perq_onnx.matching import as_linear
from perq_onnx.norms import match_rmsnorm
from perq_onnx.records import AnalysisError
from perq_onnx.residual import match_fused_rmsnorm
from perq_onnx.shapes import shape_element

FLOAT = TensorProto.FLOAT
HIDDEN = 8


class Builder:
    """Nodes and constants of a small graph reading x: float [1, 4, HIDDEN]."""

    def __init__(self):
        self.nodes, self.inits = [], []
        self.rng = np.random.default_rng(0)

    def const(self, name, value, dtype=np.float32):
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, name, outputs=None, domain=None, **attrs):
        self.nodes.append(helper.make_node(op_type, inputs, outputs or [name], name=name, domain=domain, **attrs))
        return name

    def linear(self, x, name, cols):
        return self.op("MatMul", [x, self.const(f"{name}.w", self.rng.standard_normal((HIDDEN, cols)))], name)

    def graph(self, outputs) -> gs.Graph:
        g = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [1, 4, HIDDEN])],
                              [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs], self.inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        graph = gs.import_onnx(infer_shapes(model))
        name_nodes(graph)
        return graph


def tensor(graph: gs.Graph, name: str) -> gs.Tensor:
    return graph.tensors()[name]


def node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def decomposed_rmsnorm(b: Builder, axes=(-1,)):
    b.const("two", 2.0), b.const("one", 1.0), b.const("eps", 1e-6)
    mean = b.op("ReduceMean", [b.op("Pow", ["x", "two"], "pow"), b.const("axes", list(axes), np.int64)], "mean")
    rms = b.op("Sqrt", [b.op("Add", [mean, "eps"], "add_eps")], "sqrt")
    normalized = b.op("Mul", ["x", b.op("Div", ["one", rms], "inv")], "normalize")
    return b.op("Mul", [normalized, b.const("g", np.linspace(0.5, 1.5, HIDDEN))], "gamma")


# ------------------------------------------------------------------------------- RMSNorms

def test_decomposed_rmsnorm_and_its_readers():
    b = Builder()
    h = decomposed_rmsnorm(b)
    b.linear(h, "q", HIDDEN), b.linear(h, "k", 4)
    graph = b.graph(["q", "k"])
    norm, changed = match_rmsnorm(tensor(graph, "x"), TensorProto.FLOAT)
    assert (norm.input, norm.normalized, norm.gamma) == ("x", "normalize", "gamma")
    assert norm.nodes == {"pow", "mean", "add_eps", "sqrt", "inv", "normalize", "gamma"}
    assert [(r.name, r.shape) for r in norm.readers] == [("q", (HIDDEN, HIDDEN)), ("k", (HIDDEN, 4))]
    assert changed == {"normalize", "gamma"}


def test_rmsnorm_over_another_axis_is_refused():
    b = Builder()
    b.linear(decomposed_rmsnorm(b, axes=(1,)), "q", HIDDEN)
    graph = b.graph(["q"])
    with pytest.raises(AnalysisError, match="node 'mean'.*only the last"):
        match_rmsnorm(tensor(graph, "x"), TensorProto.FLOAT)


def test_rmsnorm_read_by_a_non_linear_is_refused():
    b = Builder()
    b.op("Relu", [decomposed_rmsnorm(b)], "relu")
    graph = b.graph(["relu"])
    with pytest.raises(AnalysisError, match="node 'relu'.*not a linear layer"):
        match_rmsnorm(tensor(graph, "x"), TensorProto.FLOAT)


# ------------------------------------------------------------------------- fused RMSNorms

def test_simplified_layer_normalization():
    b = Builder()
    b.op("SimplifiedLayerNormalization", ["x", b.const("scale", np.ones(HIDDEN))], "sln", epsilon=1e-6, axis=-1)
    b.linear("sln", "q", HIDDEN)
    graph = b.graph(["q"])
    norm, changed, writer, passed_on = match_fused_rmsnorm(node(graph, "sln"), tensor(graph, "x"), FLOAT)
    assert (norm.input, norm.normalized, norm.gamma, norm.nodes) == ("x", "sln", "sln", {"sln"})
    assert [r.name for r in norm.readers] == ["q"] and changed == {"sln"}
    assert writer is None and passed_on is None


def skip_norm(with_bias: bool) -> gs.Graph:
    b = Builder()
    b.linear("x", "o", HIDDEN)  # the writer added to the stream
    inputs = ["x", "o", b.const("gamma", np.ones(HIDDEN))] + ([b.const("bias", np.zeros(HIDDEN))] if with_bias else [])
    b.op("SkipSimplifiedLayerNormalization", inputs, "skip", outputs=["normed", "", "", "sum"], domain="com.microsoft",
         epsilon=1e-6)
    b.linear("normed", "q", HIDDEN)
    return b.graph(["q", "sum"])


def test_skip_simplified_layer_normalization():
    graph = skip_norm(with_bias=False)
    norm, _, (writer, casts), passed_on = match_fused_rmsnorm(node(graph, "skip"), tensor(graph, "x"), FLOAT)
    assert (norm.input, norm.normalized, norm.gamma) == ("sum", "normed", "skip")
    assert writer.name == "o" and casts == set() and passed_on.name == "sum"


def test_skip_norm_with_bias_is_refused():
    graph = skip_norm(with_bias=True)
    with pytest.raises(AnalysisError, match="node 'skip'.*bias input"):
        match_fused_rmsnorm(node(graph, "skip"), tensor(graph, "x"), FLOAT)


# -------------------------------------------------------------------------- fused slices

def fused_projection(bounds) -> tuple[gs.Graph, GraphView]:
    b = Builder()
    b.linear("x", "qkv", 12)
    b.const("axis", [-1], np.int64)
    for i, (start, stop) in enumerate(bounds):
        b.op("Slice", ["qkv", b.const(f"s{i}", [start], np.int64), b.const(f"e{i}", [stop], np.int64), "axis"],
             f"slice{i}")
    graph = b.graph([f"slice{i}" for i in range(len(bounds))])
    return graph, GraphView(graph)


def test_fused_projection_slices():
    graph, view = fused_projection([(0, 4), (4, 8), (8, 12)])
    q, k, v = split_fused(view, as_linear(node(graph, "qkv")), 3, "qkv")
    assert [(p.name, p.output, p.columns, p.out_features) for p in (q, k, v)] == [
        ("qkv", "slice0", (0, 4), 4), ("qkv", "slice1", (4, 8), 4), ("qkv", "slice2", (8, 12), 4)]
    assert v.fused.shape == (HIDDEN, 12)


def test_overlapping_slices_are_refused():
    graph, view = fused_projection([(0, 6), (4, 8), (8, 12)])
    with pytest.raises(AnalysisError, match="disjoint, contiguous"):
        split_fused(view, as_linear(node(graph, "qkv")), 3, "qkv")


def test_chunk_bounds_computed_from_the_shape():
    """optimum's chunk(2): the halves' bounds come from Shape -> Gather(-1) -> Add 1 -> Div 2."""
    b = Builder()
    b.linear("x", "gate_up", 12)
    b.const("last", -1, np.int64), b.const("i1", 1, np.int64), b.const("i2", 2, np.int64)
    b.const("zero", [0], np.int64), b.const("end", [np.iinfo(np.int64).max], np.int64), b.const("axis", [-1], np.int64)
    width = b.op("Gather", [b.op("Shape", ["gate_up"], "shape"), "last"], "width", axis=0)
    half = b.op("Div", [b.op("Add", [width, "i1"], "plus1"), "i2"], "half")
    half = b.op("Unsqueeze", [half, "zero"], "half1")
    b.op("Slice", ["gate_up", "zero", half, "axis"], "gate")
    b.op("Slice", ["gate_up", half, "end", "axis"], "up")
    graph = b.graph(["gate", "up"])
    gate, up = split_fused(GraphView(graph), as_linear(node(graph, "gate_up")), 2, "gate_up")
    assert (gate.columns, up.columns) == ((0, 6), (6, 12))


# --------------------------------------------------------------------------- attention

def attention(kind: str) -> tuple[gs.Graph, GraphView, tuple]:
    b = Builder()
    for name in "qkv":
        b.linear("x", name, HIDDEN)
    if kind == "softmax":
        b.const("heads", [0, 0, 2, 4], np.int64), b.const("merged", [0, 0, HIDDEN], np.int64)
        q = b.op("Transpose", [b.op("Reshape", ["q", "heads"], "q_r")], "q_t", perm=[0, 2, 1, 3])
        k = b.op("Transpose", [b.op("Reshape", ["k", "heads"], "k_r")], "k_t", perm=[0, 2, 3, 1])
        v = b.op("Transpose", [b.op("Reshape", ["v", "heads"], "v_r")], "v_t", perm=[0, 2, 1, 3])
        probs = b.op("Softmax", [b.op("MatMul", [q, k], "qk")], "probs", axis=-1)
        ctx = b.op("Transpose", [b.op("MatMul", [probs, v], "pv")], "ctx_t", perm=[0, 2, 1, 3])
        ctx = b.op("Reshape", [ctx, "merged"], "merge")
    elif kind == "MultiHeadAttention":
        ctx = b.op(kind, ["q", "k", "v"], "mha", domain="com.microsoft", num_heads=2)
    else:  # packed QKV: one input
        ctx = b.op("MultiHeadAttention", ["q"], "mha", domain="com.microsoft", num_heads=2)
    b.linear(ctx, "o", HIDDEN)
    graph = b.graph(["o", "k"] if kind == "packed" else ["o"])
    readers = tuple(as_linear(node(graph, n)) for n in "qkv")
    return graph, GraphView(graph), readers


@pytest.mark.parametrize("kind", ["softmax", "MultiHeadAttention"])
def test_attention_forms(kind):
    graph, view, readers = attention(kind)
    q, k, v, o, head_dim, path = match_attention(view, 0, readers, [as_linear(node(graph, "o"))], FLOAT)
    assert (q.name, k.name, v.name, o.name, head_dim) == ("q", "k", "v", "o", 4)
    assert "v" in path and ("pv" in path if kind == "softmax" else "mha" in path)


def test_packed_attention_is_refused():
    graph, view, readers = attention("packed")
    with pytest.raises(AnalysisError, match="node 'mha'.*packed QKV"):
        match_attention(view, 0, readers, [as_linear(node(graph, "o"))], FLOAT)


# ------------------------------------------------------------------ shapes and front end

def test_shape_element_through_split():
    """onnxruntime's Split-based shape arithmetic: Shape -> Split -> Squeeze -> Concat."""
    b = Builder()
    b.const("ones", [1, 1, 1], np.int64), b.const("heads", [2, 4], np.int64)
    b.op("Split", [b.op("Shape", ["x"], "shape"), "ones"], "split", outputs=["d0", "d1", "d2"], axis=0)
    b.op("Concat", ["d0", "d1", "heads"], "target", axis=0)
    b.op("Reshape", ["x", "target"], "r")
    graph = b.graph(["r"])
    target = tensor(graph, "target")
    assert [shape_element(target, i) for i in range(4)] == [1, 4, 2, 4] and shape_element(target, -1) == 4


def test_front_end_names_are_unique():
    b = Builder()
    b.op("Relu", ["x"], "", outputs=["a"])
    b.op("Relu", ["a"], "Relu_0", outputs=["b"])       # the name the first would get
    b.op("Relu", ["b"], "dup", outputs=["c"])
    b.op("Relu", ["c"], "dup", outputs=["d"])          # a duplicate
    graph = b.graph(["d"])
    assert [n.name for n in graph.nodes] == ["Relu_0_1", "Relu_0", "dup", "Relu_3"]
    GraphView(graph)  # accepted: unique names
    graph.nodes[0].name = ""
    with pytest.raises(PerqError, match="no name"):
        GraphView(graph)


def test_fused_matmul_becomes_matmul_with_fresh_names():
    b = Builder()
    w = b.const("w", np.ones((4, HIDDEN)))
    b.op("FusedMatMul", ["x", w], "fm", domain="com.microsoft", transB=1)
    b.op("Identity", ["x"], "fm/WeightTranspose", outputs=["fm/weight_transposed"])  # taken names
    g = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [1, 4, HIDDEN])],
                          [helper.make_tensor_value_info(o, FLOAT, None) for o in ("fm", "fm/weight_transposed")],
                          b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    assert canonicalize_linears(model) == 1
    nodes = [(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node]
    assert nodes[:2] == [("Transpose", "fm/WeightTranspose_1", ["w"], ["fm/weight_transposed_1"]),
                         ("MatMul", "fm", ["x", "fm/weight_transposed_1"], ["fm"])]
    produced = [t for n in model.graph.node for t in n.output]
    assert len(produced) == len(set(produced))


# ------------------------------------------------------------------------- whole analysis

def test_refusals_are_collected_per_layer(tmp_path):
    """analysis.refusals goes on past a layer's refusal: one per layer whose MLP has a Softmax."""
    import onnx

    from handmade import LAYERS, build_decoder
    from perq_onnx.analysis import analyze, refusals
    from perq_onnx.graph import load_graph

    path = build_decoder(tmp_path / "handmade.onnx")
    assert refusals(load_graph(path)) == [] and len(analyze(load_graph(path)).layers) == LAYERS
    model = onnx.load(str(path))
    for n in model.graph.node:
        if n.name.endswith(".mlp/sigmoid"):
            n.op_type = "Softmax"
    onnx.save(model, str(tmp_path / "bad.onnx"))
    found = refusals(load_graph(tmp_path / "bad.onnx"))
    assert [(e.node, "not element-wise" in e.reason) for e in found] == \
        [(f"layers.{i}.mlp/sigmoid", True) for i in range(LAYERS)]
    with pytest.raises(AnalysisError, match="layers.0.mlp/sigmoid"):
        analyze(load_graph(tmp_path / "bad.onnx"))
