"""Fold RMSNorm gammas into the linear layers that read the norm.

Invariant: norm(x) @ W == (x / rms(x)) @ (diag(gamma) @ W) for every reader W, so removing the
gamma Mul and scaling each reader's weight rows by gamma preserves the function. Each reader gets
its own weight copy (shared initializers are un-shared). Afterwards every norm output is the
gamma-free x / rms(x), which is invariant under an orthogonal change of basis of x.
"""
from __future__ import annotations

from perq_onnx.graph import bypass

from .base import Context, Pass, PassResult


class FoldNormGammas(Pass):
    ensures = frozenset({"gammas_folded"})

    def run(self, ctx: Context) -> PassResult:
        folded = 0
        for norm in ctx.structure.norms:
            gamma = norm.gamma()
            if gamma is None:
                continue
            for reader in norm.readers:
                reader.set_weight(gamma.astype("float64")[:, None] * reader.weight())
            bypass(norm.gamma_node, norm.normalized)
            norm.gamma_node = None
            folded += 1
        return PassResult(folded > 0, f"folded {folded} RMSNorm gammas into their readers")
