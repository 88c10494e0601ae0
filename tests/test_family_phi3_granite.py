"""Phi-3 (fused qkv_proj and gate_up_proj, read through Slices) and Granite (scalar embedding,
residual, attention and logits multipliers): tiny random-weight optimum exports (models/tiny.py,
PHI3_GRANITE_ARCHS) are rewritten exactly with --no-quant (with and without KV cache, including a
decode step that reads the cache back), their quantized outputs run, and what is still not
understood is refused with a one-line error naming the node.

Each model is exported once per module; calibration statistics are collected once per model.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import mutations as m
from perq_onnx.analysis import AnalysisError, analyze
from perq_onnx.calibration import generate
from perq_onnx.cli import main
from perq_onnx.graph import load_graph
from perq_onnx.models import tiny
from perq_onnx.pipeline import calibrate, optimize
from perq_onnx.runtime import logits, make_feeds, session
from perq_onnx.settings import Settings

from conftest import family_exporter, family_id as _id, random_ids, relative_difference

TOL = 1e-4
DEFAULT_TIED = {"phi3": False, "granite": True}   # Phi-3-mini untied, Granite 3.x tied
ATTN, MLP = "/model/layers.0/self_attn", "/model/layers.0/mlp"
MODELS = [(arch, past) for arch in tiny.PHI3_GRANITE_ARCHS for past in (False, True)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(path, calibration statistics) of each tiny model, exported and calibrated once."""
    return family_exporter(tmp_path_factory.mktemp("phi3_granite"), DEFAULT_TIED,
                           lambda path: calibrate(path, generate(path, 2, 32, seed=0), progress=False))


def _save(model: onnx.ModelProto, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return str(path)


# ---------------------------------------------------------------------------- the exports

@pytest.mark.slow
@pytest.mark.parametrize("arch", tiny.PHI3_GRANITE_ARCHS)
def test_export_matches_torch(exported, arch):
    """The ONNX export computes what the transformers model does (multipliers included)."""
    path, _ = exported(arch)
    ids = random_ids(batch=1, seq=12)
    with torch.no_grad():
        ref = tiny.build_model(arch, DEFAULT_TIED[arch])(torch.from_numpy(ids)).logits.numpy()
    got = logits(session(path), ids)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow
def test_phi3_regions_fold_into_fused_slices(exported):
    s = analyze(load_graph(exported("phi3")[0]))
    layer = s.layers[0]
    qkv, gate_up = f"{ATTN}/qkv_proj/MatMul", f"{MLP}/gate_up_proj/MatMul"
    assert {layer.q.name, layer.k.name, layer.v.name} == {qkv}
    assert (layer.q.columns, layer.k.columns, layer.v.columns) == ((0, 128), (128, 192), (192, 256))
    assert layer.num_kv_heads == 2 and layer.num_heads == 4 and layer.head_dim == 32
    assert {layer.gate.columns, layer.up.columns} == {(0, 256), (256, 512)} and layer.gate.columns == (0, 256)
    assert list(layer.linears()) == ["qkv", "o", "gate_up", "down"]
    assert layer.linears()["qkv"].shape == (128, 256) and layer.linears()["gate_up"].shape == (128, 512)
    # R1 reads the whole fused weights (rows), once each
    readers = [r.name for r in layer.input_norm.readers + layer.mlp_norm.readers]
    assert readers == [qkv, gate_up]
    heads = [(f.node, f.axis, f.start, f.stop) for f in s.heads_region(layer).folds]
    assert heads == [(qkv, 1, 192, 256), (f"{ATTN}/o_proj/MatMul", 0, 0, 128)]
    mlp = [(f.node, f.axis, f.start, f.stop) for f in s.mlp_region(layer).folds]
    assert mlp == [(gate_up, 1, 0, 256), (gate_up, 1, 256, 512), (f"{MLP}/down_proj/MatMul", 0, 0, 256)]


@pytest.mark.slow
def test_granite_multipliers_stay_in_place(exported):
    s = analyze(load_graph(exported("granite")[0]))
    assert len(s.writers) == 4 and len(s.readers()) == 11
    model = onnx.load(exported("granite")[0])
    scalars = [n.name for n in model.graph.node if n.name in ("/model/Mul", "/model/layers.0/Mul", "/Div")]
    assert len(scalars) == 3  # embedding x12, o_proj x0.22, logits / 8


# ------------------------------------------------------------------------------ exactness

SETTINGS = [dict(block="16", permute="massdiff", residual_rotation="full"),
            dict(block="32", permute="zigzag", residual_rotation="block"),
            dict(block="64", permute="random", residual_rotation="full"),
            dict(block="full", permute="none", residual_rotation="full")]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS, ids=_id)
