"""R1: an orthogonal change of basis Q of the residual stream, fused into the weights.

Invariant (after gammas are folded): with x' = x Q for every residual tensor,
embedding E -> E Q; every writer (o_proj, down_proj) W -> W Q and its bias b -> b Q; every reader
(q/k/v, gate/up, lm_head) W -> Q^T W. RMSNorm without gamma commutes with Q (rms(xQ) = rms(x)),
so logits are unchanged. Q is a full Hadamard or P * blockdiag(H_b) with a calibrated channel
permutation P (see plan.py). The residual region's folds name every slice; lm_head gets its own
weight, so tied embeddings are untied.

Output norms (an RMSNorm between a writer and its residual Add: Gemma 2/3, OLMo2) keep this exact
only when their gamma is uniform: rms(yQ) = rms(y), but a per-channel gamma does not commute with
Q. The analysis then sets ``residual_blocker`` (see post_norms.py), the pipeline skips this pass,
and running it anyway fails its precondition.
"""
from __future__ import annotations

from perq_onnx.transforms import Transform

from .base import GAMMAS_FOLDED, WEIGHTS_FLOAT, Condition, Context, Pass, PassResult


def _residual_rotatable(ctx: Context) -> str | None:
    return ctx.structure.residual_blocker


RESIDUAL_ROTATABLE = Condition("a residual rotation is exact for this structure", _residual_rotatable)


class RotateResidual(Pass):
    requires = (GAMMAS_FOLDED, WEIGHTS_FLOAT, RESIDUAL_ROTATABLE)
    ensures = (WEIGHTS_FLOAT,)

    def __init__(self, rotation: Transform, description: str):
        self.rotation = rotation
        self.description = description

    def run(self, ctx: Context) -> PassResult:
        region = ctx.structure.residual_region()
        for fold in region.folds:
            ctx.fold(fold, self.rotation)
        s = ctx.structure
        return PassResult(f"residual stream rotated ({self.description}), "
                          f"{len(s.writers)} writers and {len(s.readers())} readers")
