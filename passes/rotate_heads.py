"""R2: a per-head rotation on the attention values, fused into v_proj and o_proj.

Invariant: with v' = v H per key-value head (H orthonormal, head_dim x head_dim), every
attention output head becomes o_h H (attention mixes tokens, not channels; grouped-query heads
share their kv head's H), so o_proj's input rows of every query head are left-multiplied by
H^T. v_proj's output columns (and bias) are right-multiplied by blockdiag(H). Logits are
unchanged; the value cache (present.*.value) is stored in the rotated basis.
"""
from __future__ import annotations

from perq_onnx.transforms import Transform

from .base import WEIGHTS_FLOAT, Context, Pass, PassResult


class RotateHeads(Pass):
    requires = (WEIGHTS_FLOAT,)
    ensures = (WEIGHTS_FLOAT,)

    def __init__(self, rotation: Transform):
        self.rotation = rotation  # blockdiag(H_head_dim)

    def run(self, ctx: Context) -> PassResult:
        for layer in ctx.structure.layers:
            for fold in ctx.structure.heads_region(layer).folds:
                ctx.fold(fold, self.rotation)
        return PassResult(f"per-head rotation of size {ctx.structure.head_dim} in "
                          f"{len(ctx.structure.layers)} layers")
