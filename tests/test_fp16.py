"""float16 models: onnxruntime's float16 converter (with and without keep_io_types) and optimum's
--dtype fp16 export (which works on CPU with optimum 2.x: norms and attention in float32, o_proj
weights float32, down_proj's output cast up to a float32 residual stream); bfloat16 is refused.

Tolerance. A float16 model is not rewritten bit for bit: the rotation changes which values
are rounded to float16 (folded weights are computed in float64 and rounded once to float16,
activations are rounded in the rotated basis). The rewrite is correct when it changes the logits
by float16 rounding noise, i.e. by about as much as the float16 input itself differs from its
float32 original. We check both

* |rewritten - input| / max|input| < 1e-2 (float16 has 11 significant bits, 2^-11 = 4.9e-4 per
  rounding; two layers of a few dozen roundings each give ~1e-3..5e-3 here), and
* the rewritten float16 model is no farther from the float32 original than 2x the float16
  input is (in practice it is closer: the rotation spreads the outlier channels, so less is lost
  to float16 rounding).
"""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from perq_onnx.errors import PerqError
from perq_onnx.models.tiny import export_tiny
from perq_onnx.pipeline import optimize
from perq_onnx.runtime import logits, session
from perq_onnx.settings import Settings

from conftest import random_ids

REL_TOL = 1e-2
QUICK = dict(calib_samples=1, seq_len=16)
VARIANTS = ["ort-fp16", "ort-fp16-keep-io", "optimum-fp16"]


def _copy_sidecars(src, dst):
    for f in src.parent.glob("*.json"):
        shutil.copy(f, dst.parent)


@pytest.fixture(scope="module")
def fp16_models(tmp_path_factory):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    root = tmp_path_factory.mktemp("fp16")
    fp32 = export_tiny("llama", root / "fp32", with_past=False, tied=False)
    models = {"fp32": fp32}
    for name, keep in (("ort-fp16", False), ("ort-fp16-keep-io", True)):
        path = root / name / "model.onnx"
        path.parent.mkdir()
        onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=keep), str(path))
        _copy_sidecars(fp32, path)
        models[name] = path
    models["optimum-fp16"] = export_tiny("llama", root / "optimum-fp16", with_past=False, tied=False, dtype="fp16")
    return models


def _logits(path, ids):
    return logits(session(path), ids).astype(np.float64)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


