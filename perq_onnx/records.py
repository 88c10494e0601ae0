"""The analysis' results: frozen records naming the graph's nodes and tensors.

``analysis.analyze`` returns a ``DecoderStructure``: the token embedding, one ``DecoderLayer`` per
layer (its two pre-norms, q/k/v/o and gate/up/down as ``Linear`` records, optional output norms),
the final norm and lm_head. ``regions()`` lists the permutation-equivariant ``Region``s, each
with the ``Fold``s (weight row/column slices) a transform of its channels goes into. The records
name nodes and tensors as they were when the graph was analysed; passes look the nodes up by name
and never change the records. This module imports nothing from perq-onnx but its errors, so every
matcher can build records without importing the analysis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .errors import PerqError


class AnalysisError(PerqError):
    """A part of the graph perq-onnx does not understand; carries the node name."""

    def __init__(self, node, reason: str):
        self.node = node.name if isinstance(node, gs.Node) else str(node)
        self.reason = reason
        super().__init__(f"node '{self.node}': {reason}")


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
    """An RMSNorm reading a residual tensor: decomposed (its nodes), onnxruntime's fused op (one
    node, also its ``gamma``) or the identity 'norm' of linears reading the stream directly."""
    input: str                # the residual tensor it reads
    normalized: str           # x / rms(x), before gamma
    gamma: str | None         # the node applying gamma (its Mul, or the fused norm), if any
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
    mlp_norm: RMSNorm         # the MLP's pre-norm (post_attention_layernorm)
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
        return [n for layer in self.layers for n in (layer.input_norm, layer.mlp_norm)] + [self.final_norm]

    def readers(self) -> list[Linear]:
        return [r for norm in self.norms for r in norm.readers]

    def residual_region(self) -> Region:
        folds = (Fold(self.embedding, 0, 1, 0, self.hidden_size),) + \
            tuple(produced(w) for w in self.writers) + tuple(consumed(r) for r in self.readers())
        return Region("residual", "residual", self.hidden_size,
                      tuple(n.normalized for layer in self.layers for n in (layer.input_norm, layer.mlp_norm)),
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
