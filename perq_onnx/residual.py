"""The residual stream: from the token embedding, through Casts, scalar multipliers (Granite) and
residual Adds, to the norms reading it.

Each residual Add's other operand must be a linear layer's output (a *writer*: o_proj, down_proj),
possibly through lossless Casts and scalar multipliers, or an output norm of one (post_norms.py).
Each RMSNorm reading the stream is matched whole (norms.py), or is onnxruntime's fused
(Skip)SimplifiedLayerNormalization (matched here: the Skip variant is a residual Add of a writer
and a norm of the sum, its output 3 the stream); linears reading the stream directly form an
identity norm (OLMo2). Anything else reading the stream is refused naming the node.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .errors import PerqError
from .fused_ops import FUSED_RMSNORMS, is_fused_rmsnorm, named_input, named_output
from .matching import as_linear, float_type, linear_producing, lossless_cast, only_reader, other
from .norms import match_rmsnorm, readers_of
from .post_norms import direct_readers_norm, normed_writer
from .records import AnalysisError, RMSNorm
from .shapes import constant_shape, producer


def find_embedding(graph: gs.Graph) -> gs.Node:
    """The token-embedding Gather: a float [vocab, hidden] table indexed by a graph input."""
    graph_inputs = {t.name for t in graph.inputs}

    def from_input(t, depth=0):
        if t.name in graph_inputs:
            return True
        p = producer(t)
        return depth < 3 and p is not None and p.op in ("Cast", "Identity") and from_input(p.inputs[0], depth + 1)

    found = []
    for node in graph.nodes:
        if node.op == "Gather" and node.attrs.get("axis", 0) == 0:
            table = constant_shape(node.inputs[0])
            if table is not None and len(table[0]) == 2 and float_type(table[1]) is not None \
                    and from_input(node.inputs[1]):
                found.append(node)
    if len(found) != 1:
        raise PerqError(
            "no decoder layers found: expected exactly one token-embedding Gather (a float "
            f"[vocab, hidden] table indexed by a graph input), found {len(found)}")
    return found[0]


def _scaled_input(node: gs.Node) -> gs.Tensor | None:
    """x when node computes x * c, c * x or x / c for a constant scalar c (Granite's
    embedding_multiplier after the token embedding, residual_multiplier on o_proj/down_proj
    before each residual Add); None otherwise. A scalar commutes with every change of basis of
    the channels, (c x) Q = c (x Q), so R1 leaves these Muls in place and stays exact."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    pairs = [(node.inputs[0], node.inputs[1])] + ([(node.inputs[1], node.inputs[0])] if node.op == "Mul" else [])
    for x, c in pairs:
        meta = constant_shape(c)
        if meta is not None and int(np.prod(meta[0])) == 1 and np.issubdtype(meta[1], np.floating) \
                and constant_shape(x) is None:
            return x
    return None


def _constant_scale(node: gs.Node, x: gs.Tensor) -> bool:
    """Whether node multiplies or divides x by a constant (any shape): what _scaled_input accepts
    when the constant is a scalar, refused otherwise (a per-channel scale does not commute with R1)."""
    return node.op in ("Mul", "Div") and len(node.inputs) == 2 and x in node.inputs \
        and (node.op == "Mul" or node.inputs[0] is x) and constant_shape(other(node, x)) is not None


def _writer(tensor: gs.Tensor, add: gs.Node, graph_float: int):
    """(linear, the Cast / scalar-Mul outputs in between) when tensor, added to the residual stream
    by `add`, is a linear layer's output, possibly through lossless Casts (optimum's float16
    exports cast down_proj's float16 output up to a float32 residual stream) and multiplications
    by a constant scalar (Granite's residual_multiplier: c (x W Q) = (c x W) Q, so folding R1
    into W's columns stays exact); None otherwise. Each tensor on the way must have no other
    reader."""
    chain, node = [tensor], producer(tensor)
    while node is not None and (lossless_cast(node, graph_float) or _scaled_input(node) is not None):
        chain.append(node.inputs[0] if lossless_cast(node, graph_float) else _scaled_input(node))
        node = producer(chain[-1])
    lin = linear_producing(chain[-1])
    if lin is None:
        return None
    readers = [add] + [producer(t) for t in chain[:-1]]
    for t, reader in zip(chain, readers):
        only_reader(t, reader, "the output of a linear layer writing to the residual stream")
    return lin, {t.name for t in chain[:-1]}


