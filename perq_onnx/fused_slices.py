"""Fused projections: one MatMul whose output columns are several projections (Phi-3).

Phi-3 computes q, k and v with one ``qkv_proj`` ([hidden, (heads + 2 kv_heads) * head_dim]) and
gate and up with one ``gate_up_proj`` ([hidden, 2 * intermediate]); optimum's export cuts the
MatMul output with Slices on the last axis (qkv: constant bounds; gate_up: ``chunk(2)`` bounds
computed from the output's Shape, (n + 1) // 2, evaluated by shapes.shape_value; a Split of the
last axis is read the same way).
``split_fused`` reads those Slices and returns
one ``Linear`` record per column range -- the fused MatMul's name, the Slice's output, the range's
width, ``columns=(start, stop)`` and ``fused`` the whole linear -- so that the rest of the analysis
(value path, MLP region) and the passes treat each range as the projection it is.

Why folding into slices is exact: a Slice on the channel axis selects weight columns,
``(x W)[..., a:b] = x W[:, a:b]`` (and ``(x W + b)[..., a:b] = x W[:, a:b] + b[a:b]``), so

* R1 and the gamma fold change W's *rows* (its input): every column range at once, and each
  projection's output is unchanged -- the fused weight is one reader of its norm;
* R2 changes only the V range, W[:, v] -> W[:, v] blockdiag(H): the V Slice's output becomes
  v H exactly as for a separate v_proj, and the q/k ranges are untouched;
* P3 permutes the gate range and the up range with the same permutation p (W[:, g] -> W[:, g][:, p],
  W[:, u] -> W[:, u][:, p]): act(gate)[..., p] * up[..., p] = (act(gate) * up)[..., p], which
  down_proj's permuted rows undo, exactly as for separate gate/up weights.

Quantization stays per output column (or groups of input rows per column), so the ranges of a
fused weight are quantized exactly as separate weights would be (``DecoderLayer.linears()``
lists the fused weight once, as "qkv" / "gate_up"). Refused (AnalysisError naming the node): a
fused output read by anything but Slices (or Splits) of its last axis with static bounds and unit
step -- such a reader would see R2's or P3's change of the columns -- ranges that overlap, leave
columns unread or are not as many as expected (3 for qkv, 2 for gate_up), and a fused output
that is a graph output.

onnxruntime-genai's model builder feeds the qkv output whole to GroupQueryAttention (packed QKV,
fused_ops.py); ``split_packed_qkv`` reads the three ranges from the node's head counts instead of
Slices. Each record's output is then the packed tensor itself (the attention selects the columns,
as a Slice would), and it must have no other reader.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from .fused_ops import packed_qkv_columns
from .graph import GraphView
from .records import AnalysisError, Linear
from .shapes import shape_value

INT64_MAX = np.iinfo(np.int64).max


def _slice_columns(node: gs.Node, source: gs.Tensor, rank: int | None, width: int) -> tuple[int, int] | None:
    """[start, stop) of the last axis that Slice `node` takes from `source` (of rank `rank`, its
    last dimension `width`), or None when its bounds are not static or it slices another axis or
    steps."""
    if node.op != "Slice" or node.inputs[0] is not source or len(node.inputs) < 3:
        return None
    shape = list(source.shape) if source.shape is not None else [np.nan] * (rank or 1)
    shapes = {source.name: shape[:-1] + [width]}
    starts, ends = (shape_value(t, shapes) for t in node.inputs[1:3])
    axes = shape_value(node.inputs[3], shapes) if len(node.inputs) > 3 and node.inputs[3].name else None
    steps = shape_value(node.inputs[4], shapes) if len(node.inputs) > 4 and node.inputs[4].name else None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1 or np.isnan(starts).any() \
            or np.isnan(ends).any():
        return None
    if axes is None:
        if rank is None or rank != 1:
            return None  # no axes input: the first axis, which is the channel axis only for 1-D data
    elif axes.size != 1 or not (axes[0] == -1 or (rank is not None and axes[0] == rank - 1)):
        return None
    if steps is not None and (steps.size != 1 or steps[0] != 1):
        return None

    def clamp(v):
        v = int(v) if v < INT64_MAX else width
        return min(max(v + width if v < 0 else v, 0), width)
    return clamp(starts[0]), clamp(ends[0])


def _split_columns(node: gs.Node, source: gs.Tensor, rank: int | None, width: int) -> list | None:
    """[(start, stop, output)] of a Split of `source`'s last axis into column ranges (sizes from its
    `split` input, else equal parts as ONNX defines them: ceil(width / n), the last one smaller),
    or None when it splits another axis or its sizes are not static."""
    if node.op != "Split" or node.inputs[0] is not source:
        return None
    axis = node.attrs.get("axis", 0)
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        return None
    n = len(node.outputs)
    if len(node.inputs) > 1 and node.inputs[1].name:
        sizes = shape_value(node.inputs[1], {})
        if sizes is None or sizes.size != n or np.isnan(sizes).any() or sizes.sum() != width:
            return None
        sizes = [int(v) for v in sizes]
    elif "split" in node.attrs:  # opset < 13
        sizes = [int(v) for v in node.attrs["split"]]
        if len(sizes) != n or sum(sizes) != width:
            return None
    else:
        step = -(-width // n)
        sizes = [min(step, width - i * step) for i in range(n)]
        if min(sizes) <= 0:
            return None
    bounds = np.cumsum([0] + sizes)
    return [(int(a), int(b), t) for a, b, t in zip(bounds[:-1], bounds[1:], node.outputs)]


def split_fused(view: GraphView, lin: Linear, parts: int, what: str) -> tuple[Linear, ...]:
    """The `parts` column ranges of fused linear `lin`, in column order, each as a Linear record
    reading through its Slice (or Split output; see the module docstring)."""
    out = view.tensor(lin.output)
    if out.name in view.graph_outputs:
        raise AnalysisError(lin.name, f"the output of fused projection '{lin.name}' is a graph output that the "
                                      "rewrite would change")
    x = view.tensor(lin.input)  # the MatMul by a 2-D weight keeps its input's rank
    rank = len(out.shape) if out.shape is not None else (len(x.shape) if x.shape is not None else None)
    ranges = []  # (start, stop, the Slice/Split node, its output)
    for reader in (c for c in out.outputs if c.op != "Shape"):
        cols = _slice_columns(reader, out, rank, lin.out_features)
        found = [(*cols, reader.outputs[0])] if cols is not None else _split_columns(reader, out, rank, lin.out_features)
        if found is None:
            raise AnalysisError(reader, f"reads the output of '{lin.name}' ({what}), which is neither a separate "
                                        "projection nor cut into projections by Slices (or a Split) of its last axis "
                                        "with static bounds and step 1")
        ranges += [(a, b, reader, t) for a, b, t in found]
    ranges.sort(key=lambda r: r[:2])
    expected = 0
    for start, stop, reader, _ in ranges:
        if start != expected or stop <= start:
            raise AnalysisError(reader, f"takes columns [{start}, {stop}) of fused projection '{lin.name}' ({what}); "
                                        "the Slices must cut its columns into disjoint, contiguous ranges")
        expected = stop
    if len(ranges) != parts or expected != lin.out_features:
        raise AnalysisError(lin.name, f"{what}: expected {parts} Slices covering the {lin.out_features} output "
                                      f"columns of the fused projection, found {len(ranges)} covering {expected}")
    return tuple(replace(lin, output=t.name, out_features=stop - start, columns=(start, stop), fused=lin)
                 for start, stop, _, t in ranges)


def split_packed_qkv(view: GraphView, lin: Linear, attention: gs.Node) -> tuple[tuple[Linear, ...], int]:
    """((q, k, v) column records of fused linear `lin`, head size) for a GroupQueryAttention that
    reads lin's output as its packed QKV input (module docstring)."""
    out = view.tensor(lin.output)
    others = [c for c in out.outputs if c is not attention and c.op != "Shape"]
    if others or out.name in view.graph_outputs:
        raise AnalysisError(others[0] if others else lin.name,
                            f"reads the packed QKV output of '{lin.name}' beside '{attention.name}'; its value "
                            "columns change under the per-head rotation")
    head_dim, ranges = packed_qkv_columns(attention, lin.out_features)
    return tuple(replace(lin, out_features=stop - start, columns=(start, stop), fused=lin)
                 for start, stop in ranges), head_dim
