"""A small decoder LLM built by hand with onnx.helper (no torch, no optimum), in the form
perq_onnx.analysis recognises: token-embedding Gather, decomposed RMSNorms
(Pow -> ReduceMean(axes=[-1]) -> Add eps -> Sqrt -> Div(1, .) -> Mul(x, .) -> Mul gamma),
rope-free multi-head attention (optionally grouped-query with one kv head), a SiLU-gated MLP
(Sigmoid(g) * g * up) and an lm_head producing ``logits``. Weights are random with a seed,
gammas are 1 + 0.3 * randn, and a few hidden channels of the embedding are outliers, so a
rotation or permutation that is folded wrongly shows in the logits.

    build_decoder(path, kv_heads=2, seed=0) -> path      (a single .onnx file, weights embedded)
"""
from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, LAYERS, HEADS, HEAD_DIM, INTERMEDIATE = 64, 32, 2, 2, 16, 64
OUTLIERS = (3, 17)


def build_decoder(path, kv_heads: int = HEADS, seed: int = 0, ir_version: int = 9) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(name, rows, cols):
        return const(name, rng.standard_normal((rows, cols)) / np.sqrt(rows))

    def op(op_type, inputs, name, **attrs):
        nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    const("two", 2.0)
    const("one", 1.0)
    const("eps", 1e-6)
    const("last_axis", [-1], np.int64)
    const("scale", 1.0 / np.sqrt(HEAD_DIM))
    const("q_shape", [0, 0, HEADS, HEAD_DIM], np.int64)
    const("kv_shape", [0, 0, kv_heads, HEAD_DIM], np.int64)
    const("merged_shape", [0, 0, HEADS * HEAD_DIM], np.int64)

    def rmsnorm(x, prefix):
        sq = op("Pow", [x, "two"], f"{prefix}/pow")
        mean = op("ReduceMean", [sq, "last_axis"], f"{prefix}/mean", keepdims=1)
        rms = op("Sqrt", [op("Add", [mean, "eps"], f"{prefix}/add_eps")], f"{prefix}/sqrt")
        normalized = op("Mul", [x, op("Div", ["one", rms], f"{prefix}/inv")], f"{prefix}/normalize")
        gamma = const(f"{prefix}.gamma", 1.0 + 0.3 * rng.standard_normal(HIDDEN))
        return op("Mul", [normalized, gamma], f"{prefix}/gamma")

    def linear(x, name, rows, cols):
        return op("MatMul", [x, weight(f"{name}.weight", rows, cols)], name)

    table = rng.standard_normal((VOCAB, HIDDEN))
    table[:, list(OUTLIERS)] *= 20.0  # outlier hidden channels
    x = op("Gather", [const("embed_tokens.weight", table), "input_ids"], "embed_tokens", axis=0)
    kv = kv_heads * HEAD_DIM
    for i in range(LAYERS):
        p = f"layers.{i}"
        h = rmsnorm(x, f"{p}.input_layernorm")
        q = linear(h, f"{p}.attn.q_proj", HIDDEN, HEADS * HEAD_DIM)
        k = linear(h, f"{p}.attn.k_proj", HIDDEN, kv)
        v = linear(h, f"{p}.attn.v_proj", HIDDEN, kv)
        q = op("Transpose", [op("Reshape", [q, "q_shape"], f"{p}.attn/q_reshape")], f"{p}.attn/q_t",
               perm=[0, 2, 1, 3])
        kt = op("Transpose", [op("Reshape", [k, "kv_shape"], f"{p}.attn/k_reshape")], f"{p}.attn/k_t",
                perm=[0, 2, 3, 1])
        v = op("Transpose", [op("Reshape", [v, "kv_shape"], f"{p}.attn/v_reshape")], f"{p}.attn/v_t",
               perm=[0, 2, 1, 3])
        scores = op("Mul", [op("MatMul", [q, kt], f"{p}.attn/qk"), "scale"], f"{p}.attn/scaled")
        probs = op("Softmax", [scores], f"{p}.attn/softmax", axis=-1)
        ctx = op("Transpose", [op("MatMul", [probs, v], f"{p}.attn/pv")], f"{p}.attn/ctx_t", perm=[0, 2, 1, 3])
        ctx = op("Reshape", [ctx, "merged_shape"], f"{p}.attn/merge")
        x = op("Add", [x, linear(ctx, f"{p}.attn.o_proj", HEADS * HEAD_DIM, HIDDEN)], f"{p}/attn_residual")
        h = rmsnorm(x, f"{p}.post_attention_layernorm")
        gate = linear(h, f"{p}.mlp.gate_proj", HIDDEN, INTERMEDIATE)
        up = linear(h, f"{p}.mlp.up_proj", HIDDEN, INTERMEDIATE)
        act = op("Mul", [op("Sigmoid", [gate], f"{p}.mlp/sigmoid"), gate], f"{p}.mlp/silu")
        gated = op("Mul", [act, up], f"{p}.mlp/gated")
        x = op("Add", [x, linear(gated, f"{p}.mlp.down_proj", INTERMEDIATE, HIDDEN)], f"{p}/mlp_residual")
    h = rmsnorm(x, "norm")
    nodes.append(helper.make_node("MatMul", [h, weight("lm_head.weight", HIDDEN, VOCAB)], ["logits"],
                                  name="lm_head"))
    graph = helper.make_graph(
        nodes, "handmade_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=ir_version,
                              producer_name="perq-onnx tests/handmade.py")
    onnx.checker.check_model(model, full_check=True)
    path = pathlib.Path(path)
    onnx.save(model, str(path))
    return path
