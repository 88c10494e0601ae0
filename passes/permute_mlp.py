"""P3: a channel permutation of each MLP intermediate, folded into the weights.

Invariant: gate/up outputs and everything element-wise after them (SiLU, the gating Mul) commute
with a channel permutation p; so gate/up output columns (and biases) are reordered by p and
down_proj input rows by p, and the MLP output is unchanged while the down_proj input is
x[..., p] -- the order the online block rotation then sees. It must run before R3 (which
changes what down_proj's rows mean).
"""
from __future__ import annotations

import numpy as np

from perq_onnx.transforms import Permutation

from .base import NO_ONLINE_ROTATION, WEIGHTS_FLOAT, Context, Pass, PassResult


class PermuteMLP(Pass):
    requires = (WEIGHTS_FLOAT, NO_ONLINE_ROTATION)
    ensures = (WEIGHTS_FLOAT, NO_ONLINE_ROTATION)

    def __init__(self, permutations: dict[int, np.ndarray], method: str):
        self.permutations = permutations
        self.method = method

    def run(self, ctx: Context) -> PassResult:
        for layer in ctx.structure.layers:
            t = Permutation(self.permutations[layer.index])
            for fold in ctx.structure.mlp_region(layer).folds:
                ctx.fold(fold, t)
        moved = sum(int((p != np.arange(p.size)).sum()) for p in self.permutations.values())
        return PassResult(f"{self.method} permutation of the MLP intermediate "
                          f"({moved} channels moved over {len(self.permutations)} layers)")