def test_no_quant_output_equals_input(exported, tmp_path, model):
    path, stats = exported(*model)
    ids = random_ids()
    worst = 0.0
    for i, kw in enumerate(SETTINGS):
        out = tmp_path / f"{i}.onnx"
        optimize(path, out, Settings.parse(quantize=False, **kw), stats=stats, progress=False)
        diff = relative_difference(path, out, ids)
        assert diff < TOL, (kw, diff)
        worst = max(worst, diff)
    assert worst > 0.0
    w_in = {i.name for i in onnx.load(path).graph.initializer}
    w_out = {i.name for i in onnx.load(out).graph.initializer}
    assert not w_in & {n for n in w_out if "MatMul" in n}  # every linear weight was rewritten


def _step(sess, ids, past=None, past_len=0):
    feeds = make_feeds(sess, ids)
    if past is not None:
        b, n = ids.shape
        feeds.update(past)
        feeds["attention_mask"] = np.ones((b, past_len + n), np.int64)
        feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + n), (b, n)).astype(np.int64)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(names, feeds)))
    return out["logits"], {k.replace("present.", "past_key_values."): v for k, v in out.items() if k != "logits"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", tiny.PHI3_GRANITE_ARCHS)
def test_kv_cache_decode_is_exact(exported, tmp_path, arch):
    """Prefill, then decode reading the cache back: the value cache is stored in the R2-rotated
    basis (for Phi-3: the V columns of qkv_proj) and read back by the same rewritten model."""
    path, stats = exported(arch, past=True)
    out = tmp_path / "out.onnx"
    optimize(path, out, Settings.parse(block="16", quantize=False), stats=stats, progress=False)
    ids = random_ids(seq=16)
    results = []
    for p in (path, out):
        sess = session(p)
        first, past = _step(sess, ids[:, :10])
        second, _ = _step(sess, ids[:, 10:], past, past_len=10)
        results.append((first, second, past["past_key_values.0.value"]))
    (f0, s0, v0), (f1, s1, v1) = results
    assert np.abs(f0 - f1).max() < TOL * np.abs(f0).max()
    assert np.abs(s0 - s1).max() < TOL * np.abs(s0).max()
    assert np.abs(v0 - v1).max() > 1e-3  # the cache really is in another basis


@pytest.mark.slow
def test_phi3_qkv_split_instead_of_slices_is_exact(exported, tmp_path):
    """The same fused qkv cut by one Split of the last axis (sizes 128, 64, 64) is read as the
    three projections and rewritten exactly."""
    path, stats = exported("phi3")
    model = onnx.load(path)
    slices = [m.node(model, f"{ATTN}/{name}") for name in ("Slice", "Slice_1", "Slice_2")]
    outputs = [s.output[0] for s in slices]
    sizes = m.add_initializer(model, "qkv_split_sizes", np.array([128, 64, 64], np.int64))
    split = helper.make_node("Split", [slices[0].input[0], sizes], outputs, name=f"{ATTN}/qkv_split", axis=-1)
    for s in slices:
        model.graph.node.remove(s)
    m.insert_after(model, f"{ATTN}/qkv_proj/MatMul", split)
    src = _save(model, tmp_path / "in" / "model.onnx")
    layer = analyze(load_graph(src)).layers[0]
    assert layer.v.columns == (192, 256) and layer.v.output == outputs[2]
    out = tmp_path / "out.onnx"
    optimize(src, out, Settings.parse(block="16", quantize=False), stats=stats, progress=False)
    assert relative_difference(src, out, random_ids()) < TOL


# ------------------------------------------------------------------------------ quantized

@pytest.mark.slow
@pytest.mark.parametrize("arch", tiny.PHI3_GRANITE_ARCHS)
@pytest.mark.parametrize("target", ["simulate", "ort"])
def test_quantized_output_runs(exported, tmp_path, arch, target):
    """W4A4 (simulate) or MatMulNBits (ort): a fused weight is quantized once, as a whole (its
    slices are output columns, quantized per column / per group of input rows)."""
    path, stats = exported(arch, past=(target == "ort"))
    out = tmp_path / "model.onnx"
    optimize(path, out, Settings.parse(block="16", target=target, calib_samples=2, seq_len=32), stats=stats,
             progress=False)
    ref, got = logits(session(path), random_ids()), logits(session(out), random_ids())
    assert np.isfinite(got).all() and got.shape == ref.shape
    assert np.abs(got - ref).max() < np.abs(ref).max()  # quantization noise, not garbage
    model = onnx.load(str(out))
    inits = {i.name for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and "layers." in n.name]
    per_layer = 4 if arch == "phi3" else 7  # qkv, o, gate_up, down / q, k, v, o, gate, up, down
    assert len(weight_dq) == tiny.LAYERS * per_layer


# ------------------------------------------------------------------------------- refusals

def _refusal(model: onnx.ModelProto, tmp_path) -> AnalysisError:
    src = _save(model, tmp_path / "in" / "model.onnx")
    with pytest.raises(AnalysisError) as info:
        analyze(load_graph(src))
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.slow
def test_phi3_fused_output_read_elsewhere_is_refused(exported, tmp_path, capsys):
    """A ReduceSum over qkv_proj's output (a graph output) would see R2 change the V columns."""
    model = onnx.load(exported("phi3")[0])
    qkv = m.out(f"{ATTN}/qkv_proj/MatMul")
    m.insert_after(model, f"{ATTN}/qkv_proj/MatMul",
                   helper.make_node("ReduceSum", [qkv], ["qkv_sum"], name="qkv_sum", keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("qkv_sum", onnx.TensorProto.FLOAT, None))
    err = _refusal(model, tmp_path)
    assert err.node == "qkv_sum" and "qkv_proj/MatMul" in err.reason
    # and on the command line: exit 2, one line, nothing written
    out = tmp_path / "out" / "model.onnx"
    capsys.readouterr()
    assert main(["optimize", str(tmp_path / "in" / "model.onnx"), "-o", str(out), "--no-quant"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("perq-onnx: error:") and "qkv_sum" in lines[0]
    assert not out.exists()


# K's Slice reaching into V's columns ([128, 224) and [192, 256) overlap); gate_up's up half sliced
# on the sequence axis instead of the channels
BAD_SLICES = {"overlapping": (f"{ATTN}/Slice_1", 2, "k_end", 224, f"{ATTN}/Slice_2", "disjoint"),
              "other-axis": (f"{MLP}/Slice_1", 3, "seq_axis", 1, f"{MLP}/Slice_1", "last axis")}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_SLICES)
def test_phi3_bad_slice_is_refused(exported, tmp_path, case):
    slice_name, index, init, value, refused, reason = BAD_SLICES[case]
    model = onnx.load(exported("phi3")[0])
    m.node(model, slice_name).input[index] = m.add_initializer(model, init, np.array([value], np.int64))
    err = _refusal(model, tmp_path)
    assert err.node == refused and reason in err.reason


@pytest.mark.slow
@pytest.mark.parametrize("mul", ["/model/Mul", "/model/layers.0/Mul"], ids=["embedding", "residual"])
def test_granite_per_channel_multiplier_is_refused(exported, tmp_path, mul):
    """A per-channel vector in place of Granite's scalar multiplier does not commute with R1."""
    model = onnx.load(exported("granite")[0])
    node = m.node(model, mul)
    scale = 1.0 + 0.1 * np.random.default_rng(0).standard_normal(tiny.HIDDEN)
    node.input[1] = m.add_initializer(model, f"{mul}/vector", scale.astype(np.float32))
    err = _refusal(model, tmp_path)
    assert err.node in (mul, "/model/layers.0/Add")
