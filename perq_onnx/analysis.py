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

Two family variants are read as the same structure:

* Fused projections (Phi-3's qkv_proj, gate_up_proj): one norm reader whose output is cut into
  column ranges by Slices on the last axis (fused_slices.py). Each range becomes a Linear record
  of the fused MatMul with ``columns``, so the regions fold into row/column *slices* of the one
  fused weight: R1 into its rows (all of them), R2 into the V columns, P3 into both halves of
  gate_up with the same permutation. Exact because a Slice on the channel axis only selects
  columns: slice(x W)[..., a:b] = x W[:, a:b].
* Scalar multipliers (Granite): a Mul/Div by a constant scalar on the residual stream (after the
  embedding) or between a writer and its residual Add. Scalars commute with any change of basis
  of the channels, (c x) Q = c (x Q), so they stay in the graph unchanged. Granite's other
  multipliers (attention scaling on q/k, logits / logits_scaling after lm_head) act on tensors
  the rewrite does not change.
* Output norms and direct readers (Gemma 2/3, OLMo2; post_norms.py): an RMSNorm between a writer
  and its residual Add is recorded on the layer (``attn_output_norm``, ``mlp_output_norm``); with a
  per-channel gamma it makes R1 inexact, so ``DecoderStructure.residual_blocker`` says why and
  ``regions()`` leaves the residual region out (R2, P3, R3 are unaffected). Linears reading the
  residual stream with no norm in between (OLMo2) form a gamma-free identity norm. Gemma's
  (1 + w) gamma is an exported constant and its sqrt(hidden) embedding scale a scalar Mul.

Anything else reading the residual stream, or an unexpected op inside a region, is refused with
the node's name and the reason.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from .errors import PerqError
from . import fused_ops
from .graph import GraphView, constant_shape, constant_value, producer
from . import post_norms

ELEMENTWISE = {"Sigmoid", "Tanh", "Erf", "Relu", "Softplus", "Gelu", "Neg", "Exp", "Cast", "Identity",
               "HardSigmoid", "HardSwish", "Elu", "Selu", "LeakyRelu", "Mish", "Mul", "Add", "Sub", "Div", "Pow"}
NONLINEAR = {"Sigmoid", "Tanh", "Erf", "Relu", "Softplus", "Gelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
             "LeakyRelu", "Mish"}
HEAD_LAYOUT = {"Reshape", "Transpose", "Concat", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Add"}
ELEMENTWISE |= fused_ops.CONTRIB_ELEMENTWISE  # onnxruntime's fused activations (QuickGelu = SiLU)
NONLINEAR |= fused_ops.CONTRIB_ELEMENTWISE


class AnalysisError(PerqError):
    """A part of the graph perq-onnx does not understand; carries the node name."""

    def __init__(self, node, reason: str):
        self.node = node.name if isinstance(node, gs.Node) else str(node)
        self.reason = reason
        super().__init__(f"node '{self.node}': {reason}")


# ------------------------------------------------------------------------------ building blocks
# Analysis results are frozen and name graph nodes and tensors as they were when the graph was
# analysed; passes look the nodes up by name and never change these records.

@dataclass(frozen=True)
class Linear:
    """A MatMul by a constant [in, out] weight (input 1), with an optional bias Add after it.

    A projection that is a column slice of a fused weight (Phi-3's q/k/v in qkv_proj, gate/up in
    gate_up_proj; see fused_slices.py) names the fused MatMul, its Slice's output and the slice's
    width; ``columns`` is its [start, stop) in the fused weight and ``fused`` the whole linear."""
    name: str                 # the MatMul node
    input: str                # the tensor it read at analysis time
    output: str               # the bias Add's output, else the MatMul's (a slice: the Slice's output)
    in_features: int
    out_features: int
    bias: str | None = None   # the bias Add node
    bias_index: int = 1       # which input of the bias Add is the bias
    columns: tuple[int, int] | None = None  # a slice: its output columns of the fused weight
    fused: "Linear | None" = None           # a slice: the whole fused linear

    @property
    def shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features


@dataclass(frozen=True)
class RMSNorm:
    input: str                # the residual tensor it reads
    normalized: str           # x / rms(x), before gamma
    gamma: str | None         # the Mul(gamma, normalized) node, if any
    nodes: frozenset[str]     # its node names
    readers: tuple[Linear, ...] = ()
    writer: str | None = None  # an output norm (post_norms.py): the linear whose output it normalizes

    @property
    def name(self) -> str:
        return self.gamma or self.normalized


@dataclass(frozen=True)
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
    attn_output_norm: RMSNorm | None = None  # RMSNorm between o_proj and the residual Add (post_norms.py)
    mlp_output_norm: RMSNorm | None = None   # RMSNorm between down_proj and the residual Add

    @property
    def num_heads(self) -> int:
        return self.o.in_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.v.out_features // self.head_dim

    def linears(self) -> dict[str, Linear]:
        """kind -> linear, one entry per weight: the column slices of one fused weight appear once,
        as the whole fused linear, under their joined kinds ("qkv", "gate_up")."""
        groups: dict[str, list[str]] = {}
        for k in ("q", "k", "v", "o", "gate", "up", "down"):
            groups.setdefault(getattr(self, k).name, []).append(k)
        out = {}
        for kinds in groups.values():
            lin = getattr(self, kinds[0])
            out["qkv" if kinds == ["q", "k", "v"] else "_".join(kinds)] = lin.fused or lin
        return out


@dataclass(frozen=True)
class Fold:
    """Where a region's transform is folded: channels [start, stop) of axis `axis` of the
    constant at input `input` of node `node` (axis 1: the channels are produced, as weight
    columns (and bias entries) -> W[:, s] @ T; axis 0: they are consumed, as weight rows ->
    T^T @ W[s, :]). A fused weight (qkv, gate_up) is several slices of one initializer."""
    node: str
    input: int
    axis: int
    start: int
    stop: int
    bias: str | None = None
    bias_index: int = 1


def produced(lin: Linear, start: int = 0, stop: int | None = None) -> Fold:
    """Output columns [start, stop) of lin (of its slice, for a column slice of a fused weight)."""
    base = lin.columns[0] if lin.columns else 0
    stop = lin.out_features if stop is None else stop
    return Fold(lin.name, 1, 1, base + start, base + stop, lin.bias, lin.bias_index)


def consumed(lin: Linear, start: int = 0, stop: int | None = None) -> Fold:
    return Fold(lin.name, 1, 0, start, lin.in_features if stop is None else stop)


def _columns(lin: Linear) -> str:
    return f"{lin.name}[{lin.columns[0]}:{lin.columns[1]}]" if lin.columns else lin.name


@dataclass(frozen=True)
class Region:
    """A set of channels that may be permuted or rotated without changing the function: the
    tensors where its statistics are collected and the weight slices its transform folds into."""
    name: str
    kind: str                  # residual | mlp | heads
    dim: int
    stats: tuple[str, ...]     # tensors whose per-channel statistics describe the region
    folds: tuple[Fold, ...]
    description: str


@dataclass(frozen=True)
class DecoderStructure:
    embedding: str                 # the token-embedding Gather node
    vocab_size: int
    layers: tuple[DecoderLayer, ...]
    final_norm: RMSNorm
    lm_head: Linear
    writers: tuple[Linear, ...]
    float_type: int = 1            # ONNX type of the residual stream (1 float32, 10 float16, 11 float64)
    residual_blocker: str | None = None  # why R1 would not be exact (output norms, post_norms.py); None: it is

    @property
    def dtype(self) -> np.dtype:
        return np.dtype({1: np.float32, 10: np.float16, 11: np.float64}[self.float_type])

    @property
    def hidden_size(self) -> int:
        return self.lm_head.in_features

    @property
    def intermediate_size(self) -> int:
        return self.layers[0].down.in_features

    @property
    def head_dim(self) -> int:
        return self.layers[0].head_dim

    @property
    def norms(self) -> list[RMSNorm]:
        return [n for layer in self.layers for n in (layer.input_norm, layer.post_norm)] + [self.final_norm]

    def readers(self) -> list[Linear]:
        return [r for norm in self.norms for r in norm.readers]

    def residual_region(self) -> Region:
        folds = (Fold(self.embedding, 0, 1, 0, self.hidden_size),) + \
            tuple(produced(w) for w in self.writers) + tuple(consumed(r) for r in self.readers())
        return Region("residual", "residual", self.hidden_size,
                      tuple(n.normalized for layer in self.layers for n in (layer.input_norm, layer.post_norm)),
                      folds, f"embedding, {len(self.writers)} writers (o_proj, down_proj), "
                             f"{len(self.readers())} readers incl. lm_head")

    def mlp_region(self, layer: DecoderLayer) -> Region:
        return Region(f"layers.{layer.index}.mlp", "mlp", layer.down.in_features, (layer.down.input,),
                      (produced(layer.gate), produced(layer.up), consumed(layer.down)),
                      f"{_columns(layer.gate)} / {_columns(layer.up)} output columns, {layer.down.name} input rows")

    def heads_region(self, layer: DecoderLayer) -> Region:
        return Region(f"layers.{layer.index}.heads", "heads", layer.v.out_features, (layer.v.output,),
                      (produced(layer.v), consumed(layer.o)),
                      f"{layer.num_kv_heads} kv heads x {layer.head_dim} ({layer.num_heads} query heads): "
                      f"{_columns(layer.v)} output columns, {layer.o.name} input rows")

    def regions(self) -> list[Region]:
        """The regions a rewrite may transform (the residual region only when R1 is exact)."""
        regions = [self.residual_region()] if self.residual_blocker is None else []
        for layer in self.layers:
            regions += [self.mlp_region(layer), self.heads_region(layer)]
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
    w = constant_shape(node.inputs[1])
    if w is None or len(w[0]) != 2 or not np.issubdtype(w[1], np.floating):
        return None
    out = node.outputs[0]
    lin = Linear(node.name, node.inputs[0].name, out.name, *w[0])
    outs = [c for c in out.outputs if c.op != "Shape"]
    if len(outs) == 1 and outs[0].op == "Add":
        add = outs[0]
        idx = 0 if add.inputs[1] is out else 1
        b = constant_shape(add.inputs[idx])
        if b is not None and b[0] == (w[0][1],):
            lin = replace(lin, output=add.outputs[0].name, bias=add.name, bias_index=idx)
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
                if lin is not None and lin.bias == node.name:
                    return lin
        return None
    lin = as_linear(node)
    return lin if lin is not None and lin.bias is None else None


def _only_reader(tensor: gs.Tensor, reader: gs.Node, what: str) -> None:
    """Refuse a tensor the rewrite changes when anything but `reader` reads it."""
    others = [c for c in tensor.outputs if c is not reader and c.op != "Shape"]
    if others:
        raise AnalysisError(others[0], f"reads {what} ('{tensor.name}'), which the rewrite changes")


# Casts the rewritten values may pass through, by the graph's float type (the token-embedding
# table's, i.e. the residual stream's): a Cast to a type at least as precise as the graph's own.
# In a float32 graph that is float32/float64 -- exact, so the rewrite is exact to float32 rounding.
# In a float16 graph (optimum --dtype fp16 computes RMSNorm in float32: Cast up, normalize, Cast
# back to float16; onnxruntime's float16 converter keeps everything in float16) a Cast back to
# float16 rounds exactly as every float16 op of the graph does: a rotation changes *which* values
# are rounded, so the rewritten float16 model equals its input to float16 rounding noise (of the
# order of the input's own deviation from its float32 original), not bit for bit. Narrower
# Casts (float32 -> float16/bfloat16 in a float32 graph, float16 -> bfloat16) round in the
# original channel basis at a precision below the graph's and are refused.
FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
LOSSLESS_CASTS = {1: {1, 11}, 10: {10, 1, 11}, 11: {11}}  # graph float type -> allowed Cast targets
_NP_TO_ONNX = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}
_graph_float: ContextVar[int] = ContextVar("graph_float", default=1)


def float_type(dtype) -> int | None:
    """The ONNX type number of a numpy float dtype (bfloat16 from ml_dtypes included), else None."""
    dtype = np.dtype(dtype)
    if dtype in _NP_TO_ONNX:
        return _NP_TO_ONNX[dtype]
    return 16 if dtype.name == "bfloat16" else None


def _lossless_cast(node: gs.Node) -> bool:
    return node.op == "Cast" and node.attrs.get("to") in LOSSLESS_CASTS[_graph_float.get()]


def _check_last_axis_mean(mean: gs.Node, x: gs.Tensor) -> None:
    """An RMSNorm's ReduceMean must average over the last (hidden) axis only, keeping it."""
    axes = mean.attrs.get("axes")
    if axes is None and len(mean.inputs) > 1:
        value = constant_value(mean.inputs[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    rank = len(x.shape) if x.shape is not None else None
    last = axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))
    if not last:
        raise AnalysisError(mean, f"ReduceMean over axes {axes} in an RMSNorm; only the last (hidden) axis is supported")
    if mean.attrs.get("keepdims", 1) != 1:
        raise AnalysisError(mean, "ReduceMean with keepdims=0 in an RMSNorm is not supported")


def match_rmsnorm(x: gs.Tensor, readers: bool = True) -> RMSNorm:
    """Match the decomposed RMSNorm that reads residual tensor x (readers=False: an output norm,
    whose output is not read by linears, see post_norms.py)."""
    squares = [c for c in x.outputs if (c.op == "Pow" and _scalar(c.inputs[1]) == 2.0 and c.inputs[0] is x)
               or (c.op == "Mul" and c.inputs[0] is x and c.inputs[1] is x)]
    if len(squares) != 1:
        raise AnalysisError(x.outputs[0] if x.outputs else x.name, "reads the residual stream but is not an RMSNorm")
    sq = squares[0]
    mean = _single(sq.outputs[0].outputs, sq, "ReduceMean after the square")
    if mean.op != "ReduceMean":
        raise AnalysisError(mean, "expected ReduceMean over the hidden axis in an RMSNorm")
    _check_last_axis_mean(mean, x)
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
    if len(nxt) == 1 and _lossless_cast(nxt[0]):
        nodes.add(nxt[0].name)
        normalized = nxt[0].outputs[0]
        nxt = [c for c in normalized.outputs if c.op != "Shape"]
    gamma = None
    if len(nxt) == 1 and nxt[0].op == "Mul":
        g = constant_value(_other(nxt[0], normalized))
        if g is not None and g.ndim == 1:
            gamma = nxt[0]
            nodes.add(gamma.name)
    output = gamma.outputs[0] if gamma is not None else normalized
    changed = {normalize.outputs[0].name, normalized.name, output.name}
    nxt = [c for c in output.outputs if c.op != "Shape"]
    if gamma is not None and len(nxt) == 1 and _lossless_cast(nxt[0]):  # OLMo2: (gamma * x).to(dtype)
        nodes.add(nxt[0].name)
        output = nxt[0].outputs[0]
        changed.add(output.name)
    return RMSNorm(x.name, normalized.name, gamma.name if gamma else None, frozenset(nodes),
                   _readers_of(output, gamma.name if gamma else normalized.name) if readers else ()), changed


def _readers_of(output: gs.Tensor, norm_name: str) -> tuple[Linear, ...]:
    readers = []
    for c in output.outputs:
        if c.op == "Shape":
            continue
        lin = as_linear(c)
        if lin is None or c.inputs[0] is not output:
            raise AnalysisError(c, f"reads the output of RMSNorm '{norm_name}' but is not a linear layer "
                                   "(MatMul by a constant weight)")
        readers.append(lin)
    return tuple(readers)


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
        and (node.op == "Mul" or node.inputs[0] is x) and constant_shape(_other(node, x)) is not None


def _writer(tensor: gs.Tensor, add: gs.Node):
    """(linear, the Cast / scalar-Mul outputs in between) when tensor, added to the residual stream
    by `add`, is a linear layer's output, possibly through lossless Casts (optimum's float16
    exports cast down_proj's float16 output up to a float32 residual stream) and multiplications
    by a constant scalar (Granite's residual_multiplier: c (x W Q) = (c x W) Q, so folding R1
    into W's columns stays exact); None otherwise. Each tensor on the way must have no other
    reader."""
    chain, node = [tensor], producer(tensor)
    while node is not None and (_lossless_cast(node) or _scaled_input(node) is not None):
        chain.append(node.inputs[0] if _lossless_cast(node) else _scaled_input(node))
        node = producer(chain[-1])
    lin = _linear_producing(chain[-1])
    if lin is None:
        return None
    readers = [add] + [producer(t) for t in chain[:-1]]
    for t, reader in zip(chain, readers):
        _only_reader(t, reader, "the output of a linear layer writing to the residual stream")
    return lin, {t.name for t in chain[:-1]}


def _follow_residual(graph: gs.Graph, embedding: gs.Node):
    """Walk the residual stream; return its norms (in stream order), writers and the tensors
    inside the norms that a rotation changes."""
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
            if c.op == "Identity" or _lossless_cast(c) or _scaled_input(c) is t:  # scalar: Granite's multiplier
                push(c.outputs[0])
            elif c.op == "Add" and (found := _writer(_other(c, t), c)) is not None:
                lin, casts = found
                writers.append(lin)
                changed |= casts
                push(c.outputs[0])
            elif c.op == "Add" and (found := post_norms.normed_writer(_other(c, t), c)) is not None:
                lin, output_norm, inside = found  # a post-norm sublayer (Gemma 2/3, OLMo2)
                writers.append(lin)
                norms.append(output_norm)  # has .writer: taken out of the reader norms by _analyze
                changed |= inside
                push(c.outputs[0])
            elif c.op == "MatMul" and c.inputs[0] is t and (lin := as_linear(c)) is not None:
                direct.append(lin)  # OLMo2: q/k/v, gate/up read the residual stream itself
            elif _constant_scale(c, t):
                raise AnalysisError(c, f"{c.op} of the residual stream by a non-scalar constant: only a scalar "
                                       "multiplier (Granite's) commutes with the residual rotation")
            elif c.op in ("Pow", "Mul", "Div"):
                if norm is None:  # its other nodes reading t are claimed and skipped
                    norm, inside = match_rmsnorm(t)
                    norms.append(norm)
                    claimed |= norm.nodes
                    changed |= inside
                if c.name not in norm.nodes:
                    raise AnalysisError(c, "reads the residual stream but is not part of an RMSNorm")
            elif fused_ops.is_fused_rmsnorm(c):  # onnxruntime's (Skip)SimplifiedLayerNormalization
                fused, inside, found, passed_on = fused_ops.match_fused_rmsnorm(c, t, _writer, _readers_of)
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
            norms.append(post_norms.direct_readers_norm(t, direct))
    return norms, writers, changed


def _mlp(view: GraphView, layer_index: int, readers: tuple[Linear, ...], writers: list[Linear]):
    """(gate, up, down, tensors of the MLP intermediate). One reader is a fused gate_up projection
    (Phi-3): its two column halves, each read through a Slice, are gate and up (fused_slices.py)."""
    if len(readers) == 1:
        from .fused_slices import split_fused
        readers = split_fused(view, readers[0], 2, f"the MLP of layer {layer_index} (gate_up)")
    if len(readers) != 2:
        raise AnalysisError(readers[0].name if readers else f"layers.{layer_index}",
                            f"the MLP norm of layer {layer_index} has {len(readers)} readers; expected gate and up")
    node = view.by_name
    # down_proj: the first writer (in data-flow order) that both gate and up reach
    reach = view.descendants(node[readers[0].name]) & view.descendants(node[readers[1].name])
    downs = sorted((w for w in writers if w.name in reach), key=lambda w: view.order[w.name])
    if not downs:
        raise AnalysisError(readers[0].name, f"layer {layer_index}: gate and up do not reach a common down_proj")
    down = downs[0]
    region = set()
    for r in readers:
        region |= {n.name for n in view.between(node[r.name], node[down.name])}
    slices = {producer(view.tensor(r.output)).name for r in readers if r.columns is not None}
    region -= slices  # a fused projection's Slices belong to it: they select its columns
    inside = region | slices | {down.name} | {r.name for r in readers} | {r.bias for r in readers if r.bias}
    changed = {t.name for r in readers for t in node[r.name].outputs} | {r.output for r in readers}
    for r in readers:
        for t in [view.tensor(r.output), *node[r.name].outputs]:
            if any(c.name not in inside and c.op != "Shape" for c in t.outputs) or t.name in view.graph_outputs:
                raise AnalysisError(r.name, f"the output of '{r.name}' is read outside the MLP")
    for name in region:
        n = node[name]
        if n.op not in ELEMENTWISE or (n.op == "Cast" and not _lossless_cast(n)):
            raise AnalysisError(n, f"{n.op} inside the MLP of layer {layer_index} is not element-wise and exact")
        for t in n.inputs:
            if producer(t) is not None and producer(t).name in inside:
                continue
            if (v := constant_shape(t)) is None or int(np.prod(v[0])) != 1 or t.name in view.graph_inputs:
                raise AnalysisError(n, "mixes a tensor from outside the MLP into the permuted channels")
        for t in n.outputs:
            changed.add(t.name)
            if any(c.name not in inside and c.op != "Shape" for c in t.outputs):
                raise AnalysisError(n, "an MLP intermediate tensor is read outside the MLP")
    gate = next((r for r in readers if any(node[n].op in NONLINEAR  # from r's output (a slice's own)
                                          for n in view.descendants(producer(view.tensor(r.output))) & region)),
                readers[0])
    up = readers[1] if gate is readers[0] else readers[0]
    return gate, up, down, changed


def _static_last_dim(shape_tensor) -> int | None:
    v = constant_value(shape_tensor)
    if v is not None and v.ndim == 1 and v.size:
        return int(v[-1])
    node = producer(shape_tensor)
    if node is not None and node.op == "Concat":
        return _static_last_dim(node.inputs[-1])
    return None


def _inferred_last_dim(tensor: gs.Tensor) -> int | None:
    shape = tensor.shape
    return shape[-1] if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None


def _softmax_behind(tensor, depth: int = 4) -> bool:
    """Whether tensor is a Softmax output, possibly behind a few Where/Cast/Identity/Dropout
    nodes (optimum guards fully masked rows with IsNaN -> Where)."""
    node = producer(tensor)
    if node is None or depth == 0:
        return False
    if node.op == "Softmax":
        return True
    return node.op in ("Where", "Cast", "Identity", "Dropout") and any(
        _softmax_behind(t, depth - 1) for t in node.inputs if constant_shape(t) is None)


def _keeps_last_axis(node: gs.Node) -> bool:
    """Whether a layout op leaves the channel (last) axis where it is, whole and unchanged."""
    rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
    last = {-1} | ({rank - 1} if rank else set())
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and perm[-1] == len(perm) - 1
    if node.op == "Concat":
        return node.attrs.get("axis") not in last
    if node.op in ("Unsqueeze", "Squeeze"):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            value = constant_value(node.inputs[1])
            axes = None if value is None else value.reshape(-1).tolist()
        return axes is not None and not (set(axes) & last) and (rank is not None or all(a >= 0 for a in axes))
    if node.op == "Cast":
        return _lossless_cast(node)
    return True


def _value_path(view: GraphView, v: Linear):
    """Follow v_proj's output through head-layout ops (Reshape, Transpose, Concat with the past
    values, Unsqueeze/Expand for grouped-query heads); return (probabilities @ V MatMul, head
    size, tensors on the path, None) when it reaches the value input of one, else
    (None, None, None, blocking node). Shape computations are not data and are skipped."""
    head_dim, pv = None, None
    frontier, seen = [view.tensor(v.output)], set()
    path = {v.output}
    while frontier:
        t = frontier.pop()
        for node in t.outputs:
            if node.op == "Shape" or node.name in seen:
                continue
            if node.op == "MatMul" and node.inputs[1] is t and _softmax_behind(node.inputs[0]):
                pv = node
                continue
            if fused_ops.is_fused_attention(node) and fused_ops.value_input(node, t):
                pv = node  # GroupQueryAttention / MultiHeadAttention: t is its value input
                head_dim = head_dim or fused_ops.attention_head_dim(node, v.out_features)
                continue
            if node.op not in HEAD_LAYOUT or (node.op != "Concat" and node.inputs[0] is not t) \
                    or (node.op == "Add" and node.name != v.bias):
                return None, None, None, node
            seen.add(node.name)
            if node.op == "Reshape":
                last = _static_last_dim(node.inputs[1]) or _inferred_last_dim(node.outputs[0]) \
                    or fused_ops.reshape_last_dim(node.inputs[1])  # onnxruntime's Split-based shapes
                if head_dim is None:
                    head_dim = last
                elif last != head_dim:
                    return None, None, None, node  # a reshape that splits or merges the head channels
            if not _keeps_last_axis(node):
                return None, None, None, node
            frontier.extend(node.outputs)
            path |= {o.name for o in node.outputs}
    return pv, head_dim, path, None


def _attention(view: GraphView, layer_index: int, readers: tuple[Linear, ...], writers: list[Linear]):
    """(q, k, v, o, head size, tensors between v_proj and o_proj). One reader is a fused qkv
    projection (Phi-3): its three column slices, each read through a Slice (fused_slices.py)."""
    if len(readers) == 1:
        from .fused_slices import split_fused
        readers = split_fused(view, readers[0], 3, f"the attention of layer {layer_index} (qkv)")
    if len(readers) != 3:
        raise AnalysisError(readers[0].name if readers else f"layers.{layer_index}",
                            f"the attention norm of layer {layer_index} has {len(readers)} readers; expected q, k, v")
    found, blocked = [], []
    for reader in readers:
        pv, head_dim, path, blocking = _value_path(view, reader)
        if pv is not None:
            found.append((reader, pv, head_dim, path))
        elif blocking is not None:
            blocked.append(blocking)
    if len(found) != 1:
        node = blocked[0] if blocked else readers[0].name
        raise AnalysisError(node, f"layer {layer_index}: expected exactly one of q/k/v to reach softmax @ V through "
                                  f"layout ops only (per-head rotation needs that), found {len(found)}")
    v, pv, head_dim, path = found[0]
    o = next((w for w in writers if w.name in view.descendants(pv)
              and all(n.op in ("Transpose", "Reshape", "Identity", "Cast") and _keeps_last_axis(n)
                      for n in view.between(pv, view.by_name[w.name]))), None)
    if o is None:
        raise AnalysisError(pv, f"layer {layer_index}: softmax @ V does not reach o_proj through Transpose/Reshape "
                                "that keep the head channels innermost")
    if not head_dim or v.out_features % head_dim or o.in_features % head_dim:
        raise AnalysisError(v.name, f"layer {layer_index}: cannot read a head size from the Reshape after v_proj")
    path |= {t.name for n in view.between(pv, view.by_name[o.name]) for t in n.outputs} | {pv.outputs[0].name}
    if fused_ops.is_fused_attention(pv) and fused_ops.present_value(pv) is not None:
        path.add(fused_ops.present_value(pv).name)  # the value cache, in the rotated basis
    q, k = [r for r in readers if r is not v]
    return q, k, v, o, head_dim, path


def _refuse_changed_outputs(graph: gs.Graph, changed: set[str], value_caches: set[str]) -> None:
    """A tensor the rewrite changes must not be a graph output -- except the value cache
    (present.*.value), which is stored in the R2-rotated basis and read back by the same model."""
    for t in graph.outputs:
        if t.name in changed and t.name not in value_caches:
            node = producer(t)
            raise AnalysisError(node.name if node else t.name,
                                f"its output '{t.name}' is a graph output that the rewrite would change")


def _source_constant(tensor: gs.Tensor) -> gs.Tensor:
    """The initializer behind a weight read through Identity / Transpose."""
    node = producer(tensor)
    while node is not None and node.op in ("Identity", "Transpose"):
        tensor = node.inputs[0]
        node = producer(tensor)
    return tensor


def _refuse_overridable(view: GraphView, structure: DecoderStructure) -> None:
    """A weight the rewrite changes must not be a graph input as well (an initializer that
    callers may override at run time)."""
    folds = [f for r in structure.regions() for f in r.folds]
    inputs = [(f.node, f.input) for f in folds] + [(f.bias, f.bias_index) for f in folds if f.bias]
    inputs += [(n.gamma, i) for n in structure.norms if n.gamma for i in (0, 1)]
    inputs += [(n.gamma, fused_ops.fused_gamma_input(view.by_name[n.gamma])) for n in structure.norms
               if n.gamma and fused_ops.fused_gamma_input(view.by_name[n.gamma]) == 2]  # Skip's gamma
    for node, index in inputs:
        source = _source_constant(view.by_name[node].inputs[index])
        if source.name in view.graph_inputs:
            raise AnalysisError(node, f"its constant '{source.name}' is also a graph input (overridable at "
                                      "run time), so it cannot be rewritten")


def _graph_float_type(embedding: gs.Node) -> int:
    """The graph's float type (its embedding table's); bfloat16 is refused."""
    kind = float_type(constant_shape(embedding.inputs[0])[1])
    if kind == 16:
        raise AnalysisError(embedding, "the model is bfloat16: onnxruntime's CPU provider has no bfloat16 "
                                       "MatMul/Mul/Add kernels, so perq-onnx can neither calibrate nor check the "
                                       "rewrite; export the model in float32 or float16")
    return kind


def analyze(graph: gs.Graph) -> DecoderStructure:
    """Recognise the decoder structure of graph or raise AnalysisError / PerqError."""
    embedding = _find_embedding(graph)
    token = _graph_float.set(_graph_float_type(embedding))
    try:
        return _analyze(graph, embedding)
    finally:
        _graph_float.reset(token)


def _analyze(graph: gs.Graph, embedding: gs.Node) -> DecoderStructure:
    view = GraphView(graph)
    norms, writers, changed = _follow_residual(graph, embedding)
    output_norms = {n.writer: n for n in norms if n.writer is not None}  # post_norms.py
    norms = [n for n in norms if n.writer is None]
    norms.sort(key=lambda n: min(view.order[name] for name in (n.nodes or {r.name for r in n.readers})))
    if len(norms) < 3 or len(norms) % 2 == 0:
        raise PerqError(f"no decoder layers found: {len(norms)} RMSNorms read the residual stream; expected "
                        "two per layer plus a final one")
    final = norms[-1]
    if len(final.readers) != 1:
        raise AnalysisError(final.name, f"the final norm has {len(final.readers)} readers; expected lm_head alone")
    layers, value_caches = [], set()
    for i in range(len(norms) // 2):
        attn_norm, mlp_norm = norms[2 * i], norms[2 * i + 1]
        q, k, v, o, head_dim, value_path = _attention(view, i, attn_norm.readers, writers)
        gate, up, down, intermediate = _mlp(view, i, mlp_norm.readers, writers)
        layers.append(DecoderLayer(i, attn_norm, mlp_norm, q, k, v, o, gate, up, down, head_dim,
                                   output_norms.get(o.name), output_norms.get(down.name)))
        changed |= value_path | intermediate
        value_caches |= {t for t in value_path if view.tensor(t).inputs and view.tensor(t).inputs[0].op == "Concat"}
        value_caches |= {t for t in value_path if fused_ops.value_cache_tensor(view.tensor(t))}
    used = {w.name for layer in layers for w in (layer.o, layer.down)}
    extra = [w for w in writers if w.name not in used]
    if extra:
        raise AnalysisError(extra[0].name, "writes to the residual stream but is neither o_proj nor down_proj")
    changed |= {t.name for w in writers for t in view.by_name[w.name].outputs} | {w.output for w in writers}
    _refuse_changed_outputs(graph, changed, value_caches)
    vocab = constant_shape(embedding.inputs[0])[0][0]
    structure = DecoderStructure(embedding.name, vocab, tuple(layers), final, final.readers[0], tuple(writers),
                                 _graph_float.get(), post_norms.residual_blocker(layers, view.by_name))
    _refuse_overridable(view, structure)
    return structure
