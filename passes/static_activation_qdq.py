"""INT8 activations as static, per-tensor, symmetric QuantizeLinear -> DequantizeLinear pairs in
front of every decoder linear (TensorRT's explicit-quantization form).

The scale of each linear input is absmax / 127 over the calibration data, measured on the graph
as rewritten so far (rotated, permuted, online rotation in place): a constant, so the engine can
fuse Q/DQ into INT8 GEMMs. The DequantizeLinear feeds the MatMul directly (q/k/v and gate/up
share one pair).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import ACTIVATIONS_FLOAT, ACTIVATIONS_QUANTIZED, QUANTIZED_ACTIVATION, Context, Pass, PassResult
from .quantize_activations import input_dtype


class StaticActivationQDQ(Pass):
    requires = (ACTIVATIONS_FLOAT,)
    ensures = (ACTIVATIONS_QUANTIZED,)

    def run(self, ctx: Context) -> PassResult:
        groups = []  # (input tensor name, readers)
        for layer in ctx.structure.layers:
            for linears in ([layer.q, layer.k, layer.v], [layer.o], [layer.gate, layer.up], [layer.down]):
                groups.append((ctx.node(linears[0].name).inputs[0].name, linears))
        amax = ctx.collect({name: "absmax" for name, _ in groups})
        zero = np.zeros((), np.int8)
        for name, linears in groups:
            x = ctx.graph.tensors()[name]
            dtype = input_dtype(ctx, linears[0], x)
            scale = max(float(amax[name].max()), 1e-4) / 127.0
            prefix = f"{linears[0].name}/input_qdq"
            s = gs.Constant(f"{prefix}/scale", np.array(scale, dtype=dtype))
            zp = gs.Constant(f"{prefix}/zero_point", zero)
            q = gs.Variable(f"{prefix}/q", dtype=np.int8)
            y = gs.Variable(f"{prefix}/y", dtype=dtype)
            ctx.add(gs.Node("QuantizeLinear", f"{prefix}/quantize", {}, [x, s, zp], [q]))
            ctx.add(gs.Node("DequantizeLinear", f"{prefix}/y", {}, [q, s, zp], [y]))
            ctx.record(QUANTIZED_ACTIVATION, y.name)
            for lin in linears:
                ctx.node(lin.name).inputs[0] = y
        ctx.min_opset = max(ctx.min_opset or 0, 21)
        return PassResult(f"INT8 static per-tensor activation Q/DQ at {len(groups)} inputs")
