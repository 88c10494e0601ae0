"""Fold RMSNorm gammas into the linear layers that read the norm.

Invariant: norm(x) @ W == (x / rms(x)) @ (diag(gamma) @ W) for every reader W, so setting the
gamma to ones and scaling each reader's weight rows by gamma preserves the function. Each reader
gets its own weight copy (shared initializers are un-shared). Afterwards every norm output is the
gamma-free x / rms(x), which is invariant under an orthogonal change of basis of x.

The gamma Mul stays, multiplying by ones, rather than being removed: onnxruntime fuses the
decomposed RMSNorm (Pow, ReduceMean, Add, Sqrt, Div, Mul by a constant) into one
SimplifiedLayerNormalization kernel only when the scale Mul is there (without it, SmolLM2's ort
output kept its 61 norms as five separate ops in onnxruntime's optimized graph). onnxruntime's fused
(Skip)SimplifiedLayerNormalization likewise keeps its scale input, set to ones (see
perq_onnx/fused_ops.py).
"""
from __future__ import annotations

import numpy as np

from perq_onnx.analysis import consumed
from perq_onnx.transforms import Diagonal

from .base import GAMMAS_FOLDED, WEIGHTS_FLOAT, Context, Pass, PassResult, gamma_input


class FoldNormGammas(Pass):
    requires = (WEIGHTS_FLOAT,)
    ensures = (GAMMAS_FOLDED, WEIGHTS_FLOAT)

    def run(self, ctx: Context) -> PassResult:
        folded = 0
        for norm in ctx.structure.norms:
            if norm.gamma is None:
                continue
            index = gamma_input(ctx.node(norm.gamma))
            gamma = ctx.constant(norm.gamma, index)
            for reader in norm.readers:
                ctx.fold(consumed(reader), Diagonal(np.asarray(gamma, dtype=np.float64)))
            ctx.set_constant(norm.gamma, index, np.ones_like(gamma), f"{norm.gamma}.ones")
            folded += 1
        return PassResult(f"folded {folded} RMSNorm gammas into their readers")
