"""What the onnxruntime-genai form takes from its source besides the weights: the model's
config and the rotary caches (genai_decoder.py builds the decoder with them).

* config: the Hugging Face ``config.json`` beside the source (model type, context length, RoPE,
  token ids), or, in a folder of onnxruntime-genai's model builder, which has none, its
  ``genai_config.json`` (model type, context length, token ids; no rope_theta);
* rotary caches: the source graph's own when it already runs GroupQueryAttention with rotary
  (the builder's cos_cache / sin_cache, reused bit for bit), else computed as Hugging Face's
  default RoPE does from rope_theta (with the exporter's own inverse frequencies when the graph
  holds them). RoPE scaling, partial rotary and interleaved rotary are refused.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .errors import PerqError
from .shapes import constant_value
from .weights import read as _read

MODEL_TYPES = ("llama", "mistral", "qwen2")


class GenaiError(PerqError):
    """The model cannot be written in the onnxruntime-genai form; names the reason."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    context_length: int
    rope_theta: float | None   # None: the source graph's rotary caches (read_genai)
    bos_token_id: int | None
    eos_token_id: int | list | None
    pad_token_id: int | None
    sliding_window: int | None
    raw: dict

    @classmethod
    def read(cls, path) -> "ModelConfig":
        path = pathlib.Path(path)
        if not path.is_file() and (path.parent / "genai_config.json").is_file():
            return cls.read_genai(path.parent / "genai_config.json")
        if not path.is_file():
            raise GenaiError(f"{path}: no config.json (the genai form needs the Hugging Face config for RoPE)")
        c = json.loads(path.read_text())
        kind = c.get("model_type")
        if kind not in MODEL_TYPES:
            raise GenaiError(f"{path}: model_type {kind!r}: the genai form supports {', '.join(MODEL_TYPES)}")
        act = c.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise GenaiError(f"{path}: hidden_act {act!r}: the genai form builds SiLU gating only")
        rope = c.get("rope_parameters") or {}
        scaling = c.get("rope_scaling")
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else rope.get("rope_type")
        if rope_type not in (None, "default"):
            raise GenaiError(f"{path}: rope_scaling {scaling or rope!r}: RoPE scaling is not supported by the genai "
                             "form (its cos/sin caches are the unscaled ones)")
        if float(c.get("partial_rotary_factor", 1.0)) != 1.0:
            raise GenaiError(f"{path}: partial_rotary_factor {c['partial_rotary_factor']}: partial rotary is not "
                             "supported by the genai form")
        theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
        window = c.get("sliding_window") if (kind != "qwen2" or c.get("use_sliding_window")) else None
        context = int(c.get("max_position_embeddings") or 2048)
        if window is not None and window < context:
            raise GenaiError(f"{path}: sliding_window {window} < max_position_embeddings {context}: sliding-window "
                             "attention is not supported by the genai form yet")
        return cls(kind, context, float(theta), c.get("bos_token_id"), c.get("eos_token_id"),
                   c.get("pad_token_id"), window, c)

    @classmethod
    def read_genai(cls, path: pathlib.Path) -> "ModelConfig":
        """The model builder's genai_config.json (its folders have no config.json); RoPE then
        comes from the source graph's cos/sin caches (source_rope_caches)."""
        m = json.loads(path.read_text()).get("model") or {}
        if m.get("type") not in MODEL_TYPES:
            raise GenaiError(f"{path}: model type {m.get('type')!r}: the genai form supports {', '.join(MODEL_TYPES)}")
        return cls(m["type"], int(m.get("context_length") or 2048), None, m.get("bos_token_id"), m.get("eos_token_id"),
                   m.get("pad_token_id"), None, {})


def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i / d) for i < d / 2, the exponent in float32 as Hugging Face forms it, the power
    correctly rounded to float32."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float64(theta) ** exponent.astype(np.float64))).astype(np.float32)


def rope_caches(head_dim: int, theta: float, length: int, inv_freq: np.ndarray | None = None):
    """cos, sin [length, head_dim / 2] as Hugging Face's default RoPE computes them in float32:
    inv_freq = 1 / theta^(2i / d), angle = float32(position) * inv_freq (one float32 product)."""
    if inv_freq is None:
        inv_freq = default_inv_freq(head_dim, theta)
    angle = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def _graph_inv_freq(graph: gs.Graph, reference: np.ndarray) -> np.ndarray | None:
    """The exporter's own inverse frequencies (a [d/2]-element float constant equal to the
    computed ones to 1e-5), so the caches match the source graph's rotary bit for bit."""
    candidates = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    candidates += [n.attrs["value"] for n in graph.nodes if n.op == "Constant" and isinstance(n.attrs.get("value"),
                                                                                              gs.Constant)]
    for t in candidates:
        if t.shape is None or int(np.prod(t.shape)) != reference.size:
            continue
        value = _read(t)
        if np.issubdtype(value.dtype, np.floating) and np.allclose(value.reshape(-1), reference, rtol=1e-5, atol=0):
            return np.asarray(value, dtype=np.float32).reshape(-1)
    return None


def source_rope_caches(graph: gs.Graph, config: ModelConfig, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [length, head_dim / 2] for the decoder's GroupQueryAttention (module docstring)."""
    for node in graph.nodes:
        if node.op == "GroupQueryAttention" and node.attrs.get("do_rotary") and len(node.inputs) > 8:
            if node.attrs.get("rotary_interleaved", 0):
                raise GenaiError(f"node '{node.name}': interleaved rotary is not supported by the genai form")
            cos, sin = (constant_value(t) for t in node.inputs[7:9])
            if cos is not None and sin is not None and cos.shape == sin.shape and cos.shape[-1] == head_dim // 2:
                return np.asarray(cos, np.float32), np.asarray(sin, np.float32)
    if config.rope_theta is None:
        raise GenaiError("no rope_theta (a genai_config.json without config.json) and no rotary caches in the source "
                         "graph: the genai form cannot build its rotary")
    inv_freq = _graph_inv_freq(graph, default_inv_freq(head_dim, config.rope_theta))
    return rope_caches(head_dim, config.rope_theta, config.context_length, inv_freq)
