"""Fold RMSNorm gammas into the linear layers that read the norm.

Invariant: norm(x) @ W == (x / rms(x)) @ (diag(gamma) @ W) for every reader W, so removing the
gamma Mul and scaling each reader's weight rows by gamma preserves the function. Each reader gets
its own weight copy (shared initializers are un-shared). Afterwards every norm output is the
gamma-free x / rms(x), which is invariant under an orthogonal change of basis of x.
"""
from __future__ import annotations

import numpy as np

from perq_onnx.analysis import consumed
from perq_onnx.graph import bypass, constant_value
from perq_onnx.transforms import Diagonal

from .base import GAMMAS_FOLDED, WEIGHTS_FLOAT, Context, Pass, PassResult


class FoldNormGammas(Pass):
    requires = (WEIGHTS_FLOAT,)
    ensures = (GAMMAS_FOLDED, WEIGHTS_FLOAT)

    def run(self, ctx: Context) -> PassResult:
        folded = 0
        for norm in ctx.structure.norms:
            if norm.gamma is None:
                continue
            mul = ctx.node(norm.gamma)
            gamma = next(v for v in (constant_value(t) for t in mul.inputs) if v is not None)
            for reader in norm.readers:
                ctx.fold(consumed(reader), Diagonal(np.asarray(gamma, dtype=np.float64)))
            bypass(ctx.graph, mul, ctx.graph.tensors()[norm.normalized])
            folded += 1
        return PassResult(f"folded {folded} RMSNorm gammas into their readers")
