"""The MLP region: gate and up (the MLP pre-norm's two readers) must reach one linear, down_proj,
through element-wise ops only (SiLU = Sigmoid * x, the gating Mul, GeGLU, onnxruntime's
QuickGelu/FastGelu), mixing in nothing but scalar constants: there a channel permutation of the
intermediate commutes with every op, so it folds into gate/up's output columns and down_proj's
input rows. Whatever else reads an intermediate tensor, or a non-element-wise op inside, is
refused naming the node.
"""
from __future__ import annotations

import numpy as np

from .fused_ops import CONTRIB_ELEMENTWISE
from .fused_slices import split_fused
from .graph import GraphView
from .matching import lossless_cast
from .records import AnalysisError, Linear
from .shapes import constant_shape, producer

NONLINEAR = {"Sigmoid", "Tanh", "Erf", "Relu", "Softplus", "Gelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
             "LeakyRelu", "Mish"} | CONTRIB_ELEMENTWISE  # onnxruntime's fused activations (QuickGelu = SiLU)
ELEMENTWISE = NONLINEAR | {"Neg", "Exp", "Cast", "Identity", "Mul", "Add", "Sub", "Div", "Pow"}


def match_mlp(view: GraphView, layer_index: int, readers: tuple[Linear, ...], writers: list[Linear],
              graph_float: int):
    """(gate, up, down, tensors of the MLP intermediate) of the MLP whose pre-norm `readers` read.
    One reader is a fused gate_up projection (Phi-3): its two column halves, each read through a
    Slice, are gate and up (fused_slices.py)."""
    if len(readers) == 1:
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
        if n.op not in ELEMENTWISE or (n.op == "Cast" and not lossless_cast(n, graph_float)):
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
