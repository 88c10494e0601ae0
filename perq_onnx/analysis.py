"""Structural recognition of a decoder LLM graph and its permutation-equivariant regions.

Matching follows data flow, not node names: the token-embedding Gather starts the residual
stream; the stream is followed through Casts and residual Adds (whose other operand must be a
linear layer: a *writer*); each RMSNorm reading it (Pow/Mul -> ReduceMean -> Add eps -> Sqrt ->
Div/Reciprocal -> Mul, optional Cast, gamma Mul) is matched whole, and the MatMuls reading a
norm's output are the *readers*. Norms come in (attention, MLP) pairs per layer plus a final norm
read by lm_head. Inside a layer:

* MLP: the two MLP readers (gate, up) must reach one linear (down_proj) through element-wise ops
  only (SiLU = Sigmoid * x, the gating Mul) -- the region where a channel permutation commutes.
* Heads: v_proj is the attention reader that feeds the value input of the probabilities @ V
  MatMul without being an ancestor of the probabilities; from there only layout ops (Reshape,
  Transpose, Concat with past values, Unsqueeze/Expand for GQA) reach o_proj -- a per-head
  rotation of v's columns commutes with all of them.

Anything else reading the residual stream, or an unexpected op inside a region, is refused with
the node's name and the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .errors import PerqError
from .graph import GraphView, constant_value, producer, set_constant_input

ELEMENTWISE = {"Sigmoid", "Tanh", "Erf", "Relu", "Softplus", "Gelu", "Neg", "Exp", "Cast", "Identity",
               "HardSigmoid", "HardSwish", "Elu", "Selu", "LeakyRelu", "Mish", "Mul", "Add", "Sub", "Div", "Pow"}
NONLINEAR = {"Sigmoid", "Tanh", "Erf", "Relu", "Softplus", "Gelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
             "LeakyRelu", "Mish"}
HEAD_LAYOUT = {"Reshape", "Transpose", "Concat", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Add"}


class AnalysisError(PerqError):
    """A part of the graph perq-onnx does not understand; carries the node name."""

    def __init__(self, node, reason: str):
        self.node = node.name if isinstance(node, gs.Node) else str(node)
        self.reason = reason
        super().__init__(f"node '{self.node}': {reason}")


# ------------------------------------------------------------------------------ building blocks

@dataclass(eq=False)
class Linear:
    """A MatMul by a constant [in, out] weight, with an optional bias Add after it."""
    node: gs.Node
    bias_node: gs.Node | None = None
    bias_index: int = 1

    @property
    def name(self) -> str:
        return self.node.name

    def weight(self) -> np.ndarray:
        return constant_value(self.node.inputs[1])

    def set_weight(self, value: np.ndarray) -> None:
        set_constant_input(self.node, 1, value.astype(np.float32), self.node.name + ".weight")

    def bias(self) -> np.ndarray | None:
        return None if self.bias_node is None else constant_value(self.bias_node.inputs[self.bias_index])

    def set_bias(self, value: np.ndarray) -> None:
        set_constant_input(self.bias_node, self.bias_index, value.astype(np.float32), self.node.name + ".bias")

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def output(self) -> gs.Tensor:
        return (self.bias_node or self.node).outputs[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight().shape)


@dataclass(eq=False)
class RMSNorm:
    input: gs.Tensor
    normalized: gs.Tensor          # x / rms(x), before gamma
    gamma_node: gs.Node | None     # Mul(gamma, normalized); removed by the fold pass
    nodes: set = field(default_factory=set)  # node names
    readers: list[Linear] = field(default_factory=list)

    @property
    def output(self) -> gs.Tensor:
        return self.gamma_node.outputs[0] if self.gamma_node is not None else self.normalized

    def gamma(self) -> np.ndarray | None:
        if self.gamma_node is None:
            return None
        return next(v for v in (constant_value(t) for t in self.gamma_node.inputs) if v is not None)

    @property
    def name(self) -> str:
        return self.gamma_node.name if self.gamma_node is not None else self.normalized.name


@dataclass(eq=False)
class DecoderLayer:
    index: int
    input_norm: RMSNorm
    post_norm: RMSNorm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    head_dim: int

    @property
    def num_heads(self) -> int:
        return self.o.shape[0] // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.v.shape[1] // self.head_dim


@dataclass
class Region:
    """A set of channels that may be permuted or rotated without changing the function, with the
    tensor where its statistics are collected and the weights the transform is folded into."""
    name: str
    kind: str          # residual | mlp | heads
    dim: int
    points: list[str]  # tensors whose per-channel statistics describe the region
    folds: str         # what absorbs the transform


@dataclass
class DecoderStructure:
    embedding: gs.Node
    layers: list[DecoderLayer]
    final_norm: RMSNorm
    lm_head: Linear
    writers: list[Linear]

    @property
    def hidden_size(self) -> int:
        return self.lm_head.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.layers[0].down.shape[0]

    @property
    def vocab_size(self) -> int:
        return constant_value(self.embedding.inputs[0]).shape[0]

    @property
    def norms(self) -> list[RMSNorm]:
        return [n for layer in self.layers for n in (layer.input_norm, layer.post_norm)] + [self.final_norm]

    def readers(self) -> list[Linear]:
        return [r for norm in self.norms for r in norm.readers]

    def regions(self) -> list[Region]:
        d = self.hidden_size
        regions = [Region(
            "residual", "residual", d,
            [n.normalized.name for layer in self.layers for n in (layer.input_norm, layer.post_norm)],
            f"embedding, {len(self.writers)} writers (o_proj, down_proj), {len(self.readers())} readers incl. lm_head",
        )]
        for layer in self.layers:
            regions.append(Region(
                f"layers.{layer.index}.mlp", "mlp", layer.down.shape[0], [layer.down.input.name],
                f"{layer.gate.name} / {layer.up.name} output columns, {layer.down.name} input rows"))
            regions.append(Region(
                f"layers.{layer.index}.heads", "heads", layer.v.shape[1], [layer.v.output.name],
                f"{layer.num_kv_heads} kv heads x {layer.head_dim} ({layer.num_heads} query heads): "
                f"{layer.v.name} output columns, {layer.o.name} input rows"))
        return regions


# ------------------------------------------------------------------------------------ matching

def _single(items, node, what):
    items = [i for i in items if i.op != "Shape"]
    if len(items) != 1:
        raise AnalysisError(node, f"expected one {what}, found {len(items)}")
    return items[0]


def _scalar(tensor) -> float | None:
    v = constant_value(tensor)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def as_linear(node: gs.Node) -> Linear | None:
    """node as a Linear when it is a MatMul by a constant 2-D weight (bias Add included)."""
    if node.op != "MatMul":
        return None
    w = constant_value(node.inputs[1])
    if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return None
    lin = Linear(node)
    outs = [c for c in node.outputs[0].outputs if c.op != "Shape"]
    if len(outs) == 1 and outs[0].op == "Add":
        add = outs[0]
        idx = 0 if add.inputs[1] is node.outputs[0] else 1
        b = constant_value(add.inputs[idx])
        if b is not None and b.shape == (w.shape[1],):
            lin.bias_node, lin.bias_index = add, idx
    return lin


def _linear_producing(tensor) -> Linear | None:
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Add":  # bias Add after the MatMul
        for t in node.inputs:
            p = producer(t)
            if p is not None and p.op == "MatMul":
                lin = as_linear(p)
                if lin is not None and lin.bias_node is node:
                    return lin
        return None
    lin = as_linear(node)
    return lin if lin is not None and lin.bias_node is None else None


def match_rmsnorm(x: gs.Tensor) -> RMSNorm:
    """Match the decomposed RMSNorm that reads residual tensor x."""
    squares = [c for c in x.outputs if (c.op == "Pow" and _scalar(c.inputs[1]) == 2.0 and c.inputs[0] is x)
               or (c.op == "Mul" and c.inputs[0] is x and c.inputs[1] is x)]
    if len(squares) != 1:
        raise AnalysisError(x.outputs[0] if x.outputs else x.name, "reads the residual stream but is not an RMSNorm")
    sq = squares[0]
    mean = _single(sq.outputs[0].outputs, sq, "ReduceMean after the square")
    if mean.op != "ReduceMean":
        raise AnalysisError(mean, "expected ReduceMean over the hidden axis in an RMSNorm")
    add = _single(mean.outputs[0].outputs, mean, "epsilon Add")
    sqrt = _single(add.outputs[0].outputs, add, "Sqrt")
    if add.op != "Add" or _scalar(_other(add, mean.outputs[0])) is None or sqrt.op != "Sqrt":
        raise AnalysisError(add, "expected Add(epsilon) -> Sqrt in an RMSNorm")
    nodes = {sq.name, mean.name, add.name, sqrt.name}
    step = _single(sqrt.outputs[0].outputs, sqrt, "reciprocal or division")
    if step.op == "Div" and step.inputs[0] is x:
        normalize = step
    else:
        if not ((step.op == "Div" and _scalar(step.inputs[0]) == 1.0) or step.op == "Reciprocal"):
            raise AnalysisError(step, "expected 1/sqrt(mean(x^2)+eps) in an RMSNorm")
        nodes.add(step.name)
        normalize = _single(step.outputs[0].outputs, step, "Mul by the inverse RMS")
        if normalize.op != "Mul" or x not in normalize.inputs:
            raise AnalysisError(normalize, "expected x * (1/rms) in an RMSNorm")
    nodes.add(normalize.name)
    normalized = normalize.outputs[0]
    nxt = [c for c in normalized.outputs if c.op != "Shape"]
    if len(nxt) == 1 and nxt[0].op == "Cast":
        nodes.add(nxt[0].name)
        normalized = nxt[0].outputs[0]
        nxt = [c for c in normalized.outputs if c.op != "Shape"]
    gamma = None
    if len(nxt) == 1 and nxt[0].op == "Mul":
        g = constant_value(_other(nxt[0], normalized))
        if g is not None and g.ndim == 1:
            gamma = nxt[0]
            nodes.add(gamma.name)
    return RMSNorm(x, normalized, gamma, nodes)


def _readers_of(norm: RMSNorm) -> list[Linear]:
    readers = []
    for c in norm.output.outputs:
        if c.op == "Shape":
            continue
        lin = as_linear(c)
        if lin is None or c.inputs[0] is not norm.output:
            raise AnalysisError(c, f"reads the output of RMSNorm '{norm.name}' but is not a linear layer "
                                   "(MatMul by a constant weight)")
        readers.append(lin)
    return readers


def _find_embedding(graph: gs.Graph) -> gs.Node:
    graph_inputs = {t.name for t in graph.inputs}

    def from_input(t, depth=0):
        if t.name in graph_inputs:
            return True
        p = producer(t)
        return depth < 3 and p is not None and p.op in ("Cast", "Identity") and from_input(p.inputs[0], depth + 1)

    found = []
    for node in graph.nodes:
        if node.op == "Gather" and node.attrs.get("axis", 0) == 0:
            table = constant_value(node.inputs[0])
            if table is not None and table.ndim == 2 and np.issubdtype(table.dtype, np.floating) \
                    and from_input(node.inputs[1]):
                found.append(node)
    if len(found) != 1:
        raise PerqError(
            "no decoder layers found: expected exactly one token-embedding Gather (a float "
            f"[vocab, hidden] table indexed by a graph input), found {len(found)}")
    return found[0]


def _follow_residual(graph: gs.Graph, embedding: gs.Node):
    """Walk the residual stream; return its norms (topological order) and writers."""
    outputs = {t.name for t in graph.outputs}
    stream = [embedding.outputs[0]]
    seen = {stream[0].name}
    norms, writers, claimed = [], [], set()

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
        norm = None
        for c in list(t.outputs):
            if c.name in claimed or c.op == "Shape":
                continue
            if c.op in ("Cast", "Identity"):
                push(c.outputs[0])
            elif c.op == "Add" and (lin := _linear_producing(_other(c, t))) is not None:
                writers.append(lin)
                push(c.outputs[0])
            elif c.op in ("Pow", "Mul", "Div"):
                if norm is None:  # its other nodes reading t are claimed and skipped
                    norm = match_rmsnorm(t)
                    norms.append(norm)
                    claimed |= norm.nodes
                if c.name not in norm.nodes:
                    raise AnalysisError(c, "reads the residual stream but is not part of an RMSNorm")
            else:
                raise AnalysisError(c, f"{c.op} reads the residual stream; only residual Adds of a linear "
                                       "layer's output, RMSNorms and Casts are supported")
    return norms, writers


def _mlp(view: GraphView, layer_index: int, readers: list[Linear], writers: list[Linear]):
    if len(readers) != 2:
        raise AnalysisError(readers[0].node if readers else f"layers.{layer_index}",
                            f"the MLP norm of layer {layer_index} has {len(readers)} readers; expected gate and up")
    # down_proj: the first writer (in data-flow order) that both gate and up reach
    reach = view.descendants(readers[0].node) & view.descendants(readers[1].node)
    downs = sorted((w for w in writers if w.node.name in reach), key=lambda w: view.order[w.node.name])
    if not downs:
        raise AnalysisError(readers[0].node, f"layer {layer_index}: gate and up do not reach a common down_proj")
    down = downs[0]
    region = set()
    for r in readers:
        region |= {n.name for n in view.between(r.node, down.node)}
    inside = region | {down.node.name} | {r.node.name for r in readers} | \
        {r.bias_node.name for r in readers if r.bias_node is not None}
    for name in region:
        node = view.by_name[name]
        if node.op not in ELEMENTWISE:
            raise AnalysisError(node, f"{node.op} inside the MLP of layer {layer_index} is not element-wise")
        for t in node.inputs:
            if producer(t) is None or producer(t).name in inside:
                continue
            if (v := constant_value(t)) is None or v.size != 1:
                raise AnalysisError(node, "mixes a tensor from outside the MLP into the permuted channels")
        for t in node.outputs:
            if any(c.name not in inside and c.op != "Shape" for c in t.outputs):
                raise AnalysisError(node, "an MLP intermediate tensor is read outside the MLP")
    gate = next((r for r in readers if any(view.by_name[n].op in NONLINEAR
                                          for n in view.descendants(r.node) & region)), readers[0])
    up = readers[1] if gate is readers[0] else readers[0]
    return gate, up, down


def _static_last_dim(shape_tensor) -> int | None:
    v = constant_value(shape_tensor)
    if v is not None and v.ndim == 1 and v.size:
        return int(v[-1])
    node = producer(shape_tensor)
    if node is not None and node.op == "Concat":
        return _static_last_dim(node.inputs[-1])
    return None


def _softmax_behind(tensor, depth: int = 4) -> bool:
    """Whether tensor is a Softmax output, possibly behind a few Where/Cast/Identity/Dropout
    nodes (optimum guards fully masked rows with IsNaN -> Where)."""
    node = producer(tensor)
    if node is None or depth == 0:
        return False
    if node.op == "Softmax":
        return True
    return node.op in ("Where", "Cast", "Identity", "Dropout") and any(
        _softmax_behind(t, depth - 1) for t in node.inputs if constant_value(t) is None)


def _value_path(v: Linear):
    """Follow v_proj's output through head-layout ops (Reshape, Transpose, Concat with the past
    values, Unsqueeze/Expand for grouped-query heads); return (probabilities @ V MatMul, head
    size, None) when it reaches the value input of one, else (None, None, blocking node).
    Shape computations are not data and are skipped."""
    head_dim, pv = None, None
    frontier, seen = [v.output], set()
    while frontier:
        t = frontier.pop()
        for node in t.outputs:
            if node.op == "Shape" or node.name in seen:
                continue
            if node.op == "MatMul" and node.inputs[1] is t and _softmax_behind(node.inputs[0]):
                pv = node
                continue
            if node.op not in HEAD_LAYOUT or (node.op != "Concat" and node.inputs[0] is not t) \
                    or (node.op == "Add" and node is not v.bias_node):
                return None, None, node
            seen.add(node.name)
            if node.op == "Reshape" and head_dim is None:
                head_dim = _static_last_dim(node.inputs[1])
            frontier.extend(node.outputs)
    return pv, head_dim, None


def _attention(view: GraphView, layer_index: int, readers: list[Linear], writers: list[Linear]):
    if len(readers) != 3:
        raise AnalysisError(readers[0].node if readers else f"layers.{layer_index}",
                            f"the attention norm of layer {layer_index} has {len(readers)} readers; expected q, k, v")
    found, blocked = [], []
    for reader in readers:
        pv, head_dim, blocking = _value_path(reader)
        if pv is not None:
            found.append((reader, pv, head_dim))
        elif blocking is not None:
            blocked.append(blocking)
    if len(found) != 1:
        node = blocked[0] if blocked else readers[0].node
        raise AnalysisError(node, f"layer {layer_index}: expected exactly one of q/k/v to reach softmax @ V through "
                                  f"layout ops only (per-head rotation needs that), found {len(found)}")
    v, pv, head_dim = found[0]
    o = next((w for w in writers if w.node.name in view.descendants(pv)
              and all(n.op in ("Transpose", "Reshape", "Identity", "Cast") for n in view.between(pv, w.node))), None)
    if o is None:
        raise AnalysisError(pv, f"layer {layer_index}: softmax @ V does not reach o_proj through Transpose/Reshape")
    if not head_dim or v.shape[1] % head_dim or o.shape[0] % head_dim:
        raise AnalysisError(v.node, f"layer {layer_index}: cannot read a head size from the Reshape after v_proj")
    q, k = [r for r in readers if r is not v]
    return q, k, v, o, head_dim


def analyze(graph: gs.Graph) -> DecoderStructure:
    """Recognise the decoder structure of graph or raise AnalysisError / PerqError."""
    view = GraphView(graph)
    embedding = _find_embedding(graph)
    norms, writers = _follow_residual(graph, embedding)
    norms.sort(key=lambda n: min(view.order[name] for name in n.nodes))
    for norm in norms:
        norm.readers = _readers_of(norm)
    if len(norms) < 3 or len(norms) % 2 == 0:
        raise PerqError(f"no decoder layers found: {len(norms)} RMSNorms read the residual stream; expected "
                        "two per layer plus a final one")
    final = norms[-1]
    if len(final.readers) != 1:
        raise AnalysisError(final.name, f"the final norm has {len(final.readers)} readers; expected lm_head alone")
    layers = []
    for i in range(len(norms) // 2):
        attn_norm, mlp_norm = norms[2 * i], norms[2 * i + 1]
        q, k, v, o, head_dim = _attention(view, i, attn_norm.readers, writers)
        gate, up, down = _mlp(view, i, mlp_norm.readers, writers)
        layers.append(DecoderLayer(i, attn_norm, mlp_norm, q, k, v, o, gate, up, down, head_dim))
    used = {w.node.name for layer in layers for w in (layer.o, layer.down)}
    extra = [w for w in writers if w.node.name not in used]
    if extra:
        raise AnalysisError(extra[0].node, "writes to the residual stream but is neither o_proj nor down_proj")
    return DecoderStructure(embedding, layers, final, final.readers[0], writers)
