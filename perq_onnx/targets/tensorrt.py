"""``tensorrt``: TensorRT's documented explicit-quantization form.

INT4 weight-only, symmetric, no zero point, positive scales (TensorRT documents positive scales,
so the narrow code range), blocks of 128 (or 64) input rows, DequantizeLinear feeding the MatMul;
optional INT8 activations as static per-tensor Q/DQ (``--a-bits 8``); the online rotation inlined
as standard ops (TensorRT cannot load the perq op library); embedding float. ``--format nvfp4``:
W4A4 in NVFP4 as Model Optimizer exports it (FLOAT4E2M1 weights behind DequantizeLinear of block
16 whose scale is DequantizeLinear(E4M3 block scales, float32 tensor scale); activations through
``trt::TRT_FP4DynamicQuantize`` and two DequantizeLinear, their tensor scale calibrated), opset
23, lm_head and embedding float; onnxruntime cannot run that form (no FP4 DequantizeLinear), so
its output is checked by onnx.checker and the TensorRT rules only. Its rules live once,
in ``perq_onnx/check.py``: this target's output must pass them before it is written, and
``perq-onnx check --target tensorrt`` runs the same rules on any model.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import check as rules
from ..check_fp4 import FP4_MIN_OPSET
from ..errors import PerqError
from ..formats import format_for
from ..passes.base import Context, Pass, PassResult
from ..passes.inline_ops import InlineBlockHadamard
from ..passes.quantize_activations import QuantizeActivations, TrtFP4
from ..passes.quantize_weights import fp4_lookup
from ..passes.tensorrt_fp4_weights import TensorRTFP4Weights
from ..passes.static_activation_qdq import StaticActivationQDQ
from ..settings import NumberFormat, Settings
from ..fused_ops import DEFAULT_DOMAINS, FUSED_RMSNORMS
from .base import Target


@dataclass(frozen=True)
class TensorRT(Target):
    name: str = "tensorrt"
    default_w_groups: tuple[int, ...] = tuple(sorted(rules.INT4_BLOCK_SIZES, reverse=True))
    full_range: bool = False  # positive scales
    ragged_groups: bool = False  # its INT4 blocks (64, 128) divide K
    formats: tuple[NumberFormat, ...] = (NumberFormat.INT, NumberFormat.NVFP4)

    def check(self, settings: Settings) -> None:
        w, a = settings.weights, settings.activations
        if a.fused:
            raise PerqError("--fused-ops emits a perq op that TensorRT cannot load; drop it for --target tensorrt")
        if self._fp4(settings):
            return  # W4A4 (or W4A16 with --a-bits 16) in blocks of 16: checked by the settings
        if settings.quantize and w.bits != 4:
            raise PerqError(f"--w-bits {w.bits}: the tensorrt target emits INT4 weight-only blocks")
        if settings.quantize and not w.symmetric:
            raise PerqError("--w-asymmetric: TensorRT's INT4 weights are symmetric (zero point 0)")
        if settings.quantize and w.group not in rules.INT4_BLOCK_SIZES:
            raise PerqError(f"--w-group {w.group}: TensorRT's INT4 blocks are "
                            f"{' or '.join(map(str, rules.INT4_BLOCK_SIZES))} input rows")
        if settings.quantize and a.bits not in (8, 16):
            raise PerqError(f"--a-bits {a.bits}: TensorRT's INT4 is weight-only; activations are "
                            "float (16) or INT8 static Q/DQ (8)")

    def check_model(self, source_dir, structure, graph) -> None:
        node = next((n for n in graph.nodes if n.op in FUSED_RMSNORMS or n.domain not in (None, *DEFAULT_DOMAINS, "perq")),
                    None)
        if node is not None:  # onnxruntime's fused norms and attention (the genai builder's graphs)
            op = f"{node.domain}.{node.op}" if node.domain else node.op
            raise PerqError(f"node '{node.name}': {op} is an onnxruntime op that TensorRT "
                            "cannot run; give --target tensorrt a standard-op export (optimum)")

    @staticmethod
    def _fp4(settings: Settings) -> bool:
        return settings.weights.format is NumberFormat.NVFP4

    def passes(self, settings: Settings) -> list[Pass]:
        passes: list[Pass] = []
        if settings.rotation.online.block is not None:
            passes.append(InlineBlockHadamard())
        if not settings.quantize:
            return passes
        if self._fp4(settings):
            # weights in a form onnxruntime runs while activations still calibrate, then TensorRT's
            fmt = format_for(settings.weights.format)
            passes.append(self.quantize_weights(settings, lm_head=False, emit=fp4_lookup))
            if settings.activations_quantized:
                passes.append(QuantizeActivations(TrtFP4(fmt)))
            return passes + [TensorRTFP4Weights(fmt.group)]
        passes.append(self.quantize_weights(settings, lm_head=True))
        if settings.activations.bits == 8:
            passes.append(StaticActivationQDQ())
        return passes

    def lower(self, ctx: Context, settings: Settings, progress: bool = True) -> list[tuple[Pass, PassResult]]:
        results = super().lower(ctx, settings, progress)
        if settings.quantize and self._fp4(settings):
            ctx.min_opset = max(ctx.min_opset or 0, FP4_MIN_OPSET)  # FLOAT4E2M1 DequantizeLinear
        return results

    def needs_calibration(self, settings: Settings) -> bool:
        return settings.activations_quantized  # static per-tensor scales (INT8, NVFP4's tensor scale)

    def runs_in_onnxruntime(self, settings: Settings) -> bool:
        return not (settings.quantize and self._fp4(settings))

    def check_output(self, model) -> list:
        return rules.check_tensorrt(model)
