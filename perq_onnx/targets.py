"""Lower: what a deployment target makes of the rewritten float graph.

A Target owns the quantizer form (weights: bits, granularity and layout; activations: how and
whether they are quantized in the graph), how the ``perq`` run-time ops appear in the output,
and the opset / IR version. The float rewrites (R1, R2, P3, R3) are the same for every target.

* ``simulate``: the research form of the paper's tables. INT-n weights per output channel (or
  per group) and INT-n activations as the dynamic per-token standard-op QDQ chain in front of
  every decoder linear; embedding and lm_head float.
Deployment targets round weights with GPTQ and activation-aware scales by default (Hessians of
the rotated graph from the calibration data): folding the RMSNorm gammas into the readers, which
R1 requires, puts tiny gammas of high-energy channels into the weights, and no weight-error scale
rule can keep round-to-nearest's error away from those channels; GPTQ's error feedback and
scales fitted on the output error can (benchmarks/investigate_weights/FINDINGS.md and
choose_rules.py). ``--rounding rtn`` is the fast alternative. Symmetric INT4 uses all 16 codes
(``full_range``: the scale carries the sign of the group's extreme, as onnxruntime's own
quantizer does) except for TensorRT, whose documented scales are positive.

* ``ort``: what onnxruntime runs fast. INT4 symmetric weights in blocks of 32 input rows
  (int4 initializer -> DequantizeLinear(axis 0, block_size) -> MatMul, which onnxruntime fuses
  into MatMulNBits), lm_head likewise, the embedding INT8 in gather-then-dequantize form;
  activations float in the graph: MatMulNBits with accuracy_level 4 quantizes them to int8 per
  block inside the kernel. The level is a session setting; the model records it in its metadata
  (``perq.ort.session_config``) and ``perq_onnx.runtime.session`` applies it.
* ``tensorrt``: TensorRT's documented form. INT4 weight-only, symmetric, no zero point, blocks of
  128 (or 64) input rows, DequantizeLinear feeding the MatMul; optional INT8 activations as static
  per-tensor Q/DQ (``--a-bits 8``); the online rotation inlined as standard ops (TensorRT cannot
  load the perq op library); embedding float. ``perq-onnx check --target tensorrt`` verifies it.

The perq ops of simulate and ort are model-local functions (a plain onnxruntime runs them; the
op library replaces them with native kernels). Every target emits opset >= 21 (int4).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import PerqError
from .passes.base import Context, Pass, register_functions
from .passes.inline_ops import InlineBlockHadamard
from .passes.quantize_activations import QuantizeActivations
from .passes.quantize_embedding import QuantizeEmbedding
from .passes.quantize_weights import QuantizeWeights
from .passes.static_activation_qdq import StaticActivationQDQ
from .rounding import WeightQuant
from .settings import Clip, Rounding, Settings, TargetName

ORT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "4"}


@dataclass(frozen=True)
class Target:
    name: str
    opset: int = 21
    default_w_groups: tuple[int, ...] = ()   # the first that divides every linear's input wins
    default_a_bits: int = 16
    default_rounding: Rounding = Rounding.GPTQ
    default_w_clip: Clip = Clip.ACT
    full_range: bool = True                  # symmetric codes use all 16 levels (negative scales)

    def resolve(self, settings: Settings, in_features: dict[str, int]) -> Settings:
        """Settings with the target's defaults filled in and checked against what it supports and
        against the model's linears (in_features: a linear's name -> its input channels)."""
        group = settings.w_group
        if group is None and self.default_w_groups and settings.weights_quantized:
            group = next((g for g in self.default_w_groups if all(n % g == 0 for n in in_features.values())), None)
            if group is None:
                raise PerqError(f"the {self.name} target's weight blocks ({', '.join(map(str, self.default_w_groups))}) "
                                f"divide no common input size of this model ({sorted(set(in_features.values()))})")
        settings = dataclasses.replace(
            settings, w_group=group, a_bits=settings.a_bits if settings.a_bits is not None else self.default_a_bits,
            rounding=settings.rounding or self.default_rounding, w_clip=settings.w_clip or self.default_w_clip)
        if settings.weights_quantized and group is not None:
            bad = next((name for name, n in in_features.items() if n % group), None)
            if bad is not None:
                raise PerqError(f"--w-group {group} does not divide the {in_features[bad]} input channels of "
                                f"node '{bad}'")
        self.check(settings)
        return settings.validate()

    def check(self, settings: Settings) -> None:
        pass

    def weight_form(self, settings: Settings) -> WeightQuant:
        return WeightQuant(settings.w_bits, settings.w_group, True, str(settings.w_clip), self.full_range)

    def quantize_weights(self, settings: Settings, lm_head: bool) -> QuantizeWeights:
        """The weight pass; lm_head (no Hessian collected for it) gets round-to-nearest with the
        weight-error clip rule where the form's rule needs activations."""
        form = self.weight_form(settings)
        head = None
        if lm_head and not settings.float_embeddings:
            head = dataclasses.replace(form, clip="mse" if form.clip == "act" else form.clip)
        return QuantizeWeights(form, settings.rounding, lm_head=head)

    def passes(self, settings: Settings) -> list[Pass]:  # pragma: no cover - interface
        raise NotImplementedError

    def lower(self, ctx: Context) -> None:
        """Give every perq op in the graph its model-local function body and set the opset."""
        if register_functions(ctx) or ctx.min_opset:
            ctx.min_opset = max(ctx.min_opset or 0, self.opset)

    def session_config(self) -> dict[str, str]:
        return {}


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
            passes.append(QuantizeActivations(settings.a_bits, settings.a_symmetric, settings.fused_ops))
        return passes


