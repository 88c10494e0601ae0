"""``simulate``: the research form of the paper's tables, runnable in any onnxruntime.

INT-n weights per output channel (or per group) as int initializer -> DequantizeLinear -> MatMul,
and INT-n activations as the dynamic per-token standard-op QDQ chain in front of every decoder
linear (``--fused-ops``: the online rotation and the down_proj input quantizer as one
``perq.BlockHadamardQuantize``); embedding and lm_head float. Rounds to nearest with weight-error
scales by default (the paper's setting); ``--rounding gptq`` is available.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..passes.base import Pass
from ..passes.quantize_activations import QuantizeActivations
from ..settings import Clip, Rounding, Settings
from .base import Target


@dataclass(frozen=True)
class Simulate(Target):
    name: str = "simulate"
    default_a_bits: int = 4
    default_rounding: Rounding = Rounding.RTN  # the paper's tables
    default_w_clip: Clip = Clip.MSE

    def passes(self, settings: Settings) -> list[Pass]:
        passes: list[Pass] = []
        if settings.weights_quantized:
            passes.append(self.quantize_weights(settings, lm_head=False))
        if settings.activations_quantized:
            a = settings.activations
            passes.append(QuantizeActivations(a.bits, a.symmetric, a.fused))
        return passes
