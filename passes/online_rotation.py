"""R3: the online rotation at each down_proj input, with its transpose folded into down_proj.

Invariant: y = x @ W_down == (x @ R) @ (R^T @ W_down) for orthogonal R. R is blockdiag(H_b),
emitted as one node ``perq.BlockHadamard(block_size=b)`` whose model-local function body
(Reshape -> MatMul(H_b) -> Reshape) lets any onnxruntime run it; or, for ``full``, a MatMul by the
full orthonormal Hadamard of the intermediate size (the reference point).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from perq_onnx.functions import BLOCK_HADAMARD, DOMAIN, block_hadamard_function
from perq_onnx.hadamard import block_diagonal, hadamard, is_power_of_two, orthogonal
from perq_onnx.errors import PerqError

from .base import Context, Pass, PassResult


class InsertOnlineRotation(Pass):
    ensures = frozenset({"online_rotation"})

    def __init__(self, block: int | None, random_seed: int | None = None):
        self.block = block  # None = full-vector rotation
        self.random_seed = random_seed

    def run(self, ctx: Context) -> PassResult:
        m = ctx.structure.intermediate_size
        if self.block is not None:
            if not is_power_of_two(self.block) or not 2 <= self.block <= 1024:
                raise PerqError(f"--block {self.block}: block sizes are powers of two from 2 to 1024")
            rotation = block_diagonal(hadamard(self.block), m)
            ctx.functions[BLOCK_HADAMARD] = block_hadamard_function(self.block)
        else:
            full = orthogonal(m, self.random_seed)
        for layer in ctx.structure.layers:
            down = layer.down
            if down.shape[0] % (self.block or 1):
                raise PerqError(f"--block {self.block} does not divide the MLP intermediate size "
                                f"{down.shape[0]} (node '{down.name}')")
            x = down.input
            rotated = gs.Variable(f"{down.name}/online_rotation_output", dtype=x.dtype)
            if self.block is not None:
                node = gs.Node(BLOCK_HADAMARD, f"{down.name}/BlockHadamard", {"block_size": self.block},
                               [x], [rotated], domain=DOMAIN)
                r = rotation
            else:
                h = gs.Constant(f"{down.name}/online_rotation.hadamard", full.astype(np.float32))
                node = gs.Node("MatMul", f"{down.name}/OnlineHadamard", inputs=[x, h], outputs=[rotated])
                r = full
            ctx.graph.nodes.append(node)
            down.node.inputs[0] = rotated
            down.set_weight(r.T @ down.weight().astype(np.float64))
        kind = f"block Hadamard b={self.block}" if self.block else f"full Hadamard of size {m}"
        return PassResult(True, f"online {kind} at {len(ctx.structure.layers)} down_proj inputs")
