"""onnxruntime-genai's model builder's own float graphs as input (tests/builder_form.py makes one:
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization, packed-QKV GroupQueryAttention
with rotary and a KV cache, the embedding gathered from the tied lm_head weight). Every rotation,
on its own and all together, is exact through a prompt and decode steps with the KV cache; the ort
and genai targets run close to float (the genai folder, float, exactly); what cannot be followed is
refused naming the node."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from perq_onnx.analysis import AnalysisError, analyze
from perq_onnx.errors import PerqError
from perq_onnx.graph import load_graph
from perq_onnx.pipeline import optimize
from perq_onnx.runtime import make_feeds, session
from perq_onnx.settings import Settings

from builder_form import HEAD_DIM, HEADS, KV_HEADS, LAYERS, VOCAB, build
from conftest import random_ids

TOL = 1e-4
PROMPT, STEPS = 9, 4
V_COLUMNS = slice((HEADS + KV_HEADS) * HEAD_DIM, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
ROTATIONS = {  # name -> settings of that rewrite alone (and all of them)
    "R1": dict(residual_rotation="full", head_rotation=False, permute="none", block="none"),
    "R2": dict(residual_rotation="none", head_rotation=True, permute="none", block="none"),
    "P3+R3": dict(residual_rotation="none", head_rotation=False, permute="massdiff", block="16"),
    "all": dict(residual_rotation="full", block="16"),
    "all-block-residual": dict(residual_rotation="block", block="16"),
}


@pytest.fixture(scope="module")
def builder_model(tmp_path_factory):
    return build(tmp_path_factory.mktemp("builder") / "fp32")


def calibration():
    return random_ids(vocab=VOCAB, seq=16, seed=3)


def cached_logits(path, ids: np.ndarray) -> np.ndarray:
    """Logits of the first PROMPT tokens with an empty cache, then of each later token alone,
    fed with the present key/values the model returned: [batch, len(ids), vocab]."""
    sess = session(path)
    cache = {i.name: "present" + i.name[len("past_key_values"):] for i in sess.get_inputs()
             if i.name.startswith("past_key_values")}
    assert len(cache) == 2 * LAYERS
    feeds = make_feeds(sess, ids[:, :PROMPT])
    names = ["logits", *cache.values()]
    steps = []
    for t in range(PROMPT, ids.shape[1] + 1):
        out = dict(zip(names, sess.run(names, feeds)))
        steps.append(out["logits"])
        if t == ids.shape[1]:
            break
        feeds = {"input_ids": ids[:, t:t + 1], "attention_mask": np.ones((ids.shape[0], t + 1), np.int64)}
        feeds.update({past: out[present] for past, present in cache.items()})
    return np.concatenate(steps, axis=1)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def weights(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def node_inputs(path, op: str) -> list[list[str]]:
    return [list(n.input) for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op]


def test_analysis_reads_the_builder_form(builder_model):
    s = analyze(load_graph(builder_model))
    assert len(s.layers) == LAYERS and s.head_dim == HEAD_DIM and s.vocab_size == VOCAB
    layer = s.layers[0]
    assert layer.q.name == layer.k.name == layer.v.name and layer.q.name.endswith("qkv_proj/MatMul")
    assert (layer.q.columns, layer.k.columns, layer.v.columns) == ((0, 64), (64, 96), (96, 128))
    assert (layer.num_heads, layer.num_kv_heads) == (HEADS, KV_HEADS)
    assert list(layer.linears()) == ["qkv", "o", "gate", "up", "down"]
    assert layer.input_norm.gamma.endswith("input_layernorm/LayerNorm")  # SimplifiedLayerNormalization
    assert s.layers[1].input_norm.gamma.endswith("SkipLayerNorm") and s.final_norm.gamma.endswith("SkipLayerNorm")
    assert s.residual_blocker is None and len(s.writers) == 2 * LAYERS


@pytest.mark.parametrize("name", list(ROTATIONS))
def test_no_quant_exact_through_the_kv_cache(builder_model, tmp_path, name):
    out = tmp_path / "model.onnx"
    optimize(builder_model, out, Settings.parse(quantize=False, **ROTATIONS[name]), progress=False,
             batches=calibration())
    ids = random_ids(vocab=VOCAB, seq=PROMPT + STEPS, seed=7)
    assert relative(cached_logits(builder_model, ids), cached_logits(out, ids)) < TOL, name
    before, after = weights(builder_model), weights(out)
    qkv = [inputs[1] for inputs in node_inputs(out, "MatMul") if "qkv_proj" in inputs[1]][0]
    original_qkv = before["model.layers.0.attn.qkv_proj.MatMul.weight"]
    rotated_v = not np.allclose(after[qkv][:, V_COLUMNS], original_qkv[:, V_COLUMNS])
    block_hadamards = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)["BlockHadamard"]
    if name == "R2":  # only the V columns of the packed weight change
        assert rotated_v and np.array_equal(after[qkv][:, :V_COLUMNS.start], original_qkv[:, :V_COLUMNS.start])
    if name == "R1":  # gammas folded (every fused norm's scale is ones), the embedding rotated
        for op, index in (("SimplifiedLayerNormalization", 1), ("SkipSimplifiedLayerNormalization", 2)):
            assert all(np.all(after[inputs[index]] == 1) for inputs in node_inputs(out, op))
        table = after[next(i[0] for i in node_inputs(out, "Gather") if i[1] == "input_ids")]
        assert table.shape == (VOCAB, 64) and not np.allclose(table, before["lm_head.MatMul.weight"].T)
    assert block_hadamards == (LAYERS if ROTATIONS[name]["block"] == "16" else 0)


def test_output_declares_the_cache_head_size(builder_model, tmp_path):
    """The builder leaves the past head dimension symbolic (its genai_config.json gives it); the
    front end sets it from the attention, so the output runs without that file."""
    out = tmp_path / "model.onnx"
    optimize(builder_model, out, Settings.parse(quantize=False), progress=False, batches=calibration())
    model = onnx.load(str(out), load_external_data=False)
    past = [i for i in model.graph.input if i.name.startswith("past_key_values")]
    assert past and all(i.type.tensor_type.shape.dim[3].dim_value == HEAD_DIM for i in past)


def test_ort_target_runs_close_to_float(builder_model, tmp_path):
    out = tmp_path / "model.onnx"
    optimize(builder_model, out, Settings.parse(target="ort", rounding="rtn"), progress=False, batches=calibration())
    ops = collections.Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
    assert ops["DequantizeLinear"] >= 5 * LAYERS and ops["GroupQueryAttention"] == LAYERS
    ids = random_ids(vocab=VOCAB, seq=PROMPT + STEPS, seed=7)
    a, b = cached_logits(builder_model, ids), cached_logits(out, ids)
    assert np.isfinite(b).all() and 0 < relative(a, b) < 0.25
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.5


def test_genai_target_from_a_builder_folder(tmp_path):
    """A builder folder has genai_config.json and no config.json: the genai target takes the
    model type from it and the rotary caches from the graph; float, the folder is exact through
    the KV cache (the packed qkv weight read back as its q/k/v columns and packed again)."""
    source = build(tmp_path / "builder")
    (tmp_path / "builder" / "config.json").unlink()
    ids = random_ids(vocab=VOCAB, seq=PROMPT + STEPS, seed=7)
    reference = cached_logits(source, ids)
    for quantize, tolerance in ((False, TOL), (True, 0.25)):
        out = tmp_path / f"genai-{quantize}" / "model.onnx"
        optimize(source, out, Settings.parse(target="genai", quantize=quantize, rounding="rtn"), progress=False,
                 batches=calibration())
        assert (out.parent / "genai_config.json").is_file()
        ops = collections.Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
        assert ops["GroupQueryAttention"] == LAYERS and ops["MatMulNBits" if quantize else "MatMul"] >= 5 * LAYERS + 1  # qkv, o, gate, up, down, lm_head
        assert relative(reference, cached_logits(out, ids)) < tolerance, quantize


def test_float16_builder_graph(tmp_path):
    """The builder's fp16 form (every float in float16) is rewritten exactly up to float16 rounding
    (as tests/test_fp16.py holds optimum's); the genai form, written for float32, refuses it."""
    source = build(tmp_path / "fp16", dtype=np.float16)
    out = tmp_path / "out" / "model.onnx"
    optimize(source, out, Settings.parse(quantize=False), progress=False, batches=calibration())
    ids = random_ids(vocab=VOCAB, seq=PROMPT + STEPS, seed=7)
    a, b = (cached_logits(path, ids).astype(np.float32) for path in (source, out))
    assert relative(a, b) < 1e-2
    with pytest.raises(PerqError, match="written for float32 graphs"):
        optimize(source, tmp_path / "genai" / "model.onnx", Settings.parse(target="genai"), progress=False,
                 batches=calibration())


def _edited(src, dst, change):
    model = onnx.load(str(src))
    change(model)
    onnx.save(model, str(dst))
    return dst


def test_refusals_name_the_node(builder_model, tmp_path):
    def extra_reader(model):  # the packed qkv output also read by something outside the attention
        qkv = next(n for n in model.graph.node if n.op_type == "MatMul" and "qkv_proj" in n.name)
        model.graph.node.append(onnx.helper.make_node("Relu", [qkv.output[0]], ["peek"], name="peek"))
        model.graph.output.append(onnx.helper.make_tensor_value_info("peek", onnx.TensorProto.FLOAT, None))

    def wrong_heads(model):  # 128 packed columns are not (5 + 2 x 2) heads of one size
        gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
        next(a for a in gqa.attribute if a.name == "num_heads").i = 5

    def skip_bias(model):
        skip = next(n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
        model.graph.initializer.append(numpy_helper.from_array(np.full(64, 0.1, np.float32), "skip_bias"))
        skip.input.append("skip_bias")

    cases = [(extra_reader, "node 'peek': reads the packed QKV output"),
             (wrong_heads, "GroupQueryAttention': packed QKV of 128 columns does not split"),
             (skip_bias, "SkipLayerNorm': SkipSimplifiedLayerNormalization with a bias input")]
    for change, message in cases:
        path = _edited(builder_model, tmp_path / f"{change.__name__}.onnx", change)
        with pytest.raises(AnalysisError, match=message.replace("(", r"\(")):
            analyze(load_graph(path))


def test_tensorrt_target_refuses_onnxruntime_ops_before_any_work(builder_model, tmp_path):
    """The builder's fused norms and GroupQueryAttention are onnxruntime ops: --target tensorrt
    refuses them up front, naming the first one, instead of failing its checker after the work."""
    with pytest.raises(PerqError, match=r"node '.*LayerNorm.*': .*SimplifiedLayerNormalization is an onnxruntime op"):
        optimize(builder_model, tmp_path / "out.onnx", Settings.parse(target="tensorrt", calib_samples=2, seq_len=16),
                 progress=False)
