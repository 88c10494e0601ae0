"""INT-n dynamic per-token activation quantization at every quantized linear's input.

Inserts the standard-op quantize-dequantize chain of perq_onnx.functions (per token over the
channel axis; asymmetric with an integer zero point, or symmetric) in front of q/k/v (one chain,
shared input), o_proj, gate/up (shared) and down_proj. With ``fused`` and an online
BlockHadamard already at down_proj, that node becomes one ``perq.BlockHadamardQuantize`` (the
custom op library's fused kernel; its function body is the same chain). Metadata
``perq.activation_qdq`` lists (layer, linear, input, output) of the chains so tools can measure
quantization error.
"""
from __future__ import annotations

import json

import numpy as np
import onnx_graphsurgeon as gs

from perq_onnx.errors import PerqError
from perq_onnx.functions import BLOCK_HADAMARD, BLOCK_HADAMARD_QUANTIZE, DOMAIN, QDQ_TYPES, emit_activation_qdq
from perq_onnx.shapes import constant_shape, producer

from .base import (ACTIVATIONS_FLOAT, ACTIVATIONS_QUANTIZED, ONLINE_ROTATION, QUANTIZED_ACTIVATION, Context, Pass,
                   PassResult)


class GraphEmitter:
    """Emits the chain into the graph (the counterpart of functions.FunctionEmitter)."""

    def __init__(self, ctx: Context, prefix: str):
        self.ctx, self.prefix = ctx, prefix

    def const(self, value: np.ndarray, hint: str) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{hint}", value)

    def op(self, op_type, inputs, hint=None, output=None, **attrs):
        hint = hint or op_type.lower()
        out = output if isinstance(output, gs.Tensor) else gs.Variable(output or f"{self.prefix}/{hint}_output")
        self.ctx.add(gs.Node(op_type, f"{self.prefix}/{hint}", attrs, list(inputs), [out]))
        return out


def input_dtype(ctx: Context, lin, x: gs.Tensor) -> np.dtype:
    """The float type of a linear's input: its weight's (MatMul needs both the same; a float16
    export may run attention, and so o_proj, in float32), through a weight DequantizeLinear's
    scale, else x's inferred type, else the graph's."""
    w = ctx.node(lin.name).inputs[1]
    meta = constant_shape(w)
    if meta is None and (dq := producer(w)) is not None and dq.op == "DequantizeLinear":
        meta = constant_shape(dq.inputs[1])
    if meta is not None and np.issubdtype(meta[1], np.floating):
        return np.dtype(meta[1])
    if x.dtype is not None and np.issubdtype(np.dtype(x.dtype), np.floating):
        return np.dtype(x.dtype)
    return ctx.structure.dtype


class QuantizeActivations(Pass):
    ensures = (ACTIVATIONS_QUANTIZED,)

    def __init__(self, bits: int, symmetric: bool = False, fused: bool = False):
        if (bits, symmetric) not in QDQ_TYPES:
            raise PerqError(f"--a-bits {bits}: choose 4, 8 or 16 (16 = float activations)")
        self.bits, self.symmetric, self.fused = bits, symmetric, fused
        self.requires = (ACTIVATIONS_FLOAT, ONLINE_ROTATION) if fused else (ACTIVATIONS_FLOAT,)

    def run(self, ctx: Context) -> PassResult:
        records = []
        for layer in ctx.structure.layers:
            for kind, linears in (("qkv", [layer.q, layer.k, layer.v]), ("o_proj", [layer.o]),
                                  ("gate_up", [layer.gate, layer.up]), ("down_proj", [layer.down])):
                x = ctx.node(linears[0].name).inputs[0]
                prefix = f"{linears[0].name}/input_qdq"
                rotation = producer(x)
                if self.fused and kind == "down_proj" and rotation is not None and rotation.op == BLOCK_HADAMARD:
                    self._fuse(ctx, rotation)
                    ctx.record(QUANTIZED_ACTIVATION, x.name)
                    records.append({"layer": layer.index, "linear": kind, "input": rotation.inputs[0].name,
                                    "output": x.name, "fused": True})
                    continue
                y = emit_activation_qdq(GraphEmitter(ctx, prefix), x, self.bits, self.symmetric,
                                        output=f"{prefix}/output", dtype=input_dtype(ctx, linears[0], x))
                ctx.record(QUANTIZED_ACTIVATION, y.name)
                for lin in linears:
                    ctx.node(lin.name).inputs[0] = y
                records.append({"layer": layer.index, "linear": kind, "input": x.name, "output": y.name})
        ctx.min_opset = max(ctx.min_opset or 0, 21)
        ctx.metadata["perq.activation_qdq"] = json.dumps(records)
        kind = "symmetric" if self.symmetric else "asymmetric"
        return PassResult(f"INT{self.bits} {kind} per-token activation QDQ at {len(records)} inputs")

    def _fuse(self, ctx: Context, node: gs.Node) -> None:
        b = node.attrs["block_size"]
        node.op = BLOCK_HADAMARD_QUANTIZE
        node.attrs = {"block_size": b, "bits": self.bits, "symmetric": int(self.symmetric)}
        node.domain = DOMAIN
