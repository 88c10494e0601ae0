"""Lower: what a deployment target makes of the rewritten float graph.

A Target owns the quantizer form (weights: bits, granularity and layout; activations: how and
whether they are quantized in the graph), how the ``perq`` run-time ops appear in the output,
and the opset / IR version. The float rewrites (R1, R2, P3, R3) are the same for every target.

* ``simulate``: the research form of the paper's tables. INT-n weights as int4/int8 initializer
  -> DequantizeLinear (per output channel or per group), INT-n activations as the dynamic
  per-token standard-op QDQ chain in front of every decoder linear, the ``perq`` ops as
  model-local functions (so a plain onnxruntime runs the file; the op library replaces them with
  native kernels). Opset >= 21 (int4).
"""
from __future__ import annotations

from dataclasses import dataclass

from .passes.base import Context, Pass, register_functions
from .passes.quantize_activations import QuantizeActivations
from .passes.quantize_weights import QuantizeWeights
from .settings import Settings, TargetName


@dataclass(frozen=True)
class Target:
    name: str
    opset: int = 21

    def passes(self, settings: Settings) -> list[Pass]:  # pragma: no cover - interface
        raise NotImplementedError

    def lower(self, ctx: Context) -> None:
        """Give every perq op in the graph its model-local function body and set the opset."""
        if register_functions(ctx) or ctx.min_opset:
            ctx.min_opset = max(ctx.min_opset or 0, self.opset)


@dataclass(frozen=True)
class Simulate(Target):
    name: str = "simulate"

    def passes(self, settings: Settings) -> list[Pass]:
        passes: list[Pass] = []
        if settings.weights_quantized:
            passes.append(QuantizeWeights(settings.weight_form, settings.rounding))
        if settings.activations_quantized:
            passes.append(QuantizeActivations(settings.a_bits, settings.a_symmetric, settings.fused_ops))
        return passes


TARGETS = {TargetName.SIMULATE: Simulate()}


def target(settings: Settings) -> Target:
    return TARGETS[settings.target]
