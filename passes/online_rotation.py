"""R3: the online rotation at each down_proj input, with its transpose folded into down_proj.

Invariant: y = x @ W_down == (x @ R) @ (R^T @ W_down) for orthogonal R. For a block size b, R is
blockdiag(H_b), emitted as one node ``perq.BlockHadamard(block_size=b)`` (how it appears in the
output -- model-local function, inlined, or a runtime op -- is the target's business); for the
full-vector reference point, a MatMul by the full orthonormal matrix of the intermediate size.

``OnlineRotationPass`` inserts such a rotation in front of any groups of linears that each read
one tensor and folds R^T into their rows; R3 is one at down_proj, the online residual rotation
(rotate_residual_online.py) one at the residual stream's readers.
"""
from __future__ import annotations

from typing import Sequence

import onnx_graphsurgeon as gs

from perq_onnx.analysis import Linear, consumed
from perq_onnx.errors import PerqError
from perq_onnx.functions import BLOCK_HADAMARD, DOMAIN
from perq_onnx.transforms import Transform

from .base import (NO_ONLINE_ROTATION, ONLINE_ROTATED, ONLINE_ROTATION, WEIGHTS_FLOAT, Context, Pass,
                   PassResult, online_rotation_node)


class OnlineRotationPass(Pass):
    """x -> x @ R in front of each group of linears (``groups``), R^T folded into their rows. R is
    blockdiag(H_b) as one BlockHadamard node when `block` is given, else a MatMul by R's matrix
    (one constant, ``constant_name``, shared by every group)."""
    constant_name = "online_rotation.hadamard"

    def __init__(self, rotation: Transform, block: int | None):
        self.rotation = rotation
        self.block = block  # None = full-vector rotation (a MatMul by rotation's matrix)

    def groups(self, ctx: Context) -> list[Sequence[Linear]]:  # pragma: no cover - interface
        raise NotImplementedError

    def summary(self, rotation: str, groups: list[Sequence[Linear]]) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, ctx: Context) -> PassResult:
        groups = self.groups(ctx)
        first = groups[0][0]
        full = None if self.block else ctx.store.constant(
            self.constant_name, self.rotation.matrix(first.in_features).astype(ctx.weight(first).dtype))
        for linears in groups:
            self.insert(ctx, linears, full)
        kind = f"block Hadamard b={self.block}" if self.block else f"full rotation of size {first.in_features}"
        return PassResult(self.summary(kind, groups))

    def insert(self, ctx: Context, linears: Sequence[Linear], full: gs.Constant | None) -> None:
        """Rotate the one tensor that all `linears` read (named after the first), fold R^T into
        each one's rows, record the rotated tensor as ONLINE_ROTATED. Linears that do not read one
        tensor are refused, naming the odd one."""
        first = linears[0]
        x = ctx.node(first.name).inputs[0]
        for lin in linears[1:]:
            if ctx.node(lin.name).inputs[0] is not x:
                raise PerqError(f"node '{lin.name}': reads '{ctx.node(lin.name).inputs[0].name}', not "
                                f"'{x.name}' as '{first.name}' does; one online rotation cannot serve both")
        rotated = gs.Variable(f"{first.name}/online_rotation_output", dtype=x.dtype)
        name = online_rotation_node(first)
        if self.block:
            node = gs.Node(BLOCK_HADAMARD, name, {"block_size": self.block}, [x], [rotated], domain=DOMAIN)
        else:
            node = gs.Node("MatMul", name, inputs=[x, full], outputs=[rotated])
        ctx.add(node)
        ctx.record(ONLINE_ROTATED, rotated.name)
        for lin in linears:
            ctx.node(lin.name).inputs[0] = rotated
            ctx.fold(consumed(lin), self.rotation)


class InsertOnlineRotation(OnlineRotationPass):
    requires = (WEIGHTS_FLOAT, NO_ONLINE_ROTATION)
    ensures = (WEIGHTS_FLOAT, ONLINE_ROTATION)

    def groups(self, ctx: Context) -> list[Sequence[Linear]]:
        return [[layer.down] for layer in ctx.structure.layers]

    def summary(self, rotation: str, groups) -> str:
        return f"online {rotation} at {len(groups)} down_proj inputs"
