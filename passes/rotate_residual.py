"""R1: an orthogonal change of basis Q of the residual stream, fused into the weights.

Invariant (after gammas are folded): with x' = x Q for every residual tensor,
embedding E -> E Q; every writer (o_proj, down_proj) W -> W Q and its bias b -> b Q; every reader
(q/k/v, gate/up, lm_head) W -> Q^T W. RMSNorm without gamma commutes with Q (rms(xQ) = rms(x)),
so logits are unchanged. Q is a full Hadamard (``full``) or P * blockdiag(H_b) with a
calibrated channel permutation P (``block``). lm_head gets its own weight, so tied embeddings
are untied.
"""
from __future__ import annotations

import numpy as np

from perq_onnx.graph import constant_value, set_constant_input

from .base import Context, Pass, PassResult


class RotateResidual(Pass):
    requires = frozenset({"gammas_folded"})
    ensures = frozenset({"residual_rotated"})

    def __init__(self, rotation: np.ndarray, description: str):
        self.rotation = rotation.astype(np.float64)
        self.description = description

    def run(self, ctx: Context) -> PassResult:
        q = self.rotation
        s = ctx.structure
        emb = s.embedding
        set_constant_input(emb, 0, (constant_value(emb.inputs[0]).astype(np.float64) @ q).astype(np.float32),
                           "embed_tokens.weight")
        for writer in s.writers:
            writer.set_weight(writer.weight().astype(np.float64) @ q)
            if writer.bias_node is not None:
                writer.set_bias(writer.bias().astype(np.float64) @ q)
        for reader in s.readers():
            reader.set_weight(q.T @ reader.weight().astype(np.float64))
        return PassResult(True, f"residual stream rotated ({self.description}), "
                                f"{len(s.writers)} writers and {len(s.readers())} readers")
