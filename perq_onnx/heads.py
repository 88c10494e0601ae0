"""The heads region: v_proj is the attention pre-norm's reader that feeds the value input of the
probabilities @ V MatMul (or of onnxruntime's GroupQueryAttention / MultiHeadAttention) without
being an ancestor of the probabilities; from there only layout ops (Reshape, Transpose, Concat
with past values, Unsqueeze/Expand for GQA) reach o_proj, keeping the channel axis innermost and
whole -- so a per-head rotation of v's columns commutes with all of them and folds into o_proj's
rows. The head size is read from the Reshape after v_proj (shapes.py) or the fused op's
head counts. onnxruntime-genai's builder feeds one qkv_proj output whole to GroupQueryAttention
(packed QKV): v is then the V column range of that weight (fused_slices.split_packed_qkv), and the
attention's output reaches o_proj the same way.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .fused_ops import attention_head_dim, is_fused_attention, is_packed_qkv, present_value, value_input
from .fused_slices import split_fused, split_packed_qkv
from .graph import GraphView
from .matching import lossless_cast
from .records import AnalysisError, Linear
from .shapes import constant_shape, constant_value, producer, reshape_last_dim

HEAD_LAYOUT = {"Reshape", "Transpose", "Concat", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Add"}


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


def _keeps_last_axis(node: gs.Node, graph_float: int) -> bool:
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
        return lossless_cast(node, graph_float)
    return True


def _value_path(view: GraphView, v: Linear, graph_float: int):
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
            if is_fused_attention(node) and value_input(node, t):
                pv = node  # GroupQueryAttention / MultiHeadAttention: t is its value input
                head_dim = head_dim or attention_head_dim(node, v.out_features)
                continue
            if node.op not in HEAD_LAYOUT or (node.op != "Concat" and node.inputs[0] is not t) \
                    or (node.op == "Add" and node.name != v.bias):
                return None, None, None, node
            seen.add(node.name)
            if node.op == "Reshape":
                last = reshape_last_dim(node)
                if head_dim is None:
                    head_dim = last
                elif last != head_dim:
                    return None, None, None, node  # a reshape that splits or merges the head channels
            if not _keeps_last_axis(node, graph_float):
                return None, None, None, node
            frontier.extend(node.outputs)
            path |= {o.name for o in node.outputs}
    return pv, head_dim, path, None


def match_attention(view: GraphView, layer_index: int, readers: tuple[Linear, ...], writers: list[Linear],
                    graph_float: int):
    """(q, k, v, o, head size, tensors between v_proj and o_proj) of the attention whose pre-norm
    `readers` read. One reader is a fused qkv projection (Phi-3): its three column slices, each
    read through a Slice (fused_slices.py)."""
    packed = _packed_attention(view, readers)
    if packed is not None:  # onnxruntime-genai's builder: GroupQueryAttention reads qkv_proj whole
        readers, pv, head_dim = packed
        v, path = readers[2], {readers[2].output}
    else:
        readers, (v, pv, head_dim, path) = _separate_values(view, layer_index, readers, graph_float)
        readers = (*(r for r in readers if r is not v), v)
    o = next((w for w in writers if w.name in view.descendants(pv)
              and all(n.op in ("Transpose", "Reshape", "Identity", "Cast") and _keeps_last_axis(n, graph_float)
                      for n in view.between(pv, view.by_name[w.name]))), None)
    if o is None:
        raise AnalysisError(pv, f"layer {layer_index}: softmax @ V does not reach o_proj through Transpose/Reshape "
                                "that keep the head channels innermost")
    if not head_dim or v.out_features % head_dim or o.in_features % head_dim:
        raise AnalysisError(v.name, f"layer {layer_index}: cannot read a head size from the Reshape after v_proj")
    path |= {t.name for n in view.between(pv, view.by_name[o.name]) for t in n.outputs} | {pv.outputs[0].name}
    if is_fused_attention(pv) and present_value(pv) is not None:
        path.add(present_value(pv).name)  # the value cache, in the rotated basis
    q, k = readers[:2]
    return q, k, v, o, head_dim, path


def _packed_attention(view: GraphView, readers: tuple[Linear, ...]):
    """((q, k, v), the GroupQueryAttention, head size) when the one reader's output is the packed
    QKV input of a GroupQueryAttention (fused_slices.split_packed_qkv), else None."""
    if len(readers) != 1:
        return None
    out = view.tensor(readers[0].output)
    attention = next((c for c in out.outputs if is_packed_qkv(c, out)), None)
    if attention is None:
        return None
    parts, head_dim = split_packed_qkv(view, readers[0], attention)
    return parts, attention, head_dim


def _separate_values(view: GraphView, layer_index: int, readers: tuple[Linear, ...], graph_float: int):
    """(the q/k/v records, (v, the probabilities @ V MatMul or fused attention, head size, value
    path)) of the `readers` (one fused qkv projection: its three column slices, fused_slices.py)."""
    if len(readers) == 1:
        readers = split_fused(view, readers[0], 3, f"the attention of layer {layer_index} (qkv)")
    if len(readers) != 3:
        raise AnalysisError(readers[0].name if readers else f"layers.{layer_index}",
                            f"the attention norm of layer {layer_index} has {len(readers)} readers; expected q, k, v")
    found, blocked = [], []
    for reader in readers:
        pv, head_dim, path, blocking = _value_path(view, reader, graph_float)
        if pv is not None:
            found.append((reader, pv, head_dim, path))
        elif blocking is not None:
            blocked.append(blocking)
    if len(found) != 1:
        node = blocked[0] if blocked else readers[0].name
        raise AnalysisError(node, f"layer {layer_index}: expected exactly one of q/k/v to reach softmax @ V through "
                                  f"layout ops only (per-head rotation needs that), found {len(found)}")
    return readers, found[0]
