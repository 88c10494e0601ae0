"""``ort``: what onnxruntime runs fast.

INT4 symmetric weights in blocks of 32 input rows (int4 initializer -> DequantizeLinear(axis 0,
block_size) -> MatMul, which onnxruntime fuses into MatMulNBits), lm_head likewise, the embedding
INT8 in gather-then-dequantize form; activations float in the graph: MatMulNBits with
accuracy_level 4 quantizes them to int8 per block inside the kernel. The level is a session
setting; the model records it in its metadata (``perq.ort.session_config``) and
``perq_onnx.runtime.session`` applies it. Rounds with GPTQ and activation-aware, full-range
scales by default (README, Findings: folding the RMSNorm gammas, which R1 requires, puts tiny
gammas of high-energy channels into the weights; error feedback and output-error scales keep
the rounding noise away from them). The perq ops stay model-local functions (a plain
onnxruntime runs them; the op library replaces them with native kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import PerqError
from ..passes.base import Pass
from ..passes.quantize_embedding import QuantizeEmbedding
from ..settings import Embedding, Settings
from .base import Target

ACCURACY_LEVEL = "4"  # int8 activations inside MatMulNBits


@dataclass(frozen=True)
class Ort(Target):
    name: str = "ort"
    default_w_groups: tuple[int, ...] = (32,)
    embeddings: tuple[Embedding, ...] = (Embedding.INT8,)

    def check(self, settings: Settings) -> None:
        if settings.quantize and settings.activations.bits != 16:
            raise PerqError(f"--a-bits {settings.activations.bits}: the ort target leaves activations float in the graph "
                            "(onnxruntime's MatMulNBits quantizes them to int8 inside the kernel); "
                            "use --target simulate for quantized activations in the graph")
        if settings.quantize and settings.weights.bits != 4:
            raise PerqError(f"--w-bits {settings.weights.bits}: the ort target emits INT4 weights (MatMulNBits)")
        group = settings.weights.group
        if settings.quantize and (group < 16 or group & (group - 1)):
            raise PerqError(f"--w-group {group}: MatMulNBits takes blocks of a power of two >= 16 input rows")

    def passes(self, settings: Settings) -> list[Pass]:
        if not settings.quantize:
            return []
        passes: list[Pass] = [self.quantize_weights(settings, lm_head=True)]
        if settings.embedding is not None:
            passes.append(QuantizeEmbedding(settings.embedding, self.table_form(settings)))
        return passes

    def session_config(self) -> dict[str, str]:
        return {"session.qdq_matmulnbits_accuracy_level": ACCURACY_LEVEL}
