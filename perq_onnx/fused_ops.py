"""Graphs that onnxruntime's own tooling produced: its EXTENDED-level optimized graph
(``SessionOptions.optimized_model_filepath``), ``onnxruntime.transformers.optimizer`` and
optimum's ``--optimize O1..O4`` (which calls it).

What they contain for a Llama-family decoder, and how perq-onnx reads it:

* ``SimplifiedLayerNormalization(x, scale)`` (onnxruntime registers it in the default domain, and in
  com.microsoft) is an RMSNorm: x / sqrt(mean(x^2) + eps) * scale over the last axis. Its gamma is
  folded into the readers and the scale input set to ones; the op stays (epsilon unchanged:
  rms(x Q) = rms(x) for orthogonal Q, so the normalization commutes with R1).
* ``SkipSimplifiedLayerNormalization(input, skip, gamma)`` (com.microsoft) is a residual Add and an
  RMSNorm of the sum: one of input/skip is the residual stream, the other a linear layer writing
  to it (o_proj, down_proj); output 0 is the normalized sum, output 3 the sum itself -- the residual
  stream continues there. Both operands are rotated by R1 (the stream and the writer's output
  columns), so the sum is too.
* ``QuickGelu`` / ``FastGelu`` (com.microsoft, fused SiLU x*sigmoid(alpha*x) and tanh-Gelu) are
  element-wise: the MLP permutation commutes with them.
* ``FusedMatMul(x, W, transB=1)`` and ``Gemm(x, W, C, transB)`` by a constant weight are linear
  layers: the loader rewrites them to ``MatMul(x, Transpose(W))`` (+ ``Add(C)``) before the
  analysis, which reads the weight as [in, out] through the Transpose; a fold writes the folded
  [in, out] weight to the MatMul, so folds land on the right axis.
* ``RotaryEmbedding`` on q/k needs nothing: R2 rotates only the values, and q/k_proj outputs are
  unchanged by R1.
* ``GroupQueryAttention`` / ``MultiHeadAttention`` (com.microsoft) are attention blocks whose
  value input is the v_proj output (input 2) and whose output 0 reaches o_proj: softmax(q k^T) @ V
  mixes tokens, never channels, so R2 (v_proj columns, o_proj rows) commutes with them, and the
  present value output (the cache) is stored in the rotated basis like optimum's present.*.value.

Refused, one line naming the node: a fused norm whose scale is not a constant vector, whose axis
is not the last one, whose inverse-RMS/mean outputs are read, or (Skip) with a bias input;
attention with packed QKV, an attention bias on the values, or no separate value input.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph import constant_shape, constant_value, producer

DEFAULT_DOMAINS = ("", "ai.onnx")
CONTRIB = "com.microsoft"

# op -> index of its gamma (scale) input
FUSED_RMSNORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}
# element-wise contrib ops the MLP permutation commutes with (all nonlinear)
CONTRIB_ELEMENTWISE = {"QuickGelu", "FastGelu"}
# attention ops: index of the value input, of the present value output, and of the past value input
FUSED_ATTENTION = {"GroupQueryAttention": (2, 2, 4), "MultiHeadAttention": (2, 2, 7)}


def _error(node, reason):
    from .analysis import AnalysisError
    return AnalysisError(node, reason)


def _used(tensor) -> bool:
    return tensor is not None and tensor.name != "" and any(c.op != "Shape" for c in tensor.outputs)


def _output(node: gs.Node, index: int):
    return node.outputs[index] if len(node.outputs) > index and node.outputs[index].name else None


def _input(node: gs.Node, index: int):
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def is_fused_rmsnorm(node: gs.Node) -> bool:
    return node.op in FUSED_RMSNORMS and node.domain in DEFAULT_DOMAINS + (CONTRIB,)


def fused_gamma_input(node: gs.Node) -> int | None:
    """The index of a fused RMSNorm's scale input (None for any other node)."""
    return FUSED_RMSNORMS[node.op] if is_fused_rmsnorm(node) else None


