"""RMSNorm matching: the decomposed form optimum exports (Pow/Mul -> ReduceMean over the last
axis -> Add eps -> Sqrt -> Div/Reciprocal -> Mul, optional lossless Cast, gamma Mul, optional Cast)
and the linears reading a norm's output. onnxruntime's fused norms are matched where they sit on
the residual stream (residual.py); output norms reuse match_rmsnorm (post_norms.py).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .matching import as_linear, lossless_cast, other, scalar, single
from .records import AnalysisError, Linear, RMSNorm
from .shapes import constant_value


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


def match_rmsnorm(x: gs.Tensor, graph_float: int, readers: bool = True) -> tuple[RMSNorm, set[str]]:
    """(the decomposed RMSNorm that reads residual tensor x, the tensors inside it that a rotation
    of x changes); readers=False: an output norm, whose output is not read by linears (see
    post_norms.py). `graph_float`: the graph's float type (which Casts are lossless)."""
    squares = [c for c in x.outputs if (c.op == "Pow" and scalar(c.inputs[1]) == 2.0 and c.inputs[0] is x)
               or (c.op == "Mul" and c.inputs[0] is x and c.inputs[1] is x)]
    if len(squares) != 1:
        raise AnalysisError(x.outputs[0] if x.outputs else x.name, "reads the residual stream but is not an RMSNorm")
    sq = squares[0]
    mean = single(sq.outputs[0].outputs, sq, "ReduceMean after the square")
    if mean.op != "ReduceMean":
        raise AnalysisError(mean, "expected ReduceMean over the hidden axis in an RMSNorm")
    _check_last_axis_mean(mean, x)
    add = single(mean.outputs[0].outputs, mean, "epsilon Add")
    sqrt = single(add.outputs[0].outputs, add, "Sqrt")
    if add.op != "Add" or scalar(other(add, mean.outputs[0])) is None or sqrt.op != "Sqrt":
        raise AnalysisError(add, "expected Add(epsilon) -> Sqrt in an RMSNorm")
    nodes = {sq.name, mean.name, add.name, sqrt.name}
    step = single(sqrt.outputs[0].outputs, sqrt, "reciprocal or division")
    if step.op == "Div" and step.inputs[0] is x:
        normalize = step
    else:
        if not ((step.op == "Div" and scalar(step.inputs[0]) == 1.0) or step.op == "Reciprocal"):
            raise AnalysisError(step, "expected 1/sqrt(mean(x^2)+eps) in an RMSNorm")
        nodes.add(step.name)
        normalize = single(step.outputs[0].outputs, step, "Mul by the inverse RMS")
        if normalize.op != "Mul" or x not in normalize.inputs:
            raise AnalysisError(normalize, "expected x * (1/rms) in an RMSNorm")
    nodes.add(normalize.name)
    normalized = normalize.outputs[0]
    nxt = [c for c in normalized.outputs if c.op != "Shape"]
    if len(nxt) == 1 and lossless_cast(nxt[0], graph_float):
        nodes.add(nxt[0].name)
        normalized = nxt[0].outputs[0]
        nxt = [c for c in normalized.outputs if c.op != "Shape"]
    gamma = None
    if len(nxt) == 1 and nxt[0].op == "Mul":
        g = constant_value(other(nxt[0], normalized))
        if g is not None and g.ndim == 1:
            gamma = nxt[0]
            nodes.add(gamma.name)
    output = gamma.outputs[0] if gamma is not None else normalized
    changed = {normalize.outputs[0].name, normalized.name, output.name}
    nxt = [c for c in output.outputs if c.op != "Shape"]
    if gamma is not None and len(nxt) == 1 and lossless_cast(nxt[0], graph_float):  # OLMo2: (gamma * x).to(dtype)
        nodes.add(nxt[0].name)
        output = nxt[0].outputs[0]
        changed.add(output.name)
    return RMSNorm(x.name, normalized.name, gamma.name if gamma else None, frozenset(nodes),
                   readers_of(output, gamma.name if gamma else normalized.name) if readers else ()), changed


def readers_of(output: gs.Tensor, norm_name: str) -> tuple[Linear, ...]:
    """The linears reading a norm's output; anything else reading it is refused."""
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
