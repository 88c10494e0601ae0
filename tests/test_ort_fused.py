"""Graphs made by onnxruntime's own tooling are rewritten exactly: its EXTENDED-level optimized
graph (SimplifiedLayerNormalization, QuickGelu, FusedMatMul, Split-based shape arithmetic), the
transformers optimizer's fusions (SkipSimplifiedLayerNormalization, RotaryEmbedding; what optimum's
--optimize O1..O4 calls), FusedMatMul with transposed weights, and MultiHeadAttention /
GroupQueryAttention attention blocks. The fused variants are made in the test from the tiny
optimum exports (no committed binaries); exactness is measured against the ORIGINAL export."""
from __future__ import annotations

import collections
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from perq_onnx.analysis import AnalysisError, analyze
from perq_onnx.calibration import generate
from perq_onnx.graph import load_graph
from perq_onnx.pipeline import optimize
from perq_onnx.runtime import logits, session
from perq_onnx.settings import Settings

from conftest import random_ids, relative_difference
from handmade import HEADS, build_decoder

TOL = 1e-4


def ort_extended(src, dst):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def transformers_optimizer(level):
    def make(src, dst):
        from onnxruntime.transformers.optimizer import optimize_model
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        optimize_model(str(src), model_type="gpt2", num_heads=4, hidden_size=128,
                       opt_level=level).save_model_to_file(str(dst))
    return make


def transposed_weights(src, dst):
    """Every linear as FusedMatMul(x, W^T, transB=1) (onnxruntime's MatMul + Transpose fusion)."""
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2:
            continue
        t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), f"{w.name}.T.{node.name}")
        model.graph.initializer.append(t)
        node.input[1] = t.name
        node.op_type, node.domain = "FusedMatMul", "com.microsoft"
        node.attribute.extend([helper.make_attribute("transB", 1), helper.make_attribute("alpha", 1.0)])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))


VARIANTS = {  # name -> (maker, fused ops it must contain)
    "ort-extended": (ort_extended, {"SimplifiedLayerNormalization", "QuickGelu", "FusedMatMul"}),
    "transformers-rotary": (transformers_optimizer(0), {"SkipSimplifiedLayerNormalization", "RotaryEmbedding"}),
    "transformers-o2": (transformers_optimizer(2), {"SimplifiedLayerNormalization", "QuickGelu"}),
    "fusedmatmul-transB": (transposed_weights, {"FusedMatMul"}),
}


def ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def fused(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ort-fused")
    cache = {}

    def get(name, past):
        key = (name, past)
        if key not in cache:
            src = tiny_models("llama", past=past)
            dst = root / f"{name}-{'past' if past else 'nopast'}.onnx"
            maker, expected = VARIANTS[name]
            maker(src, dst)
            missing = expected - set(ops(dst))
            assert not missing, (name, past, missing)  # the tools really fused what this test is about
            cache[key] = src, dst
        return cache[key]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("past", [False, True], ids=["nopast", "past"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_no_quant_exact_against_original_export(fused, tmp_path, name, past):
    original, variant = fused(name, past)
    batches = generate(original, 2, 24, seed=0)
    ids = random_ids()
    before = ops(variant)
    for residual in ("full", "block"):
        out = tmp_path / f"{residual}.onnx"
        optimize(variant, out, Settings.parse(block="16", residual_rotation=residual, quantize=False),
                 progress=False, batches=batches)
        assert relative_difference(original, out, ids) < TOL, (name, past, residual)
        after = ops(out)
        for op in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
                   "QuickGelu"):
            assert after[op] == before[op], op  # the contrib ops stay
    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:  # gammas folded: every fused norm's scale is ones
        if node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            scale = node.input[1 if node.op_type == "SimplifiedLayerNormalization" else 2]
            assert np.all(numpy_helper.to_array(inits[scale]) == 1), node.name


@pytest.mark.slow
@pytest.mark.parametrize("target", ["simulate", "ort"])
@pytest.mark.parametrize("name,past", [("transformers-rotary", True), ("ort-extended", False)])
def test_quantized_outputs_run(fused, tmp_path, name, past, target):
    original, variant = fused(name, past)
    out = tmp_path / "q.onnx"
    optimize(variant, out, Settings.parse(block="16", target=target), progress=False,
             batches=generate(original, 2, 24, seed=0))
    la, lb = logits(session(original), random_ids()), logits(session(out), random_ids())
    assert np.isfinite(lb).all() and 0 < np.abs(la - lb).max() / np.abs(la).max() < 1.0
    assert ops(out)["SkipSimplifiedLayerNormalization" if name == "transformers-rotary" else
                    "SimplifiedLayerNormalization"] > 0


def _edit(src, dst, change):
    model = onnx.load(str(src))
    change(model)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.slow
def test_skip_norm_with_bias_is_refused(fused, tmp_path):
    _, variant = fused("transformers-rotary", True)

    def add_bias(model):
        node = next(n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
        model.graph.initializer.append(numpy_helper.from_array(np.full(128, 0.1, np.float32), "skip_bias"))
        node.input.append("skip_bias")
    path = _edit(variant, tmp_path / "bias.onnx", add_bias)
    with pytest.raises(AnalysisError, match="SkipLayerNorm_0.*bias input"):
        analyze(load_graph(path))


@pytest.mark.slow
def test_norm_with_computed_scale_is_refused(fused, tmp_path):
    _, variant = fused("ort-extended", False)

    def computed_scale(model):
        node = next(n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization")
        model.graph.node.append(helper.make_node("Sin", [node.input[1]], ["sin_scale"], name="sin_scale"))
        node.input[1] = "sin_scale"
    path = _edit(variant, tmp_path / "scale.onnx", computed_scale)
    with pytest.raises(AnalysisError, match="scale is not a constant vector"):
        analyze(load_graph(path))


# ------------------------------------------------------------------ fused attention blocks

def _fused_attention(src, dst, kind):
    """The handmade decoder with each attention core (q/k/v reshape .. merge) replaced by one
    com.microsoft MultiHeadAttention or GroupQueryAttention node."""
    model = onnx.load(str(src))
    layers = sorted({n.name.split(".attn/")[0] for n in model.graph.node if ".attn/" in n.name})
    nodes = [n for n in model.graph.node if ".attn/" not in n.name]
    extra = []
    if kind == "GroupQueryAttention":
        model.graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "i1"),
                                        numpy_helper.from_array(np.array([0], np.int64), "i0"),
                                        numpy_helper.from_array(np.array(1, np.int32), "one32")])
        extra = [helper.make_node("Shape", ["input_ids"], ["ids_shape"], name="ids_shape"),
                 helper.make_node("Gather", ["ids_shape", "i1"], ["seq"], name="seq", axis=0),
                 helper.make_node("Cast", ["seq"], ["total"], name="total", to=TensorProto.INT32),
                 helper.make_node("Sub", ["total", "one32"], ["last"], name="last"),
                 helper.make_node("Gather", ["ids_shape", "i0"], ["batch"], name="batch", axis=0),
                 helper.make_node("Expand", ["last", "batch"], ["seqlens"], name="seqlens")]
    for p in layers:
        qkv = [f"{p}.attn.{x}_proj" for x in "qkv"]
        if kind == "MultiHeadAttention":
            node = helper.make_node(kind, qkv, [f"{p}.attn/merge"], name=f"{p}.attn/mha", domain="com.microsoft",
                                    num_heads=HEADS)
        else:
            node = helper.make_node(kind, qkv + ["", "", "seqlens", "total"], [f"{p}.attn/merge"],
                                    name=f"{p}.attn/gqa", domain="com.microsoft", num_heads=HEADS, kv_num_heads=1)
        index = next(i for i, n in enumerate(nodes) if n.name == f"{p}.attn.o_proj")
        nodes.insert(index, node)
    model.graph.ClearField("node")
    model.graph.node.extend(extra + nodes)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("kind", ["MultiHeadAttention", "GroupQueryAttention"])
def test_fused_attention_blocks_exact(tmp_path, kind):
    src = build_decoder(tmp_path / "handmade.onnx", kv_heads=HEADS if kind == "MultiHeadAttention" else 1)
    path = _fused_attention(src, tmp_path / "fused.onnx", kind)
    structure = analyze(load_graph(path))
    assert all(layer.v.name.endswith("v_proj") and layer.o.name.endswith("o_proj") for layer in structure.layers)
    ids = random_ids(vocab=64, seq=12)
    out = tmp_path / "out.onnx"
    optimize(path, out, Settings.parse(block="16", quantize=False), progress=False,
             batches=random_ids(vocab=64, seq=16, seed=3))
    assert relative_difference(path, out, ids) < TOL
    assert ops(out)[kind] == len(structure.layers)
    w_in = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    w_out = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    assert not any(n in w_out and np.array_equal(w_out[n], w_in[n]) for n in w_in if "v_proj" in n)  # R2 applied
