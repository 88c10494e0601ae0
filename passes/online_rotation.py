"""R3: the online rotation at each down_proj input, with its transpose folded into down_proj.

Invariant: y = x @ W_down == (x @ R) @ (R^T @ W_down) for orthogonal R. For a block size b, R is
blockdiag(H_b), emitted as one node ``perq.BlockHadamard(block_size=b)`` (how it appears in the
output -- model-local function, inlined, or a runtime op -- is the target's business); for the
full-vector reference point, a MatMul by the full orthonormal matrix of the intermediate size.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from perq_onnx.analysis import consumed
from perq_onnx.functions import BLOCK_HADAMARD, DOMAIN
from perq_onnx.transforms import Transform

from .base import (NO_ONLINE_ROTATION, ONLINE_ROTATED, ONLINE_ROTATION, WEIGHTS_FLOAT, Context, Pass,
                   PassResult, online_rotation_node)


class InsertOnlineRotation(Pass):
    requires = (WEIGHTS_FLOAT, NO_ONLINE_ROTATION)
    ensures = (WEIGHTS_FLOAT, ONLINE_ROTATION)

    def __init__(self, rotation: Transform, block: int | None):
        self.rotation = rotation
        self.block = block  # None = full-vector rotation (a MatMul by rotation's matrix)

    def run(self, ctx: Context) -> PassResult:
        m = ctx.structure.intermediate_size
        dtype = ctx.weight(ctx.structure.layers[0].down).dtype
        full = None if self.block else ctx.store.constant("online_rotation.hadamard",
                                                          self.rotation.matrix(m).astype(dtype))
        for layer in ctx.structure.layers:
            down = ctx.node(layer.down.name)
            x = down.inputs[0]
            rotated = gs.Variable(f"{layer.down.name}/online_rotation_output", dtype=x.dtype)
            name = online_rotation_node(layer.down)
            if self.block:
                node = gs.Node(BLOCK_HADAMARD, name, {"block_size": self.block}, [x], [rotated], domain=DOMAIN)
            else:
                node = gs.Node("MatMul", name, inputs=[x, full], outputs=[rotated])
            ctx.add(node)
            ctx.record(ONLINE_ROTATED, rotated.name)
            down.inputs[0] = rotated
            ctx.fold(consumed(layer.down), self.rotation)
        kind = f"block Hadamard b={self.block}" if self.block else f"full rotation of size {m}"
        return PassResult(f"online {kind} at {len(ctx.structure.layers)} down_proj inputs")
