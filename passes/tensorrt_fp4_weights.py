"""NVFP4 weights from their onnxruntime-runnable lookup form into TensorRT's form.

QuantizeWeights writes NVFP4 weights as E2M1 bit codes (UINT4) decoded with standard ops
onnxruntime runs (``fp4_lookup``), so that later calibration (GPTQ's Hessians, the activations'
tensor scales) can still run the graph. Once nothing calibrates any more, this pass rewrites each
decoder weight into Model Optimizer's NVFP4 form: the same bits as a FLOAT4E2M1 initializer ->
DequantizeLinear(axis 0, block 16) whose scale is DequantizeLinear(E4M3 block scales, float32
tensor scale). Both forms compute code * (float32(e4m3) * tensor_scale): the weights are equal
bit for bit. A zero block's E4M3 scale (its codes are all zero) becomes the smallest positive
E4M3 value, since TensorRT wants positive scales; the block still dequantizes to zeros.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from perq_onnx.errors import InternalError
from perq_onnx.shapes import constant_shape, constant_value, producer

from .base import QUANTIZED_WEIGHT, WEIGHTS_QUANTIZED, Condition, Context, Pass, PassResult, decoder_linears
from .quantize_activations import GraphEmitter

E4M3_SMALLEST = ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).smallest_subnormal
_CHAIN_DEPTH = 12  # nodes between the MatMul and the lookup chain's constants


def _chain_constants(weight: gs.Tensor) -> tuple[gs.Constant, gs.Constant, gs.Tensor]:
    """(codes, block scales, tensor scale) of a lookup-form NVFP4 weight, found by walking up its
    producers (the constants are told apart by type, not by name)."""
    codes = scales = tensor_scale = None
    frontier, seen = [weight], 0
    while frontier and seen < _CHAIN_DEPTH:
        node = producer(frontier.pop())
        if node is None:
            continue
        seen += 1
        for i, t in enumerate(node.inputs):
            meta = constant_shape(t)
            if meta is None:
                frontier.append(t)
            elif meta[1] == np.dtype(ml_dtypes.uint4):
                codes = t
            elif meta[1] == np.dtype(ml_dtypes.float8_e4m3fn) and node.op == "DequantizeLinear" and i == 0:
                scales, tensor_scale = t, node.inputs[1]
    if codes is None or scales is None:
        raise InternalError(f"'{weight.name}' is not an NVFP4 weight in lookup form")
    return codes, scales, tensor_scale


def _native_fp4(ctx: Context) -> str | None:
    for lin in decoder_linears(ctx):
        node = producer(ctx.node(lin.name).inputs[1])
        if node is not None and node.op == "Cast":
            node = producer(node.inputs[0])
        meta = constant_shape(node.inputs[0]) if node is not None and node.op == "DequantizeLinear" else None
        if meta is None or meta[1] != np.dtype(ml_dtypes.float4_e2m1fn):
            return f"'{lin.name}' does not read a FLOAT4E2M1 DequantizeLinear"
    return None


FP4_WEIGHTS_NATIVE = Condition("decoder weights are FLOAT4E2M1 DequantizeLinear", _native_fp4)


class TensorRTFP4Weights(Pass):
    requires = (WEIGHTS_QUANTIZED,)
    ensures = (WEIGHTS_QUANTIZED, FP4_WEIGHTS_NATIVE)

    def __init__(self, block: int = 16):
        self.block = block

    def run(self, ctx: Context) -> PassResult:
        linears = list(decoder_linears(ctx))
        for lin in linears:
            matmul = ctx.node(lin.name)
            old = matmul.inputs[1]
            codes, scales, tensor_scale = _chain_constants(old)
            bits = np.asarray(constant_value(codes)).astype(np.uint8).view(ml_dtypes.float4_e2m1fn)
            block_scale = np.asarray(constant_value(scales))
            block_scale = np.where(block_scale.astype(np.float32) == 0, E4M3_SMALLEST, block_scale).astype(
                block_scale.dtype)
            e = GraphEmitter(ctx, f"{lin.name}/weight_nvfp4")
            scale = e.op("DequantizeLinear", [ctx.store.constant(f"{lin.name}.weight.e4m3_scale", block_scale),
                                              tensor_scale], "block_scale")
            w = e.op("DequantizeLinear", [ctx.store.constant(f"{lin.name}.weight.fp4", bits), scale], "dequantize",
                     axis=0, block_size=self.block)
            last = producer(old)
            if last is not None and last.op == "Cast":  # the lookup form's cast to the graph's type
                w = e.op("Cast", [w], "to_graph_type", to=last.attrs["to"])
            ctx.record(QUANTIZED_WEIGHT, w.name)
            matmul.inputs[1] = w
        return PassResult(f"{len(linears)} NVFP4 weights as FLOAT4E2M1 DequantizeLinear (TensorRT's form)")
