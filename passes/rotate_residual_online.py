"""The online residual rotation: R1's place on post-norm models (Gemma 2/3, OLMo2).

R1 folds a rotation Q of the residual stream into the weights offline, which an output norm with
a per-channel gamma forbids (post_norms.py). The readers' *inputs* can be rotated all the same:
at each pre-norm's output (the tensor q/k/v, or gate/up, read; the gamma stays in the norm) an
online rotation R is inserted and R^T folded into the readers' rows (OnlineRotationPass, shared
with R3). Invariant: norm(x) @ W == (norm(x) @ R) @ (R^T @ W) for orthogonal R, for every reader W;
the residual stream, the norms and the output norms are untouched, so it is exact on any decoder,
and the activation quantizer at q/k/v and gate/up sees rotated inputs. R is blockdiag(H_b), one
``perq.BlockHadamard(block_size=b)`` node per norm (two per layer), or the full Hadamard of the
hidden size as a MatMul. lm_head is left alone: its input is not quantized. With a block, the
pipeline first permutes the whole stream offline (permute_residual.py: PeRQ's permutation, which,
unlike R, commutes with per-channel gammas), so that the blocks carry even l1 mass.
"""
from __future__ import annotations

from typing import Sequence

from perq_onnx.analysis import Linear

from .base import ONLINE_ROTATED, WEIGHTS_FLOAT, Condition, Context
from .online_rotation import OnlineRotationPass


def _pre_norms(ctx: Context):
    return [norm for layer in ctx.structure.layers for norm in (layer.input_norm, layer.mlp_norm)]


def _readers_read_norms(ctx: Context) -> str | None:
    for norm in _pre_norms(ctx):
        for lin in norm.readers:
            if ctx.node(lin.name).inputs[0].name != lin.input:
                return f"'{lin.name}' no longer reads the output of its norm '{norm.name}'"
    return None


def _readers_rotated(ctx: Context) -> str | None:
    for norm in _pre_norms(ctx):
        for lin in norm.readers:
            if ctx.node(lin.name).inputs[0].name not in ctx.recorded(ONLINE_ROTATED):
                return f"'{lin.name}' does not read an online rotation of its norm '{norm.name}'"
    return None


READERS_UNROTATED = Condition("the residual readers read their norms' outputs", _readers_read_norms)
READERS_ROTATED = Condition("every residual reader reads an online rotation", _readers_rotated)


class RotateResidualOnline(OnlineRotationPass):
    requires = (WEIGHTS_FLOAT, READERS_UNROTATED)
    ensures = (WEIGHTS_FLOAT, READERS_ROTATED)
    constant_name = "online_residual_rotation.hadamard"

    def groups(self, ctx: Context) -> list[Sequence[Linear]]:
        return [norm.readers for norm in _pre_norms(ctx)]

    def summary(self, rotation: str, groups) -> str:
        return (f"online {rotation} at {len(groups)} residual reader inputs ({sum(map(len, groups))} linears: "
                "q/k/v, gate/up), transposes folded into their rows; the residual stream stays unrotated")
