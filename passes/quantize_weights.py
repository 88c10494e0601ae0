"""INT-n weight quantization as standard QDQ: int4/int8 initializer -> DequantizeLinear -> MatMul.

Symmetric, zero-point free (what TensorRT wants). Granularity: per output channel (scale [out],
axis 1) or per group of g input rows (scale [in/g, out], axis 0, block_size g). Each scale is
alpha * max|w| / qmax with alpha chosen per channel/group by a coarse-to-fine search that
minimises the squared rounding error. lm_head and embeddings stay float. The function changes
by the rounding only; ``metrics`` reports each weight's relative error ||W - Q(W)||^2 / ||W||^2.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
import torch

from perq_onnx.errors import PerqError

from .base import WEIGHTS_FLOAT, WEIGHTS_QUANTIZED, Context, Pass, PassResult

WEIGHT_TYPES = {4: ml_dtypes.int4, 8: np.int8}


def _search(w: torch.Tensor, amax: torch.Tensor, qmax: int, alphas: torch.Tensor):
    """Best alpha per column of amax for each candidate in alphas (shape [k, 1, 1, out] or
    broadcastable); returns (alpha, err)."""
    best_err = torch.full_like(amax, float("inf"))
    best_alpha = torch.ones_like(amax)
    for alpha in alphas:
        scale = alpha * amax / qmax
        err = ((torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale - w) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_alpha = torch.where(better, alpha * torch.ones_like(amax), best_alpha)
    return best_alpha, best_err


def quantize_weight(w: np.ndarray, bits: int, group: int | None = None):
    """Return (codes [in, out] int, scale, relative error) for w [in, out]."""
    rows, cols = w.shape
    g = group or rows
    if rows % g:
        raise PerqError(f"weight group size {g} does not divide {rows} input channels")
    qmax = 2 ** (bits - 1) - 1
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(rows // g, g, cols)
    amax = wt.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    coarse, _ = _search(wt, amax, qmax, torch.linspace(1.0, 0.2, 17))
    step = 0.05
    fine = [coarse + step * k / 5 for k in range(-5, 6)]
    alpha, _ = _search(wt, amax, qmax, [torch.clamp(f, 0.05, 1.0) for f in fine])
    scale = (alpha * amax / qmax).to(torch.float32)
    codes = torch.clamp(torch.round(wt / scale), -qmax - 1, qmax)
    err = float(((codes * scale - wt) ** 2).sum() / (wt**2).sum().clamp_min(1e-30))
    return codes.reshape(rows, cols).numpy().astype(np.int8), scale.reshape(rows // g, cols).numpy(), err


class QuantizeWeights(Pass):
    requires = (WEIGHTS_FLOAT,)
    ensures = (WEIGHTS_QUANTIZED,)

    def __init__(self, bits: int, group: int | None = None):
        if bits not in WEIGHT_TYPES:
            raise PerqError(f"--w-bits {bits}: choose 4, 8 or 16 (16 = float weights)")
        self.bits, self.group = bits, group

    def run(self, ctx: Context) -> PassResult:
        errors = {}
        for layer in ctx.structure.layers:
            for kind, lin in layer.linears().items():
                codes, scale, err = quantize_weight(ctx.weight(lin), self.bits, self.group)
                errors[f"layers.{layer.index}.{kind}"] = err
                name = lin.name + ".weight"
                q = ctx.store.constant(name + ".quantized", codes.astype(WEIGHT_TYPES[self.bits]))
                attrs = {"axis": 1} if self.group is None else {"axis": 0, "block_size": self.group}
                s = ctx.store.constant(name + ".scale", scale[0] if self.group is None else scale)
                deq = gs.Variable(name + ".dequantized", dtype=np.float32)
                ctx.add(gs.Node("DequantizeLinear", lin.name + "/weight_dq", attrs, [q, s], [deq]))
                ctx.node(lin.name).inputs[1] = deq
        ctx.min_opset = max(ctx.min_opset or 0, 21)
        gran = "per output channel" if self.group is None else f"per group of {self.group}"
        return PassResult(f"INT{self.bits} weights ({gran}, MSE-searched scales) on {len(errors)} linears",
                          {"weight_rel_error": errors})
