"""INT-n dynamic per-token activation quantization at every quantized linear's input.

Inserts the standard-op quantize-dequantize chain of perq_onnx.functions (per token over the
channel axis; asymmetric with an integer zero point, or symmetric) in front of q/k/v (one chain,
shared input), o_proj, gate/up (shared) and down_proj. With ``fused`` and an online
BlockHadamard already at down_proj, that node becomes one ``perq.BlockHadamardQuantize`` (the
custom op library's fused kernel; its function body is the same chain), or with an FP4 format one
``perq.BlockHadamardQuantizeFP4`` (NVFP4's tensor scale from the calibrated amax, as unfused). Metadata
``perq.activation_qdq`` lists (layer, linear, input, output) of the chains so tools can measure
quantization error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from perq_onnx.errors import PerqError
from perq_onnx.check_fp4 import TRT_DOMAIN
from perq_onnx.formats import NVFP4, FP4Format, emit_fp4_activation_qdq
from perq_onnx.functions import (BLOCK_HADAMARD, BLOCK_HADAMARD_QUANTIZE, BLOCK_HADAMARD_QUANTIZE_FP4, DOMAIN,
                                 QDQ_TYPES, emit_activation_qdq)
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
        return self.ops(op_type, inputs, 1, hint, output, **attrs)[0]

    def ops(self, op_type, inputs, count, hint=None, output=None, domain="", **attrs):
        """A node with `count` outputs (the first may be named by `output`)."""
        hint = hint or op_type.lower()
        outs = [output if isinstance(output, gs.Tensor) else gs.Variable(output or f"{self.prefix}/{hint}_output")]
        outs += [gs.Variable(f"{self.prefix}/{hint}_output_{i}") for i in range(1, count)]
        self.ctx.add(gs.Node(op_type, f"{self.prefix}/{hint}", attrs, list(inputs), outs, domain=domain or None))
        return outs


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


# ------------------------------------------------------------------- activation quantizers
# Each emits the quantize-dequantize of one linear input x: emit(e, x, dtype, amax) -> y, where
# amax is x's calibrated absolute maximum when ``static_amax`` (else None).

@dataclass(frozen=True)
class IntQDQ:
    """INT-n dynamic per-token quantize-dequantize (perq_onnx.functions), asymmetric or symmetric,
    each token's range clipped to ``clip`` times its extremes."""
    bits: int
    symmetric: bool = False
    clip: float = 1.0
    static_amax = False

    def __post_init__(self):
        if (self.bits, self.symmetric) not in QDQ_TYPES:
            raise PerqError(f"--a-bits {self.bits}: choose 4, 8 or 16 (16 = float activations)")

    def emit(self, e, x, dtype, amax, output):
        return emit_activation_qdq(e, x, self.bits, self.symmetric, output=output, dtype=dtype, clip=self.clip)

    def __str__(self) -> str:
        clip = f", range x{self.clip:g}" if self.clip != 1.0 else ""
        return f"INT{self.bits} {'symmetric' if self.symmetric else 'asymmetric'} per-token{clip}"


@dataclass(frozen=True)
class FP4QDQ:
    """Dynamic FP4 quantize-dequantize over the channels in blocks of the format's size, in
    standard ops (formats.emit_fp4_activation_qdq); NVFP4's tensor scale from the calibrated amax."""
    format: FP4Format
    static_amax: bool = False

    @classmethod
    def of(cls, fmt: FP4Format) -> "FP4QDQ":
        return cls(fmt, static_amax=isinstance(fmt, NVFP4))

    def emit(self, e, x, dtype, amax, output):
        return emit_fp4_activation_qdq(e, x, self.bound(amax), output=output)

    def bound(self, amax) -> FP4Format:
        """The format with NVFP4's tensor scale from the calibrated amax."""
        return NVFP4.from_amax(amax) if self.static_amax else self.format

    def fused_attributes(self, amax) -> dict:
        """perq.BlockHadamardQuantizeFP4's attributes besides block_size."""
        fmt = self.bound(amax)
        return {"format": fmt.name, "tensor_scale": float(fmt.tensor_scale)} if self.static_amax else {"format": fmt.name}

    def __str__(self) -> str:
        return f"{self.format.name.upper()} per-block"


