"""R2: a per-head Hadamard on the attention values, fused into v_proj and o_proj.

Invariant: with v' = v H per key-value head (H orthonormal, head_dim x head_dim), every
attention output head becomes o_h H (attention mixes tokens, not channels; grouped-query heads
share their kv head's H), so o_proj's input rows of every query head are left-multiplied by
H^T. v_proj's output columns (and bias) are right-multiplied by blockdiag(H). Logits are
unchanged; the value cache (present.*.value) is stored in the rotated basis.
"""
from __future__ import annotations

import numpy as np

from perq_onnx.hadamard import block_diagonal, orthogonal

from .base import Context, Pass, PassResult


class RotateHeads(Pass):
    ensures = frozenset({"heads_rotated"})

    def __init__(self, random_seed: int | None = None):
        self.random_seed = random_seed

    def run(self, ctx: Context) -> PassResult:
        for layer in ctx.structure.layers:
            h = orthogonal(layer.head_dim, self.random_seed)
            v_rot = block_diagonal(h, layer.v.shape[1])
            layer.v.set_weight(layer.v.weight().astype(np.float64) @ v_rot)
            if layer.v.bias_node is not None:
                layer.v.set_bias(layer.v.bias().astype(np.float64) @ v_rot)
            o_rot = block_diagonal(h, layer.o.shape[0])
            layer.o.set_weight(o_rot.T @ layer.o.weight().astype(np.float64))
        return PassResult(True, f"per-head rotation of size {ctx.structure.layers[0].head_dim} in "
                                f"{len(ctx.structure.layers)} layers")
