"""Replace every perq.BlockHadamard node by its standard-op body (Reshape [-1, b] -> MatMul(H_b)
-> Reshape back), for runtimes that cannot load the perq op library or model-local functions'
custom domain (TensorRT). Same function, same numbers as the function body onnxruntime runs.
"""
from __future__ import annotations

from perq_onnx.functions import BLOCK_HADAMARD, DOMAIN, emit_block_hadamard

from .base import ONLINE_ROTATION, Context, Pass, PassResult
from .quantize_activations import GraphEmitter


class InlineBlockHadamard(Pass):
    requires = (ONLINE_ROTATION,)

    def run(self, ctx: Context) -> PassResult:
        nodes = [n for n in ctx.graph.nodes if n.domain == DOMAIN and n.op == BLOCK_HADAMARD]
        for node in nodes:
            x, y = node.inputs[0], node.outputs[0]
            node.outputs.clear()
            node.inputs.clear()
            ctx.graph.nodes.remove(node)
            emit_block_hadamard(GraphEmitter(ctx, node.name), x, node.attrs["block_size"], output=y)
        return PassResult(f"{len(nodes)} BlockHadamard nodes inlined as standard ops")