def match_fused_rmsnorm(node: gs.Node, x: gs.Tensor, writer, readers_of):
    """(RMSNorm, tensors the rewrite changes, (writer Linear, cast tensors) or None, the residual
    tensor it passes on or None) for a fused RMSNorm `node` reading residual tensor x.
    `writer(tensor, node)` and `readers_of(tensor, name)` are the analysis' own matchers."""
    from .analysis import RMSNorm

    skip = node.op == "SkipSimplifiedLayerNormalization"
    found, passed_on = None, None
    if skip:
        operands = [t for t in node.inputs[:2]]
        if sum(t is x for t in operands) != 1:
            raise _error(node, "adds the residual stream to itself; expected the stream plus a linear layer's output")
        if _input(node, 3) is not None:
            raise _error(node, "SkipSimplifiedLayerNormalization with a bias input is not supported (the bias "
                               "is added to the residual stream in its original basis)")
        other = operands[1] if operands[0] is x else operands[0]
        found = writer(other, node)
        if found is None:
            raise _error(node, "SkipSimplifiedLayerNormalization adds to the residual stream something that is "
                               "not a linear layer's output (o_proj / down_proj)")
        passed_on = _output(node, 3)
        side = (1, 2)
    else:
        if node.inputs[0] is not x:
            raise _error(node, "reads the residual stream as its scale, not as the normalized input")
        axis = node.attrs.get("axis", -1)
        rank = len(x.shape) if x.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            raise _error(node, f"SimplifiedLayerNormalization over axis {axis}; only the last (hidden) axis "
                               "is supported")
        side = (1,)
    gamma_index = FUSED_RMSNORMS[node.op]
    meta = constant_shape(node.inputs[gamma_index]) if len(node.inputs) > gamma_index else None
    if meta is None or len(meta[0]) != 1:
        raise _error(node, f"{node.op} whose scale is not a constant vector; its gamma cannot be folded")
    for i in side:
        if _used(_output(node, i)):
            raise _error(node, f"output {i} (mean / inverse RMS) of {node.op} is read; not supported")
    out = node.outputs[0]
    norm = RMSNorm(passed_on.name if passed_on is not None else x.name, out.name, node.name,
                   frozenset({node.name}), readers_of(out, node.name))
    return norm, {out.name}, found, passed_on


# ----------------------------------------------------------------------------- attention

def is_fused_attention(node: gs.Node) -> bool:
    return node.op in FUSED_ATTENTION and node.domain == CONTRIB


