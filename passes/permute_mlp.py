"""P3: a channel permutation of each MLP intermediate, folded into the weights.

Invariant: gate/up outputs and everything element-wise after them (SiLU, the gating Mul) commute
with a channel permutation p; so gate/up output columns (and biases) are reordered by p and
down_proj input rows by p, and the MLP output is unchanged while the down_proj input is
x[..., p] -- the order the online block rotation then sees.
"""
from __future__ import annotations

import numpy as np

from .base import Context, Pass, PassResult


class PermuteMLP(Pass):
    ensures = frozenset({"mlp_permuted"})

    def __init__(self, permutations: dict[int, np.ndarray], method: str):
        self.permutations = permutations
        self.method = method

    def run(self, ctx: Context) -> PassResult:
        for layer in ctx.structure.layers:
            p = self.permutations[layer.index]
            for lin in (layer.gate, layer.up):
                lin.set_weight(lin.weight()[:, p])
                if lin.bias_node is not None:
                    lin.set_bias(lin.bias()[p])
            layer.down.set_weight(layer.down.weight()[p, :])
        moved = sum(int((p != np.arange(p.size)).sum()) for p in self.permutations.values())
        return PassResult(moved > 0, f"{self.method} permutation of the MLP intermediate "
                                     f"({moved} channels moved over {len(self.permutations)} layers)")
