"""Post-norm sublayers (Gemma 2/3, OLMo2) and linears reading the residual stream directly (OLMo2).

**Output norms.** Gemma 2/3 and OLMo2 normalize each sublayer's output before the residual Add:
``x + g * norm(y)`` with ``y = o_proj(...)`` (or ``down_proj(...)``) and ``norm(y) = y / rms(y)``.
The writer is then found behind an RMSNorm (``normed_writer``), recorded as the layer's
``attn_output_norm`` / ``mlp_output_norm`` (an ``RMSNorm`` whose ``writer`` names the linear).

What stays exact with an output norm in place:

* R2 (per-head rotation of V's columns / o_proj's input rows): o_proj's *output* is unchanged, so
  whatever follows it (the output norm) is too;
* P3 and R3 (MLP intermediate permutation, online rotation at down_proj's input): down_proj's
  output is unchanged;
* R1 (a rotation Q of the residual stream): the sublayer must then write ``(g * norm(y)) Q``.
  Folding Q into the writer's columns gives ``y Q``, and rms(yQ) = rms(y) (Q is orthogonal, the
  epsilon is unaffected), so the norm yields ``norm(y) Q`` -- but the gamma Mul then gives
  ``norm(y) Q diag(g)``, which equals ``norm(y) diag(g) Q`` for every y only when diag(g) commutes
  with Q, i.e. (for a Hadamard or permuted block Hadamard, whose entries are all non-zero) when g
  is uniform. A per-channel gamma cannot be moved to the writer either (it sits behind the
  non-linear 1/rms), nor into the residual readers (the residual is a sum of several writers'
  contributions and the embedding, only some of which carry it). So R1 is exact for a model with
  output norms iff every output norm has no gamma or a uniform one (``residual_blocker``); trained
  Gemma 2/3 and OLMo2 checkpoints have per-channel gammas, and the pipeline then skips R1 (residual
  rotation 'none', one line in the report) while R2, P3 and R3 apply as usual. The structure
  records it: ``DecoderStructure.residual_blocker`` says why, and ``regions()`` leaves the residual
  region out.

**Direct readers.** OLMo2 has no pre-norms: q/k/v and gate/up read the residual stream itself.
Such a group of linears is recorded as a gamma-free *identity* norm (no nodes, ``normalized`` =
the residual tensor, ``readers`` = the linears), so each layer still has its (attention, MLP)
reader groups; under R1 the readers' rows take Q^T exactly as behind a real norm.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from .matching import linear_producing, lossless_cast, only_reader
from .norms import match_rmsnorm
from .records import AnalysisError, RMSNorm
from .shapes import constant_value, producer


def _ancestors(tensor: gs.Tensor, depth: int) -> list[gs.Tensor]:
    """Non-constant tensors at most `depth` nodes upstream of tensor (tensor included)."""
    out, frontier = [tensor], [tensor]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            node = producer(t)
            if node is None:
                continue
            nxt += [i for i in node.inputs if constant_value(i) is None and i not in out]
        out += nxt
        frontier = nxt
    return out


def normed_writer(tensor: gs.Tensor, add: gs.Node, graph_float: int):
    """(linear, its output RMSNorm, tensors a residual rotation would change) when tensor, added to
    the residual stream by `add`, is an RMSNorm of a linear layer's output (possibly through
    lossless Casts on either side of the norm); None otherwise. The norm must be the only reader
    of the linear's output and `add` the only reader of the norm's output."""
    out = tensor
    casts_after = []
    while (p := producer(out)) is not None and lossless_cast(p, graph_float):
        casts_after.append(out)
        out = p.inputs[0]
    if producer(out) is None or producer(out).op not in ("Mul", "Div"):
        return None
    for y in _ancestors(out, 8):
        lin = linear_producing(y)
        if lin is None:
            continue
        chain = [y]  # the linear's output, then lossless Casts (the norm computes in float32)
        while True:
            x = chain[-1]
            if not any(c.op in ("Pow", "Mul") for c in x.outputs):
                nxt = [c for c in x.outputs if c.op != "Shape"]
                if len(nxt) == 1 and lossless_cast(nxt[0], graph_float):
                    chain.append(nxt[0].outputs[0])
                    continue
                break
            try:
                norm, inside = match_rmsnorm(x, graph_float, readers=False)
            except AnalysisError:
                break
            output = norm.gamma and producer(out) is not None and producer(out).name == norm.gamma
            if not (output or out.name == norm.normalized):
                break
            for t, cast_out in zip(chain[:-1], chain[1:]):
                only_reader(t, producer(cast_out), "the output of a linear layer writing to the residual stream")
            others = [c for c in x.outputs if c.op != "Shape" and c.name not in norm.nodes]
            if others:
                raise AnalysisError(others[0], f"reads the input of the output norm after '{lin.name}' "
                                                 f"('{x.name}'), which a residual rotation changes")
            for t in [out, *casts_after]:
                readers = [c for c in t.outputs if c.op != "Shape"]
                if len(readers) != 1 or (t is tensor and readers[0] is not add):
                    raise AnalysisError(readers[0] if readers else add,
                                          f"reads the output of the output norm after '{lin.name}' besides "
                                          "the residual Add")
            changed = {t.name for t in chain} | inside | {t.name for t in casts_after} | {tensor.name}
            return lin, replace(norm, writer=lin.name), changed
    return None


def direct_readers_norm(t: gs.Tensor, readers: list) -> RMSNorm:
    """The identity 'norm' of linears reading residual tensor t directly (see the docstring)."""
    return RMSNorm(t.name, t.name, None, frozenset(), tuple(readers))


def output_norm_gamma(graph_nodes: dict, norm) -> np.ndarray | None:
    """The gamma vector of an output norm (None: no gamma)."""
    if norm.gamma is None:
        return None
    mul = graph_nodes[norm.gamma]
    return next(v for v in (constant_value(t) for t in mul.inputs) if v is not None)


def residual_blocker(layers, graph_nodes: dict) -> str | None:
    """Why a residual rotation cannot be folded exactly (None: it can): the first output norm
    with a per-channel (non-uniform) gamma."""
    for layer in layers:
        for kind, norm in (("attention", layer.attn_output_norm), ("MLP", layer.mlp_output_norm)):
            if norm is None:
                continue
            g = output_norm_gamma(graph_nodes, norm)
            if g is not None and not np.all(g == g.reshape(-1)[0]):
                return (f"node '{norm.gamma}': layer {layer.index}'s {kind} output norm scales '{norm.writer}''s "
                        "output by a per-channel gamma before the residual Add; a residual rotation does not "
                        "commute with it")
    return None