def value_input(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether tensor is the value input of a fused attention node (q/k inputs are not; they are
    left to R1 alone). Refuses the forms whose values R2 cannot follow."""
    index, _, _ = FUSED_ATTENTION[node.op]
    if _input(node, index) is None or _input(node, 1) is None:
        raise _error(node, f"{node.op} with packed QKV/KV (no separate value input); R2 needs one")
    if _input(node, index) is not tensor:
        return False
    if node.op == "MultiHeadAttention" and _input(node, 3) is not None:
        raise _error(node, "MultiHeadAttention with a bias input adds a bias to the values in their "
                           "original basis; not supported")
    return True


def attention_head_dim(node: gs.Node, v_features: int) -> int | None:
    """The head size of a fused attention node, from its head-count attributes."""
    heads = node.attrs.get("kv_num_heads") if node.op == "GroupQueryAttention" else node.attrs.get("num_heads")
    if not heads or v_features % int(heads):
        return None
    return v_features // int(heads)


def present_value(node: gs.Node):
    """The present value output (the cache, stored in the rotated basis), if any."""
    _, index, _ = FUSED_ATTENTION[node.op]
    return _output(node, index)


# ------------------------------------------------------------------------ loader rewrites

def canonicalize_linears(model) -> int:
    """Rewrite, in place in the ModelProto (before shape inference, so shapes propagate),
    FusedMatMul(x, W, transB) / Gemm(x, W, C, transB) by a constant 2-D float initializer W to
    MatMul(x, W or Transpose(W)) (+ Add(C)): the same function (only alpha = beta = 1, no transA,
    no batch transposes), in the form the analysis reads as a Linear. Returns how many."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        fused = node.op_type == "FusedMatMul" and node.domain == CONTRIB
        gemm = node.op_type == "Gemm" and node.domain in DEFAULT_DOMAINS
        w = inits.get(node.input[1]) if (fused or gemm) and len(node.input) > 1 else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if w is None or len(w.dims) != 2 or w.data_type not in floats \
                or float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0 \
                or attrs.get("transA", 0) or attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            weight = f"{node.name or w.name}/weight_transposed"
            nodes.append(onnx.helper.make_node("Transpose", [node.input[1]], [weight], perm=[1, 0],
                                               name=f"{node.name or w.name}/WeightTranspose"))
        bias = node.input[2] if gemm and len(node.input) > 2 and node.input[2] else None
        out = node.output[0]
        matmul = onnx.helper.make_node("MatMul", [node.input[0], weight],
                                       [f"{out}/matmul_output" if bias else out], name=node.name)
        nodes.append(matmul)
        if bias:
            nodes.append(onnx.helper.make_node("Add", [matmul.output[0], bias], [out], name=f"{node.name}/BiasAdd"))
        rewritten += 1
    if rewritten:
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
    return rewritten


def value_cache_tensor(tensor: gs.Tensor) -> bool:
    """Whether tensor is the present value output of a fused attention node."""
    node = producer(tensor)
    return node is not None and is_fused_attention(node) and present_value(node) is tensor


# --------------------------------------------------------------------- shape inference aid

# contrib op -> {output index: (proxy op, input indices)} with the same output shape and type
_SHAPE_PROXIES = {
    "SimplifiedLayerNormalization": {0: ("Identity", (0,))},
    "SkipSimplifiedLayerNormalization": {0: ("Add", (0, 1)), 3: ("Add", (0, 1))},
    "QuickGelu": {0: ("Identity", (0,))},
    "FastGelu": {0: ("Identity", (0,))},
    "RotaryEmbedding": {0: ("Identity", (0,))},
    "GroupQueryAttention": {0: ("Identity", (0,))},
    "MultiHeadAttention": {0: ("Identity", (0,))},
}


def proxy_for_shape_inference(model):
    """Replace, in place, the onnxruntime ops ONNX shape inference does not know (its fused norms,
    activations, rotary and attention ops) by standard ops that give their outputs the same shape
    and type, so that shapes propagate past them; returns the original node list for
    restore_nodes (None when nothing was replaced). Attention proxies apply only with separate
    q/k/v inputs, where output 0 has the query's shape."""
    import onnx

    originals = [onnx.NodeProto() for _ in model.graph.node]
    replaced, nodes = False, []
    for original, node in zip(originals, model.graph.node):
        original.CopyFrom(node)
        proxies = _SHAPE_PROXIES.get(node.op_type)
        known = node.domain in DEFAULT_DOMAINS + (CONTRIB,) and not onnx.defs.has(node.op_type, node.domain or "")
        packed = node.op_type in FUSED_ATTENTION and (len(node.input) < 3 or not node.input[1] or not node.input[2])
        if proxies is None or not known or packed:
            nodes.append(original)
            continue
        for index, (op, inputs) in proxies.items():
            if index < len(node.output) and node.output[index] and all(i < len(node.input) and node.input[i]
                                                                        for i in inputs):
                nodes.append(onnx.helper.make_node(op, [node.input[i] for i in inputs], [node.output[index]],
                                                   name=f"{node.name}/shape_proxy_{index}"))
                replaced = True
    if not replaced:
        return None
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return originals


def restore_nodes(model, originals) -> None:
    """Undo proxy_for_shape_inference (the inferred value_info stays)."""
    if originals is None:
        return
    model.graph.ClearField("node")
    model.graph.node.extend(originals)


# ------------------------------------------------------------- shape tensors, evaluated

def shape_element(tensor: gs.Tensor, index: int, depth: int = 12) -> int | None:
    """Element `index` of a 1-D shape tensor computed in the graph, from the static dims it is
    made of: Shape -> Gather / Split / Slice / Squeeze / Unsqueeze / Concat / Cast, and Mul / Div /
    Add / Sub by constants. onnxruntime rewrites optimum's Shape -> Gather -> Unsqueeze -> Concat
    into Split + Squeeze, which ONNX data propagation does not follow; None when unknown."""
    value = constant_value(tensor)
    if value is not None:
        flat = value.reshape(-1)
        return int(flat[index]) if -flat.size <= index < flat.size else None
    node = producer(tensor)
    if node is None or depth == 0:
        return None
    size = _length(tensor)
    if index < 0:
        if size is None:
            return None
        index += size
    if index < 0:
        return None
    op = node.op
    if op == "Shape":
        shape = node.inputs[0].shape
        if shape is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(shape))
        dims = list(shape)[start:end]
        dim = dims[index] if index < len(dims) else None
        return dim if isinstance(dim, int) and dim >= 0 else None
    if op == "Gather" and node.attrs.get("axis", 0) == 0:
        idx = constant_value(node.inputs[1])
        if idx is None:
            return None
        flat = idx.reshape(-1)
        return shape_element(node.inputs[0], int(flat[index]), depth - 1) if index < flat.size else None
    if op in ("Squeeze", "Unsqueeze", "Cast", "Identity"):
        return shape_element(node.inputs[0], index, depth - 1)
    if op == "Split" and node.attrs.get("axis", 0) == 0:
        k = next(i for i, o in enumerate(node.outputs) if o is tensor)
        sizes = [_length(o) for o in node.outputs[:k]]
        if any(s is None for s in sizes):
            return None
        return shape_element(node.inputs[0], sum(sizes) + index, depth - 1)
    if op == "Concat":
        offset = index
        for t in node.inputs:
            n = _length(t)
            if n is None:
                return None
            if offset < n:
                return shape_element(t, offset, depth - 1)
            offset -= n
        return None
    if op in ("Mul", "Div", "Add", "Sub") and len(node.inputs) == 2:
        a = shape_element(node.inputs[0], index if _length(node.inputs[0]) != 1 else 0, depth - 1)
        b = shape_element(node.inputs[1], index if _length(node.inputs[1]) != 1 else 0, depth - 1)
        if a is None or b is None:
            return None
        return {"Mul": a * b, "Add": a + b, "Sub": a - b, "Div": a // b if b else None}[op]
    return None


def _length(tensor: gs.Tensor) -> int | None:
    """The number of elements of a 0-D/1-D tensor, from its static shape, value or producer."""
    value = constant_value(tensor)
    if value is not None:
        return int(value.size)
    shape = tensor.shape
    if shape is not None and all(isinstance(d, int) for d in shape) and len(shape) <= 1:
        return int(np.prod(shape)) if shape else 1
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Unsqueeze" or node.op == "Squeeze":
        inner = _length(node.inputs[0])
        return inner if inner == 1 else None
    if node.op == "Concat":
        sizes = [_length(t) for t in node.inputs]
        return None if any(s is None for s in sizes) else sum(sizes)
    if node.op == "Gather":
        idx = constant_value(node.inputs[1])
        return None if idx is None else int(idx.size)
    if node.op == "Shape":
        shape = node.inputs[0].shape
        if shape is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(shape))
        return len(list(shape)[start:end])
    if node.op == "Split":
        splits = constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
        k = next(i for i, o in enumerate(node.outputs) if o is tensor)
        return int(splits.reshape(-1)[k]) if splits is not None else None
    if node.op in ("Cast", "Identity", "Mul", "Div", "Add", "Sub"):
        sizes = [_length(t) for t in node.inputs]
        return None if any(s is None for s in sizes) else max(sizes)
    return None


def reshape_last_dim(shape_tensor: gs.Tensor) -> int | None:
    """The last dimension a Reshape's shape input asks for, when shape_element finds a positive one."""
    value = shape_element(shape_tensor, -1)
    return value if value is not None and value > 0 else None


def check_model_file(path) -> None:
    """onnx.checker (full check) of a written model; onnxruntime's own default-domain ops
    (SimplifiedLayerNormalization), which ONNX has no schema for, are checked as ops of a
    placeholder domain (as com.microsoft ops are), in a sibling copy without weights."""
    import pathlib

    import onnx

    from .graph import _stash_schemaless

    path = pathlib.Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if not _stash_schemaless(model):
        onnx.checker.check_model(str(path), full_check=True)
        return
    copy = path.with_name(f".{path.stem}.checker.onnx")
    try:
        onnx.save(model, str(copy))
        onnx.checker.check_model(str(copy), full_check=True)
    finally:
        copy.unlink(missing_ok=True)
