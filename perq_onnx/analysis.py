"""Structural recognition of a decoder LLM graph and its permutation-equivariant regions.

``analyze(graph)`` reads a graph in the front end's canonical form (graph.load_graph,
frontend.py) and returns frozen records (records.py, re-exported here); it changes nothing in
the graph and keeps no state. ``refusals(graph)`` collects the refusals it can find instead of
stopping at the first (for ``perq-onnx inspect``). The matching is split by concern:
residual.py (the stream, its writers and norms), norms.py (RMSNorm), post_norms.py (output norms,
direct readers), mlp.py (the MLP region), heads.py (the heads region), fused_slices.py (fused
projections), fused_ops.py (onnxruntime's ops), refusals.py (whole-structure refusals).

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

Family variants read as the same structure:

* Fused projections (Phi-3's qkv_proj, gate_up_proj): one norm reader whose output is cut into
  column ranges by Slices on the last axis (fused_slices.py), or, from onnxruntime-genai's model
  builder, read whole by a packed-QKV GroupQueryAttention whose head counts give the ranges. Each range becomes a Linear record
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

import onnx_graphsurgeon as gs

from .errors import PerqError
from .fused_ops import value_cache_tensor
from .graph import GraphView
from .heads import match_attention
from .mlp import match_mlp
from .post_norms import residual_blocker
from .records import (AnalysisError, DecoderLayer, DecoderStructure, Fold, Linear, Region, RMSNorm,
                      consumed, produced)
from .refusals import graph_float_type, refuse_changed_outputs, refuse_overridable
from .residual import find_embedding, follow_residual
from .shapes import constant_shape

__all__ = ["AnalysisError", "DecoderLayer", "DecoderStructure", "Fold", "Linear", "Region", "RMSNorm", "analyze",
           "consumed", "produced", "refusals"]


def analyze(graph: gs.Graph) -> DecoderStructure:
    """Recognise the decoder structure of graph or raise AnalysisError / PerqError."""
    return _analyze(graph, None)


def refusals(graph: gs.Graph) -> list[PerqError]:
    """Every refusal the analysis finds, in graph order: the residual stream's first one (the walk
    cannot go on past it), else each layer's attention and MLP refusals, else the whole-structure
    ones; [] when the graph is accepted."""
    found: list[PerqError] = []
    try:
        _analyze(graph, found)
    except PerqError as exc:
        found.append(exc)
    return found


def _analyze(graph: gs.Graph, collect: list | None) -> DecoderStructure | None:
    """analyze; with `collect` a list, per-layer refusals are appended to it and the walk goes on
    (then None is returned when any was found)."""
    embedding = find_embedding(graph)
    graph_float = graph_float_type(embedding)
    view = GraphView(graph)
    norms, writers, changed = follow_residual(graph, embedding, graph_float)
    output_norms = {n.writer: n for n in norms if n.writer is not None}  # post_norms.py
    norms = [n for n in norms if n.writer is None]
    norms.sort(key=lambda n: min(view.order[name] for name in (n.nodes or {r.name for r in n.readers})))
    if len(norms) < 3 or len(norms) % 2 == 0:
        raise PerqError(f"no decoder layers found: {len(norms)} RMSNorms read the residual stream; expected "
                        "two per layer plus a final one")
    final = norms[-1]
    if len(final.readers) != 1:
        raise AnalysisError(final.name, f"the final norm has {len(final.readers)} readers; expected lm_head alone")
    layers, value_caches, failed = [], set(), False
    for i in range(len(norms) // 2):
        attn_norm, mlp_norm = norms[2 * i], norms[2 * i + 1]
        attention = _attempt(collect, match_attention, view, i, attn_norm.readers, writers, graph_float)
        mlp = _attempt(collect, match_mlp, view, i, mlp_norm.readers, writers, graph_float)
        if attention is None or mlp is None:
            failed = True
            continue
        (q, k, v, o, head_dim, value_path), (gate, up, down, intermediate) = attention, mlp
        layers.append(DecoderLayer(i, attn_norm, mlp_norm, q, k, v, o, gate, up, down, head_dim,
                                   output_norms.get(o.name), output_norms.get(down.name)))
        changed |= value_path | intermediate
        value_caches |= {t for t in value_path if view.tensor(t).inputs and view.tensor(t).inputs[0].op == "Concat"}
        value_caches |= {t for t in value_path if value_cache_tensor(view.tensor(t))}
    if failed:
        return None
    used = {w.name for layer in layers for w in (layer.o, layer.down)}
    extra = [w for w in writers if w.name not in used]
    if extra:
        raise AnalysisError(extra[0].name, "writes to the residual stream but is neither o_proj nor down_proj")
    changed |= {t.name for w in writers for t in view.by_name[w.name].outputs} | {w.output for w in writers}
    refuse_changed_outputs(graph, changed, value_caches)
    vocab = constant_shape(embedding.inputs[0])[0][0]
    structure = DecoderStructure(embedding.name, vocab, tuple(layers), final, final.readers[0], tuple(writers),
                                 graph_float, residual_blocker(layers, view.by_name))
    refuse_overridable(view, structure)
    return structure


def _attempt(collect: list | None, match, *args):
    """match(*args); when collecting, an AnalysisError is appended to `collect` (None returned)."""
    try:
        return match(*args)
    except AnalysisError as exc:
        if collect is None:
            raise
        collect.append(exc)
        return None
