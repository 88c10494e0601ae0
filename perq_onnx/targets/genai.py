"""``genai``: the ort target's quantization, written as an onnxruntime-genai model folder.

The same rounding and weight form as ``ort`` (INT4 with GPTQ and activation-aware full-range
scales, lm_head INT4), in blocks of 64 input rows where they divide every linear's input (else
32, ort's): MatMulNBits at accuracy level 4 decodes SmolLM2 1.12x faster here with blocks of 64
than of 32 for +0.5% held-out valid perplexity (24.77 vs 24.64; blocks of 128: 1.22x, 25.21;
the perq-genai-b32/-b128 rows of benchmarks/deploy.py, README), but the embedding is gathered from lm_head's INT4 codes when
the model ties them (one table, see passes/tie_lm_head.py; chosen on valid windows: 24.49 vs
24.63 for a table of its own, 16% smaller, decode level) and INT4 blocks of its own otherwise
(``--embedding int4|int8|tied`` chooses), and the decoder is rebuilt in onnxruntime's
fused LLM form (perq_onnx/genai.py: GroupQueryAttention with a KV cache and rotary inside,
Skip/SimplifiedLayerNormalization, MatMulNBits with accuracy_level 4 in the nodes, or with
``--kernel int8`` DynamicQuantizeMatMul / MatMulInteger over INT8 weights widened at load for
every decoder linear; ``--kernel int8-prompt`` both, as two graphs on one weight file, the INT8
one for prompts and the MatMulNBits one for token generation; the online rotation as standard ops) and written with ``genai_config.json``, config.json, the tokenizer and
the chat template beside it, so that ``onnxruntime_genai.Model(folder)`` runs it, as does a plain
onnxruntime session (``perq-onnx eval``). Float32 Llama, Mistral and Qwen2 exports; others are
refused with the reason.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

from ..genai import write_genai_files
from ..genai_decoder import ModelConfig, check_structure
from ..passes.base import Context, Pass
from ..passes.tie_lm_head import TieLmHead
from ..settings import Embedding, Kernel, Settings
from .ort import Ort

ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: 1.57x faster decode than level 0 here (benchmarks/deploy.py, perq-genai-acc0)


@dataclass(frozen=True)
class Genai(Ort):
    name: str = "genai"
    default_w_groups: tuple[int, ...] = (64, 32)
    embeddings: tuple[Embedding, ...] = (Embedding.INT4, Embedding.INT8, Embedding.TIED)
    kernels: tuple[Kernel, ...] = (Kernel.NBITS, Kernel.INT8, Kernel.INT8_PROMPT)

    def passes(self, settings: Settings) -> list[Pass]:
        passes = super().passes(settings)
        if settings.quantize and settings.embedding is Embedding.TIED:
            passes.insert(0, TieLmHead())
        return passes

    def session_config(self) -> dict[str, str]:
        return {}  # the accuracy level is an attribute of each MatMulNBits node

    def check_model(self, source_dir: pathlib.Path, structure, graph) -> None:
        ModelConfig.read(source_dir / "config.json")
        check_structure(structure)

    def write(self, ctx: Context, path: pathlib.Path, source_dir: pathlib.Path,
              settings: Settings) -> list[pathlib.Path]:
        return write_genai_files(ctx.graph, ctx.structure, path, source_dir / "config.json", source_dir,
                                 ACCURACY_LEVEL, ctx.metadata, kernel=settings.kernel or Kernel.NBITS)