def _weight_types(path) -> dict[int, int]:
    model = onnx.load(str(path))
    out = {}
    for t in model.graph.initializer:
        if len(t.dims) == 2 and min(t.dims) >= 128:
            out[t.data_type] = out.get(t.data_type, 0) + 1
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp16_no_quant_within_fp16_rounding(fp16_models, tmp_path, variant):
    path = fp16_models[variant]
    assert TensorProto.FLOAT16 in _weight_types(path)
    out = tmp_path / "out.onnx"
    optimize(path, out, Settings.parse(block="32", quantize=False, **QUICK), progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    ids = random_ids()
    ref32, before, after = _logits(fp16_models["fp32"], ids), _logits(path, ids), _logits(out, ids)
    assert _rel(before, after) < REL_TOL
    assert _rel(ref32, after) <= 2 * _rel(ref32, before)
    assert _rel(before, after) > 0  # rewritten, not copied
    # folds are written back in each weight's own type: float16 stays float16
    assert _weight_types(out).get(TensorProto.FLOAT16, 0) >= _weight_types(path)[TensorProto.FLOAT16] - 1
    outputs = {o.name: o.type.tensor_type.elem_type for o in onnx.load(str(out)).graph.output}
    assert outputs == {o.name: o.type.tensor_type.elem_type for o in onnx.load(str(path)).graph.output}


def _qdq_constant_types(path) -> set[int]:
    model = onnx.load(str(path))
    return {t.data_type for t in model.graph.initializer if "/input_qdq/" in t.name and t.name.endswith(("/one", "/eps", "/qmax"))}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ort-fp16", "optimum-fp16"])
@pytest.mark.parametrize("extra", [{}, {"fused_ops": True, "a_symmetric": True}], ids=["chain", "fused"])
def test_fp16_activation_quantization_valid(fp16_models, tmp_path, variant, extra):
    """Float weights, INT4 activations: the QDQ chains are float16 where their input is float16
    (optimum's float16 export feeds o_proj float32), the fused function body runs on float16."""
    path = fp16_models[variant]
    out = tmp_path / "out.onnx"
    optimize(path, out, Settings.parse(block="32", w_bits=16, a_bits=4, **extra, **QUICK), progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    ids = random_ids()
    got = _logits(out, ids)
    assert np.isfinite(got).all()
    assert _rel(_logits(path, ids), got) < 0.5
    assert TensorProto.FLOAT16 in _qdq_constant_types(out)
    if extra:
        assert "BlockHadamardQuantize" in {n.op_type for n in onnx.load(str(out)).graph.node}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["simulate", "ort", "tensorrt"])
@pytest.mark.parametrize("variant", ["ort-fp16-keep-io", "optimum-fp16"])
def test_fp16_quantized_valid(fp16_models, tmp_path, variant, target):
    """Every target's quantized output of a float16 model keeps the graph's types (scales
    included) and runs."""
    path = fp16_models[variant]
    out = tmp_path / "out.onnx"
    optimize(path, out, Settings.parse(block="32", target=target, **QUICK), progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    got = _logits(out, random_ids())
    assert np.isfinite(got).all()


def test_fp16_function_body_chain_matches_graph_chain():
    """The QDQ chain emitted as graph nodes in float16 and the function body (float32 inside,
    cast back) agree on float16 inputs up to a code step, and are exact on float32 inputs."""
    from perq_onnx.functions import single_op_model

    x = np.random.default_rng(0).normal(size=(2, 5, 64)).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token: EPS must keep the scale positive
    model = single_op_model("BlockHadamardQuantize", 64, block_size=16, bits=4, symmetric=0)
    y32 = session(model).run(None, {"X": x})[0]
    assert np.isfinite(y32).all()
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    y16 = session(model).run(None, {"X": x.astype(np.float16)})[0]
    assert y16.dtype == np.float16 and np.isfinite(y16).all()
    assert y16[0, 0].astype(np.float32).max() == 0.0
    step = (x.max(-1, keepdims=True) - np.minimum(x.min(-1, keepdims=True), 0)) / 15 * 2  # rotation spreads
    assert (np.abs(y16.astype(np.float32) - y32) <= np.maximum(step, 1e-3) + 1e-2).mean() > 0.95


def _to_bf16(src, dst):
    import ml_dtypes

    model = onnx.load(str(src))

    def fix(t):
        if t.data_type == TensorProto.FLOAT16:
            a = numpy_helper.to_array(t).astype(np.float32).astype(ml_dtypes.bfloat16)
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    for t in model.graph.initializer:
        fix(t)
    for n in model.graph.node:
        for a in n.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.BFLOAT16
            if a.type == onnx.AttributeProto.TENSOR:
                fix(a.t)
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.BFLOAT16
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))


@pytest.mark.slow
def test_bf16_refused(fp16_models, tmp_path):
    path = tmp_path / "bf16" / "model.onnx"
    _to_bf16(fp16_models["ort-fp16"], path)
    before = path.read_bytes()
    with pytest.raises(PerqError, match="bfloat16: onnxruntime's CPU provider has no bfloat16"):
        optimize(path, tmp_path / "out.onnx", Settings.parse(block="32", quantize=False, **QUICK), progress=False)
    assert not (tmp_path / "out.onnx").exists()
    assert path.read_bytes() == before


def test_fp32_graph_still_refuses_fp16_round_trip():
    """In a float32 graph a Cast to float16 is below the graph's precision: still refused (the
    mutation suite's cast_fp16_in_mlp / cast_bf16_on_residual cover the CLI path)."""
    from perq_onnx.matching import LOSSLESS_CASTS
    assert TensorProto.FLOAT16 not in LOSSLESS_CASTS[TensorProto.FLOAT]
    assert TensorProto.BFLOAT16 not in LOSSLESS_CASTS[TensorProto.FLOAT16]
