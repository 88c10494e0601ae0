"""Refusals that need the whole structure: the graph's float type (bfloat16 is refused), tensors
the rewrite changes that are graph outputs, and weights the rewrite changes that are also graph
inputs. The matchers (residual.py, norms.py, post_norms.py, mlp.py, heads.py, fused_slices.py,
fused_ops.py) refuse what they find unexpected where they find it, naming the node.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .fused_ops import fused_gamma_input
from .graph import GraphView
from .matching import float_type
from .records import AnalysisError, DecoderStructure
from .shapes import constant_shape, producer


def refuse_changed_outputs(graph: gs.Graph, changed: set[str], value_caches: set[str]) -> None:
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


def refuse_overridable(view: GraphView, structure: DecoderStructure) -> None:
    """A weight the rewrite changes must not be a graph input as well (an initializer that
    callers may override at run time)."""
    folds = [f for r in structure.regions() for f in r.folds]
    inputs = [(f.node, f.input) for f in folds] + [(f.bias, f.bias_index) for f in folds if f.bias]
    inputs += [(n.gamma, i) for n in structure.norms if n.gamma for i in (0, 1)]
    inputs += [(n.gamma, fused_gamma_input(view.by_name[n.gamma])) for n in structure.norms
               if n.gamma and fused_gamma_input(view.by_name[n.gamma]) == 2]  # Skip's gamma
    for node, index in inputs:
        source = _source_constant(view.by_name[node].inputs[index])
        if source.name in view.graph_inputs:
            raise AnalysisError(node, f"its constant '{source.name}' is also a graph input (overridable at "
                                      "run time), so it cannot be rewritten")


def graph_float_type(embedding: gs.Node) -> int:
    """The graph's float type (its embedding table's); bfloat16 is refused."""
    kind = float_type(constant_shape(embedding.inputs[0])[1])
    if kind == 16:
        raise AnalysisError(embedding, "the model is bfloat16: onnxruntime's CPU provider has no bfloat16 "
                                       "MatMul/Mul/Add kernels, so perq-onnx can neither calibrate nor check the "
                                       "rewrite; export the model in float32 or float16")
    return kind
