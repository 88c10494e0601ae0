"""A tiny decoder in the form onnxruntime-genai's model builder writes for fp32
(``python -m onnxruntime_genai.models.builder -p fp32``), made with onnx.helper and onnxruntime's
real com.microsoft ops, so that tests need no builder:

* the token embedding gathers from a Transpose of the tied ``lm_head`` weight;
* the first input norm is ``SimplifiedLayerNormalization`` (default domain, as the builder leaves
  it: no domain field), every later norm ``SkipSimplifiedLayerNormalization`` (the residual Add of
  o_proj / down_proj and the norm of the sum; output 3 the sum, passed on), the final one without
  output 3, then the lm_head MatMul;
* per layer one packed ``qkv_proj`` MatMul feeding ``GroupQueryAttention`` (key/value inputs
  empty, do_rotary=1 with cos_cache / sin_cache initializers, past/present KV with a symbolic
  head dimension ``kv_cache_dim``), o_proj, and a SiLU-gated MLP (Sigmoid, Mul, Mul);
* a [1]-shaped Constant declared a scalar in value_info (the builder's own slip).

    build(folder, seed=0) -> folder / "model.onnx"   (also genai_config.json and config.json)

Sizes: 2 layers, hidden 64, 4 query heads / 2 kv heads of 16, intermediate 128, vocab 64. Gammas
are 1 + 0.3 randn and two embedding channels are outliers, so a wrong fold shows in the logits.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 64, 64, 2, 4, 2, 16, 128
CONTEXT, THETA = 256, 10000.0
OUTLIERS = (5, 40)
MS = "com.microsoft"


def build(folder, seed: int = 0, dtype=np.float32) -> pathlib.Path:
    """The model at folder / "model.onnx" in `dtype` (float32, or float16 as ``-p fp16`` writes it)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits = _Constants(np.dtype(dtype))
    kind = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    const = inits.add

    def op(op_type, inputs, name, outputs=1, domain=None, **attrs):
        outs = [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        node = helper.make_node(op_type, inputs, outs, name=name, **attrs)
        if domain:  # the builder leaves default-domain nodes without a domain field
            node.domain = domain
        nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def matmul(x, name, rows, cols):
        w = const(f"model.{name}.MatMul.weight".replace("/", "."), rng.standard_normal((rows, cols)) / np.sqrt(rows))
        return op("MatMul", [x, w], f"/model/{name}/MatMul")

    def gamma(name):
        return const(name, 1.0 + 0.3 * rng.standard_normal(HIDDEN))

    # attention mask -> seqlens_k [batch] (int32) and total_sequence_length (int32 scalar)
    one = op("Constant", [], "/model/constant_nodes/INT64/[1]", outputs=["/model/constants/INT64/[1]"],
             value=numpy_helper.from_array(np.array([1], np.int64)))
    total = op("ReduceSum", ["attention_mask", one], "/model/attn_mask_reformat/ReduceSum", keepdims=0)
    seqlens = op("Cast", [op("Sub", [total, one], "/model/attn_mask_reformat/Sub")],
                 "/model/attn_mask_reformat/Sub/Cast", to=TensorProto.INT32)
    width = op("Gather", [op("Shape", ["attention_mask"], "/model/attn_mask_reformat/Shape"),
                          const("/model/constants/INT64/1", 1, np.int64)], "/model/attn_mask_reformat/Gather", axis=0)
    total_len = op("Cast", [width], "/model/attn_mask_reformat/Gather/Cast", to=TensorProto.INT32)
    inv_freq = 1.0 / THETA ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    angle = np.arange(CONTEXT)[:, None] * inv_freq[None, :]
    cos, sin = const("cos_cache", np.cos(angle)), const("sin_cache", np.sin(angle))

    table = rng.standard_normal((VOCAB, HIDDEN))
    table[:, list(OUTLIERS)] *= 20.0
    tied = const("lm_head.MatMul.weight", table.T)
    x = op("Gather", [op("Transpose", [tied], "/model/embed_tokens/Transpose", perm=[1, 0]), "input_ids"],
           "/model/embed_tokens/Gather")
    residual, pending = x, None
    width_qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    for i in range(LAYERS):
        p = f"layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            g = gamma(f"model.{p}.{norm}.weight")
            if pending is None:
                h = op("SimplifiedLayerNormalization", [residual, g], f"/model/{p}/{norm}/LayerNorm",
                       epsilon=1e-5, axis=-1, stash_type=1)
            else:
                name = f"/model/{p}/{norm}/SkipLayerNorm"
                h, _, _, residual = op("SkipSimplifiedLayerNormalization", [residual, pending, g], name,
                                       outputs=[f"{name}/output_0", "", "", f"{name}/output_3"], domain=MS,
                                       epsilon=1e-5)
            if norm == "input_layernorm":
                qkv = matmul(h, f"{p}/attn/qkv_proj", HIDDEN, width_qkv)
                attn = op("GroupQueryAttention",
                          [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total_len,
                           cos, sin], f"/model/{p}/attn/GroupQueryAttention",
                          outputs=[f"/model/{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key",
                                   f"present.{i}.value"], domain=MS, num_heads=HEADS, kv_num_heads=KV_HEADS,
                          scale=1.0 / np.sqrt(HEAD_DIM), local_window_size=-1, softcap=0.0, do_rotary=1,
                          rotary_interleaved=0)[0]
                pending = matmul(attn, f"{p}/attn/o_proj", HEADS * HEAD_DIM, HIDDEN)
            else:
                gate = matmul(h, f"{p}/mlp/gate_proj", HIDDEN, INTERMEDIATE)
                up = matmul(h, f"{p}/mlp/up_proj", HIDDEN, INTERMEDIATE)
                act = op("Mul", [gate, op("Sigmoid", [gate], f"/model/{p}/mlp/act_fn/Sigmoid")],
                         f"/model/{p}/mlp/act_fn/Mul")
                pending = matmul(op("Mul", [act, up], f"/model/{p}/mlp/Mul"), f"{p}/mlp/down_proj", INTERMEDIATE,
                                 HIDDEN)
    final = f"/model/layers.{LAYERS}/final_norm_layernorm/SkipLayerNorm"
    h = op("SkipSimplifiedLayerNormalization", [residual, pending, gamma(f"model.layers.{LAYERS}.final_norm.weight")],
           final, outputs=[f"{final}/output_0"], domain=MS, epsilon=1e-5)
    nodes.append(helper.make_node("MatMul", [h, tied], ["logits"], name="/lm_head/MatMul"))

    cache = ["batch_size", KV_HEADS, "past_sequence_length", "kv_cache_dim"]
    present = ["batch_size", KV_HEADS, "total_sequence_length", "kv_cache_dim"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", kind, ["batch_size", "sequence_length", VOCAB])]
    for kv in ("key", "value"):
        for i in range(LAYERS):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", kind, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", kind, present))
    graph = helper.make_graph(nodes, "main_graph", inputs, outputs, inits.tensors,
                              value_info=[helper.make_tensor_value_info(one, TensorProto.INT64, [])])  # as the builder

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                              producer_name="perq-onnx tests/builder_form.py")
    model.ir_version = 10
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    _write_configs(folder)
    return folder / "model.onnx"


class _Constants:
    """Initializers by name, in the order they were made; float ones in the model's float type."""

    def __init__(self, float_type: np.dtype):
        self.tensors: list[onnx.TensorProto] = []
        self.float_type = float_type

    def add(self, name: str, value, dtype=None) -> str:
        self.tensors.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.float_type), name))
        return name


def _write_configs(folder: pathlib.Path) -> None:
    """genai_config.json as the builder writes it (the past head size lives there) and the Hugging
    Face config.json the genai target reads RoPE from."""
    decoder = {"filename": "model.onnx", "head_size": HEAD_DIM, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
               "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
               "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                          "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"}}
    genai = {"model": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "context_length": CONTEXT,
                       "type": "llama", "vocab_size": VOCAB, "decoder": decoder},
             "search": {"max_length": CONTEXT, "do_sample": False}}
    (folder / "genai_config.json").write_text(json.dumps(genai, indent=4))
    config = {"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "head_dim": HEAD_DIM, "vocab_size": VOCAB, "max_position_embeddings": CONTEXT, "rope_theta": THETA,
              "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 1,
              "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