@dataclass(frozen=True)
class TrtFP4:
    """TensorRT's NVFP4 activation form: trt::TRT_FP4DynamicQuantize(x, tensor scale) -> FP4 values
    and E4M3 block scales; DequantizeLinear(block scales, tensor scale) -> DequantizeLinear(values,
    those, axis -1, block 16) (check_fp4.py). The tensor scale is the calibrated amax / (6 * 448)."""
    format: FP4Format
    static_amax = True

    def emit(self, e, x, dtype, amax, output):
        ts = e.const(np.array(NVFP4.from_amax(amax).tensor_scale, np.float32), "tensor_scale")
        x32 = x if dtype == np.float32 else e.op("Cast", [x], "x_float", to=onnx.TensorProto.FLOAT)
        values, block_scales = e.ops("TRT_FP4DynamicQuantize", [x32, ts], 2, "quantize", domain=TRT_DOMAIN,
                                     axis=-1, block_size=self.format.group, scale_type=onnx.TensorProto.FLOAT8E4M3FN)
        scale = e.op("DequantizeLinear", [block_scales, ts], "block_scale")
        y = e.op("DequantizeLinear", [values, scale], "dequantize", axis=-1, block_size=self.format.group,
                 output=output if dtype == np.float32 else None)
        return y if dtype == np.float32 else e.op("CastLike", [y, x], "y_like_x", output=output)

    def __str__(self) -> str:
        return "NVFP4 per-block (TensorRT dynamic quantize)"


class QuantizeActivations(Pass):
    """Quantize-dequantize at every decoder linear's input (q/k/v and gate/up share one)."""
    ensures = (ACTIVATIONS_QUANTIZED,)

    def __init__(self, quantizer, fused: bool = False):
        self.quantizer, self.fused = quantizer, fused
        if fused and not isinstance(quantizer, (IntQDQ, FP4QDQ)):
            raise PerqError(f"--fused-ops: no perq op fuses the online rotation with {quantizer}")
        self.requires = (ACTIVATIONS_FLOAT, ONLINE_ROTATION) if fused else (ACTIVATIONS_FLOAT,)

    def run(self, ctx: Context) -> PassResult:
        groups = [(layer, kind, linears) for layer in ctx.structure.layers
                  for kind, linears in (("qkv", [layer.q, layer.k, layer.v]), ("o_proj", [layer.o]),
                                        ("gate_up", [layer.gate, layer.up]), ("down_proj", [layer.down]))]
        amax = {}
        if self.quantizer.static_amax:
            absmax = ctx.collect({ctx.node(lins[0].name).inputs[0].name: "absmax" for _, _, lins in groups})
            amax = {name: float(np.max(v)) for name, v in absmax.items()}
        records = []
        for layer, kind, linears in groups:
            x = ctx.node(linears[0].name).inputs[0]
            prefix = f"{linears[0].name}/input_qdq"
            rotation = producer(x)
            if self.fused and kind == "down_proj" and rotation is not None and rotation.op == BLOCK_HADAMARD:
                self._fuse(ctx, rotation, amax.get(x.name))
                ctx.record(QUANTIZED_ACTIVATION, x.name)
                records.append({"layer": layer.index, "linear": kind, "input": rotation.inputs[0].name,
                                "output": x.name, "fused": True})
                continue
            y = self.quantizer.emit(GraphEmitter(ctx, prefix), x, input_dtype(ctx, linears[0], x), amax.get(x.name),
                                    f"{prefix}/output")
            ctx.record(QUANTIZED_ACTIVATION, y.name)
            for lin in linears:
                ctx.node(lin.name).inputs[0] = y
            records.append({"layer": layer.index, "linear": kind, "input": x.name, "output": y.name})
        ctx.min_opset = max(ctx.min_opset or 0, 21)
        ctx.metadata["perq.activation_qdq"] = json.dumps(records)
        return PassResult(f"{self.quantizer} activation quantize-dequantize at {len(records)} inputs")

    def _fuse(self, ctx: Context, node: gs.Node, amax: float | None) -> None:
        b = node.attrs["block_size"]
        if isinstance(self.quantizer, FP4QDQ):
            node.op = BLOCK_HADAMARD_QUANTIZE_FP4
            node.attrs = {"block_size": b, **self.quantizer.fused_attributes(amax)}
        else:
            node.op = BLOCK_HADAMARD_QUANTIZE
            node.attrs = {"block_size": b, "bits": self.quantizer.bits, "symmetric": int(self.quantizer.symmetric)}
        node.domain = DOMAIN
