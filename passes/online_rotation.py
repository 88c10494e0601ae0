"""R3: the online rotation at each down_proj input, with its transpose folded into down_proj.

Invariant: y = x @ W_down == (x @ R) @ (R^T @ W_down) for orthogonal R. For a block size b, R is
blockdiag(H_b), emitted as one node ``perq.BlockHadamard(block_size=b)`` (how it appears in the
output -- model-local function, inlined, or a runtime op -- is the target's business); for the
full-vector reference point, a MatMul by the full orthonormal matrix of the intermediate size.

``OnlineRotator`` inserts such a rotation in front of any group of linears that read one tensor
and folds R^T into their rows; R3 uses it at down_proj, the online residual rotation
(rotate_residual_online.py) at the residual stream's readers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from perq_onnx.analysis import Linear, consumed
from perq_onnx.errors import PerqError
from perq_onnx.functions import BLOCK_HADAMARD, DOMAIN
from perq_onnx.transforms import Transform

from .base import (NO_ONLINE_ROTATION, ONLINE_ROTATED, ONLINE_ROTATION, WEIGHTS_FLOAT, Context, Pass,
                   PassResult, online_rotation_node)


class OnlineRotator:
    """Inserts the online rotation x -> x @ R (R = `rotation` of `size` channels: blockdiag(H_b)
    as one BlockHadamard node when `block` is given, else a MatMul by R's matrix, one constant
    shared by every insertion) in front of linears and folds R^T into their weight rows."""

    def __init__(self, ctx: Context, rotation: Transform, block: int | None, size: int, dtype: np.dtype,
                 constant_name: str):
        self.rotation, self.block, self.size = rotation, block, size
        self.full = None if block else ctx.store.constant(constant_name, rotation.matrix(size).astype(dtype))

    @property
    def description(self) -> str:
        return f"block Hadamard b={self.block}" if self.block else f"full rotation of size {self.size}"

    def insert(self, ctx: Context, linears: Sequence[Linear]) -> gs.Variable:
        """Rotate the one tensor that all `linears` read (named after the first) and fold R^T into
        each one's rows; the rotated tensor is recorded as ONLINE_ROTATED. Linears that do not
        read one tensor are refused, naming the odd one."""
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
            node = gs.Node("MatMul", name, inputs=[x, self.full], outputs=[rotated])
        ctx.add(node)
        ctx.record(ONLINE_ROTATED, rotated.name)
        for lin in linears:
            ctx.node(lin.name).inputs[0] = rotated
            ctx.fold(consumed(lin), self.rotation)
        return rotated


class InsertOnlineRotation(Pass):
    requires = (WEIGHTS_FLOAT, NO_ONLINE_ROTATION)
    ensures = (WEIGHTS_FLOAT, ONLINE_ROTATION)

    def __init__(self, rotation: Transform, block: int | None):
        self.rotation = rotation
        self.block = block  # None = full-vector rotation (a MatMul by rotation's matrix)

    def run(self, ctx: Context) -> PassResult:
        s = ctx.structure
        rotator = OnlineRotator(ctx, self.rotation, self.block, s.intermediate_size, ctx.weight(s.layers[0].down).dtype,
                                "online_rotation.hadamard")
        for layer in s.layers:
            rotator.insert(ctx, [layer.down])
        return PassResult(f"online {rotator.description} at {len(s.layers)} down_proj inputs")