def follow_residual(graph: gs.Graph, embedding: gs.Node, graph_float: int):
    """Walk the residual stream; return its norms (in stream order; output norms have a
    ``writer``), writers and the tensors inside the norms that a rotation changes."""
    outputs = {t.name for t in graph.outputs}
    stream = [embedding.outputs[0]]
    seen = {stream[0].name}
    norms, writers, claimed, changed = [], [], set(), set()

    def push(t):
        if t.name in outputs:
            raise AnalysisError(producer(t), "the residual stream is a graph output; rotating it would change it")
        if t.name not in seen:
            seen.add(t.name)
            stream.append(t)

    i = 0
    while i < len(stream):
        t = stream[i]
        i += 1
        norm, direct = None, []
        for c in list(t.outputs):
            if c.name in claimed or c.op == "Shape":
                continue
            if c.op == "Identity" or lossless_cast(c, graph_float) or _scaled_input(c) is t:  # scalar: Granite's multiplier
                push(c.outputs[0])
            elif c.op == "Add" and (found := _writer(other(c, t), c, graph_float)) is not None:
                lin, casts = found
                writers.append(lin)
                changed |= casts
                push(c.outputs[0])
            elif c.op == "Add" and (found := normed_writer(other(c, t), c, graph_float)) is not None:
                lin, output_norm, inside = found  # a post-norm sublayer (Gemma 2/3, OLMo2)
                writers.append(lin)
                norms.append(output_norm)  # has .writer: taken out of the pre-norms by the analysis
                changed |= inside
                push(c.outputs[0])
            elif c.op == "MatMul" and c.inputs[0] is t and (lin := as_linear(c)) is not None:
                direct.append(lin)  # OLMo2: q/k/v, gate/up read the residual stream itself
            elif _constant_scale(c, t):
                raise AnalysisError(c, f"{c.op} of the residual stream by a non-scalar constant: only a scalar "
                                       "multiplier (Granite's) commutes with the residual rotation")
            elif c.op in ("Pow", "Mul", "Div"):
                if norm is None:  # its other nodes reading t are claimed and skipped
                    norm, inside = match_rmsnorm(t, graph_float)
                    norms.append(norm)
                    claimed |= norm.nodes
                    changed |= inside
                if c.name not in norm.nodes:
                    raise AnalysisError(c, "reads the residual stream but is not part of an RMSNorm")
            elif is_fused_rmsnorm(c):  # onnxruntime's (Skip)SimplifiedLayerNormalization
                fused, inside, found, passed_on = match_fused_rmsnorm(c, t, graph_float)
                norms.append(fused)
                claimed.add(c.name)
                changed |= inside
                if found is not None:  # Skip: the residual Add of a writer, fused in
                    writers.append(found[0])
                    changed |= found[1]
                if passed_on is not None:
                    push(passed_on)
            else:
                raise AnalysisError(c, f"{c.op} reads the residual stream; only residual Adds of a linear "
                                       "layer's output, RMSNorms and Casts are supported")
        if direct and norm is not None:
            raise AnalysisError(direct[0].name, f"reads residual tensor '{t.name}' directly next to an RMSNorm of it")
        if direct:
            norms.append(direct_readers_norm(t, direct))
    return norms, writers, changed


def match_fused_rmsnorm(node: gs.Node, x: gs.Tensor, graph_float: int):
    """(RMSNorm, tensors the rewrite changes, (writer Linear, cast tensors) or None, the residual
    tensor it passes on or None) for onnxruntime's fused RMSNorm `node` reading residual tensor x
    (fused_ops.py says how each op is read)."""
    skip = node.op == "SkipSimplifiedLayerNormalization"
    found, passed_on = None, None
    if skip:
        operands = list(node.inputs[:2])
        if sum(t is x for t in operands) != 1:
            raise AnalysisError(node, "adds the residual stream to itself; expected the stream plus a linear layer's output")
        if named_input(node, 3) is not None:
            raise AnalysisError(node, "SkipSimplifiedLayerNormalization with a bias input is not supported (the bias "
                                "is added to the residual stream in its original basis)")
        other_operand = operands[1] if operands[0] is x else operands[0]
        found = _writer(other_operand, node, graph_float)
        if found is None:
            raise AnalysisError(node, "SkipSimplifiedLayerNormalization adds to the residual stream something that is "
                                "not a linear layer's output (o_proj / down_proj)")
        passed_on = named_output(node, 3)
        side = (1, 2)
    else:
        if node.inputs[0] is not x:
            raise AnalysisError(node, "reads the residual stream as its scale, not as the normalized input")
        axis = node.attrs.get("axis", -1)
        rank = len(x.shape) if x.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            raise AnalysisError(node, f"SimplifiedLayerNormalization over axis {axis}; only the last (hidden) axis "
                                "is supported")
        side = (1,)
    gamma_index = FUSED_RMSNORMS[node.op]
    meta = constant_shape(node.inputs[gamma_index]) if len(node.inputs) > gamma_index else None
    if meta is None or len(meta[0]) != 1:
        raise AnalysisError(node, f"{node.op} whose scale is not a constant vector; its gamma cannot be folded")
    for i in side:
        if _used(named_output(node, i)):
            raise AnalysisError(node, f"output {i} (mean / inverse RMS) of {node.op} is read; not supported")
    out = node.outputs[0]
    norm = RMSNorm(passed_on.name if passed_on is not None else x.name, out.name, node.name,
                   frozenset({node.name}), readers_of(out, node.name))
    return norm, {out.name}, found, passed_on


def _used(tensor) -> bool:
    return tensor is not None and tensor.name != "" and any(c.op != "Shape" for c in tensor.outputs)
