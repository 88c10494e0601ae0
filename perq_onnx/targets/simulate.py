"""``simulate``: the research form of the paper's tables, runnable in any onnxruntime.

INT-n weights per output channel (or per group) as int initializer -> DequantizeLinear -> MatMul,
and INT-n activations as the dynamic per-token standard-op QDQ chain in front of every decoder
linear (``--fused-ops``: the online rotation and the down_proj input quantizer as one
``perq.BlockHadamardQuantize``); embedding and lm_head float. ``--format nvfp4|mxfp4``: weights
and activations in microscaling FP4, simulated with standard ops that onnxruntime runs (it has no
FP4 DequantizeLinear), bit-exact to formats.py's references: weights as E2M1 bit codes decoded by
table lookup times their block scales, activations blocked over the channels (NVFP4's tensor
scale from the calibrated absolute maximum of each linear input, its block scales dynamic). Rounds to nearest with weight-error
scales by default (the paper's setting); ``--rounding gptq`` is available.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..formats import format_for
from ..passes.base import Pass
from ..passes.quantize_activations import FP4QDQ, IntQDQ, QuantizeActivations
from ..passes.quantize_weights import fp4_lookup
from ..settings import Clip, NumberFormat, Rounding, Settings
from .base import Target


@dataclass(frozen=True)
class Simulate(Target):
    name: str = "simulate"
    default_a_bits: int = 4
    default_rounding: Rounding = Rounding.RTN  # the paper's tables
    default_w_clip: Clip = Clip.MSE
    formats: tuple[NumberFormat, ...] = (NumberFormat.INT, NumberFormat.NVFP4, NumberFormat.MXFP4)
    dynamic_int_activations: bool = True  # --a-clip applies
    float_target_w4a4: bool = True  # INT W4A4: valid ppl 123.35 -> 53.34 (RTN), 39.21 -> 32.72 (GPTQ); see README

    def needs_calibration(self, settings: Settings) -> bool:
        return settings.activations_quantized and settings.activations.format is NumberFormat.NVFP4

    def passes(self, settings: Settings) -> list[Pass]:
        weights: list[Pass] = []
        activations: list[Pass] = []
        fp4 = settings.weights.format is not NumberFormat.INT
        if settings.weights_quantized:
            weights.append(self.quantize_weights(settings, lm_head=False, emit=fp4_lookup if fp4 else None))
        if settings.activations_quantized:
            a = settings.activations
            quantizer = FP4QDQ.of(format_for(a.format)) if fp4 else IntQDQ(a.bits, a.symmetric, a.clip)
            activations.append(QuantizeActivations(quantizer, a.fused))
        if settings.weights.float_target:  # the weight pass sees the quantized inputs (passes/quantize_weights.py)
            return activations + weights
        return weights + activations