@dataclass(frozen=True)
class Ort(Target):
    name: str = "ort"
    default_w_groups: tuple[int, ...] = (32,)

    def check(self, settings: Settings) -> None:
        if settings.quantize and settings.a_bits != 16:
            raise PerqError(f"--a-bits {settings.a_bits}: the ort target leaves activations float in the graph "
                            "(onnxruntime's MatMulNBits quantizes them to int8 inside the kernel); "
                            "use --target simulate for quantized activations in the graph")
        if settings.quantize and settings.w_bits != 4:
            raise PerqError(f"--w-bits {settings.w_bits}: the ort target emits INT4 weights (MatMulNBits)")

    def passes(self, settings: Settings) -> list[Pass]:
        if not settings.quantize:
            return []
        passes: list[Pass] = [self.quantize_weights(settings, lm_head=True)]
        if not settings.float_embeddings:
            passes.append(QuantizeEmbedding())
        return passes

    def lower(self, ctx: Context) -> None:
        super().lower(ctx)
        ctx.metadata["perq.ort.session_config"] = json.dumps(ORT_SESSION_CONFIG)

    def session_config(self) -> dict[str, str]:
        return dict(ORT_SESSION_CONFIG)


@dataclass(frozen=True)
class TensorRT(Target):
    name: str = "tensorrt"
    default_w_groups: tuple[int, ...] = (128, 64)
    full_range: bool = False  # TensorRT documents positive scales

    def check(self, settings: Settings) -> None:
        if settings.quantize and settings.w_bits != 4:
            raise PerqError(f"--w-bits {settings.w_bits}: the tensorrt target emits INT4 weight-only blocks")
        if settings.quantize and settings.w_group not in (64, 128):
            raise PerqError(f"--w-group {settings.w_group}: TensorRT's INT4 blocks are 64 or 128 input rows")
        if settings.quantize and settings.a_bits not in (8, 16):
            raise PerqError(f"--a-bits {settings.a_bits}: TensorRT's INT4 is weight-only; activations are "
                            "float (16) or INT8 static Q/DQ (8)")
        if settings.fused_ops:
            raise PerqError("--fused-ops emits a perq op that TensorRT cannot load; drop it for --target tensorrt")

    def passes(self, settings: Settings) -> list[Pass]:
        passes: list[Pass] = []
        if settings.online.block is not None:
            passes.append(InlineBlockHadamard())
        if not settings.quantize:
            return passes
        passes.append(self.quantize_weights(settings, lm_head=True))
        if settings.a_bits == 8:
            passes.append(StaticActivationQDQ())
        return passes


TARGETS = {TargetName.SIMULATE: Simulate(), TargetName.ORT: Ort(), TargetName.TENSORRT: TensorRT()}


def target(settings: Settings) -> Target:
    return TARGETS[settings.target]
