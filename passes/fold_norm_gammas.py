"""Fold RMSNorm gammas into the linear layers that read the norm.

Invariant: norm(x) @ W == (x / rms(x)) @ (diag(gamma) @ W) for every reader W, so removing the
gamma Mul and scaling each reader's weight rows by gamma preserves the function. Each reader gets
its own weight copy (shared initializers are un-shared). Afterwards every norm output is the
gamma-free x / rms(x), which is invariant under an orthogonal change of basis of x.
onnxruntime's fused (Skip)SimplifiedLayerNormalization stays in the graph with its scale input set
to ones (epsilon unchanged); see perq_onnx/fused_ops.py.
"""
from __future__ import annotations

import numpy as np

from perq_onnx.analysis import consumed
from perq_onnx.fused_ops import fused_gamma_input
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
            if (index := fused_gamma_input(mul)) is not None:
                # onnxruntime's (Skip)SimplifiedLayerNormalization: the op stays, its scale becomes ones
                gamma = ctx.constant(norm.gamma, index)
                for reader in norm.readers:
                    ctx.fold(consumed(reader), Diagonal(np.asarray(gamma, dtype=np.float64)))
                ctx.set_constant(norm.gamma, index, np.ones_like(gamma), f"{norm.gamma}.scale")
                folded += 1
                continue
            gamma = next(v for v in (constant_value(t) for t in mul.inputs) if v is not None)
            for reader in norm.readers:
                ctx.fold(consumed(reader), Diagonal(np.asarray(gamma, dtype=np.float64)))
            bypass(ctx.graph, mul, ctx.graph.tensors()[norm.normalized])
            folded += 1
        return PassResult(f"folded {folded} RMSNorm gammas into their readers")
