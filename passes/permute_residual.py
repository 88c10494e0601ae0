"""P1: a channel permutation of the whole residual stream, folded offline (the online residual
rotation's PeRQ permutation on post-norm models).

Unlike a rotation, a permutation P commutes with everything per-channel on the stream: RMS is
invariant (rms(xP) = rms(x)) and a gamma Mul becomes a Mul by the permuted gamma, (z P) * (g P) =
(z * g) P. So with x' = x P for every residual tensor: the embedding's columns, every writer's
columns (and bias), every gamma -- the pre-norms', the final norm's and the output norms' (Gemma
2/3, OLMo2) -- are permuted, and every reader's rows (q/k/v, gate/up, lm_head) take P^T; logits
are unchanged, with or without output norms. The permutation is PeRQ's (massdiff by default) on
the calibrated mean |x| of what the readers read, so that the online block Hadamard inserted after
it (rotate_residual_online.py) sees blocks of even l1 mass. It must run before that rotation (the
readers' rows then hold H^T P^T W and read x P H). lm_head gets its own weight, as under R1.
"""
from __future__ import annotations

import numpy as np

from perq_onnx.errors import InternalError
from perq_onnx.transforms import Permutation

from .base import WEIGHTS_FLOAT, Context, Pass, PassResult, gamma_input
from .rotate_residual_online import READERS_UNROTATED


class PermuteResidual(Pass):
    requires = (WEIGHTS_FLOAT, READERS_UNROTATED)
    ensures = (WEIGHTS_FLOAT,)

    def __init__(self, perm: np.ndarray, method: str):
        self.perm = np.asarray(perm)
        self.method = method

    def run(self, ctx: Context) -> PassResult:
        s, t = ctx.structure, Permutation(self.perm)
        for fold in s.residual_region().folds:
            ctx.fold(fold, t)
        output_norms = [n for layer in s.layers for n in (layer.attn_output_norm, layer.mlp_output_norm) if n]
        gammas = [n for n in (*s.norms, *output_norms) if n.gamma is not None]
        for norm in gammas:
            index = gamma_input(ctx.node(norm.gamma))
            gamma = ctx.constant(norm.gamma, index)
            if gamma.shape[-1:] != self.perm.shape:
                raise InternalError(f"node '{norm.gamma}': gamma of shape {gamma.shape} is not one value per channel")
            ctx.set_constant(norm.gamma, index, gamma[..., self.perm], f"{norm.gamma}.permuted")
        moved = int(np.sum(self.perm != np.arange(self.perm.size)))
        return PassResult(f"residual stream permuted ({self.method}, {moved} of {self.perm.size} channels moved): "
                          f"embedding, {len(s.writers)} writers, {len(gammas)} norm gammas, "
                          f"{len(s.readers())} readers incl. lm_head")
