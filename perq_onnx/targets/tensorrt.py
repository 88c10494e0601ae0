"""``tensorrt``: TensorRT's documented explicit-quantization form.

INT4 weight-only, symmetric, no zero point, positive scales (TensorRT documents positive scales,
so the narrow code range), blocks of 128 (or 64) input rows, DequantizeLinear feeding the MatMul;
optional INT8 activations as static per-tensor Q/DQ (``--a-bits 8``); the online rotation inlined
as standard ops (TensorRT cannot load the perq op library); embedding float. Its rules live once,
in ``perq_onnx/check.py``: this target's output must pass them before it is written, and
``perq-onnx check --target tensorrt`` runs the same rules on any model.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import check as rules
from ..errors import PerqError
from ..passes.base import Pass
from ..passes.inline_ops import InlineBlockHadamard
from ..passes.static_activation_qdq import StaticActivationQDQ
from ..settings import Settings
from .base import Target


@dataclass(frozen=True)
class TensorRT(Target):
    name: str = "tensorrt"
    default_w_groups: tuple[int, ...] = tuple(sorted(rules.INT4_BLOCK_SIZES, reverse=True))
    full_range: bool = False  # positive scales

    def check(self, settings: Settings) -> None:
        w, a = settings.weights, settings.activations
        if settings.quantize and w.bits != 4:
            raise PerqError(f"--w-bits {w.bits}: the tensorrt target emits INT4 weight-only blocks")
        if settings.quantize and w.group not in rules.INT4_BLOCK_SIZES:
            raise PerqError(f"--w-group {w.group}: TensorRT's INT4 blocks are "
                            f"{' or '.join(map(str, rules.INT4_BLOCK_SIZES))} input rows")
        if settings.quantize and a.bits not in (8, 16):
            raise PerqError(f"--a-bits {a.bits}: TensorRT's INT4 is weight-only; activations are "
                            "float (16) or INT8 static Q/DQ (8)")
        if a.fused:
            raise PerqError("--fused-ops emits a perq op that TensorRT cannot load; drop it for --target tensorrt")

    def passes(self, settings: Settings) -> list[Pass]:
        passes: list[Pass] = []
        if settings.rotation.online.block is not None:
            passes.append(InlineBlockHadamard())
        if not settings.quantize:
            return passes
        passes.append(self.quantize_weights(settings, lm_head=True))
        if settings.activations.bits == 8:
            passes.append(StaticActivationQDQ())
        return passes

    def needs_calibration(self, settings: Settings) -> bool:
        return settings.quantize and settings.activations.bits == 8  # static per-tensor scales

    def check_output(self, model) -> list:
        return rules.check_tensorrt(model)
