"""perq_onnx.formats: the E2M1 / E4M3 / E8M0 rules on hand-computed values, the NVFP4 and MXFP4
numpy references, and onnxruntime running the emitted standard-op chains bit-exactly to them."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from perq_onnx.formats import (MXFP4, NVFP4, FormatError, IntFormat, e2m1_bit_values, e2m1_round, e4m3_round,
                               e8m0_values, emit_fp4_activation_qdq, emit_fp4_weight, format_for,
                               nvfp4_tensor_scale)
from perq_onnx.functions import FunctionEmitter

F32 = np.float32


# -- element and scale rounding ------------------------------------------------------------------

def test_e2m1_round_ties_to_even_and_saturates():
    cases = {0.25: 0, 0.75: 1, 1.25: 1, 1.75: 2, 2.5: 2, 3.5: 4, 5: 4, 7: 6, 100: 6, 0.24: 0, 0.26: 0.5,
             2.4: 2, 2.6: 3, 4.9: 4, 5.1: 6, 1e-30: 0, 0: 0, 6: 6, 3e38: 6}
    x = np.array(list(cases), F32)
    expected = np.array(list(cases.values()), F32)
    np.testing.assert_array_equal(e2m1_round(x), expected)
    np.testing.assert_array_equal(e2m1_round(-x), -expected)
    assert e2m1_round(x).dtype == F32
    # ml_dtypes' float4_e2m1fn rounds the same way (half to even, saturating)
    y = (np.random.default_rng(0).standard_normal(20000) * 4).astype(F32)
    y[:64] = np.arange(-8, 8, 0.25)  # every tie
    np.testing.assert_array_equal(e2m1_round(y), y.astype(ml_dtypes.float4_e2m1fn).astype(F32))


def test_e2m1_bit_patterns():
    np.testing.assert_array_equal(e2m1_bit_values()[:8], [0, 0.5, 1, 1.5, 2, 3, 4, 6])
    np.testing.assert_array_equal(e2m1_bit_values(),
                                  np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(F32))


def test_e4m3_round_subnormals_ties_and_saturation():
    cases = {1.0625: 1, 1.1875: 1.25, 0.3: 0.3125, 2 ** -9: 2 ** -9, 2 ** -10: 0, 3 * 2 ** -10: 2 ** -8,
             5 * 2 ** -10: 2 * 2 ** -9, 7 * 2 ** -9: 7 * 2 ** -9, 448: 448, 460: 448, 464: 448, 1e6: 448,
             np.inf: 448, 0: 0, 240: 240, 248: 256}
    got = e4m3_round(np.array(list(cases), F32))
    assert got.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(got.astype(F32), np.array(list(cases.values()), F32))


def test_e8m0_values_and_tensor_scale():
    table = e8m0_values()
    assert table[127] == 1 and table[0] == F32(2.0 ** -127) and np.isnan(table[255])
    np.testing.assert_array_equal(table[:255], np.arange(255, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
                                  .astype(F32))
    assert nvfp4_tensor_scale(2688.0) == 1 and nvfp4_tensor_scale(0.0) == 1
    assert nvfp4_tensor_scale(1.0) == F32(1.0) / F32(2688)


# -- references ----------------------------------------------------------------------------------

def test_nvfp4_reference_by_hand():
    fmt = NVFP4.from_amax(2688.0)  # tensor scale 1: the block scale is e4m3(amax / 6)
    assert fmt.tensor_scale == 1.0
    ties = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0], F32)
    np.testing.assert_array_equal(fmt.qdq(ties), [6, 0, 1, 1, 2, 2, 4, 4, 0, -1, -1, -2, -2, -4, -4, 0])
    # amax 1.8: scale e4m3(0.3) = 0.3125; values divided by it, rounded, multiplied back
    block = np.linspace(-1.8, 1.8, 16).astype(F32)
    q = fmt.quantize(block)
    assert q.scale.dtype == ml_dtypes.float8_e4m3fn and q.scale.astype(F32).tolist() == [0.3125]
    expected = e2m1_round(block / F32(0.3125)) * F32(0.3125)
    np.testing.assert_array_equal(fmt.qdq(block), expected)
    assert np.array_equal(q.codes.astype(F32), e2m1_round(block / F32(0.3125)))
    # a subnormal E4M3 scale (3 * 2^-9) reproduces its block's extreme exactly
    small = np.full(16, 6 * 3 * 2.0 ** -9, F32) * np.array([1, -1] * 8, F32)
    assert fmt.quantize(small).scale.astype(F32).tolist() == [3 * 2.0 ** -9]
    np.testing.assert_array_equal(fmt.qdq(small), small)
    # below half the smallest subnormal: scale 0, the block is zero, never NaN
    np.testing.assert_array_equal(fmt.qdq(np.full(16, 1e-4, F32)), np.zeros(16, F32))


def test_nvfp4_saturation_zeros_and_huge_values():
    # an activation beyond the calibrated amax: the E4M3 scale saturates at 448, values at 6 * 448 * ts
    fmt = NVFP4.from_amax(1.0)
    ts = F32(1.0) / F32(2688)
    x = np.array([1e3, -5.0, 0.5, 3.0] * 4, F32)
    q = fmt.quantize(x)
    assert q.scale.astype(F32).tolist() == [448]
    np.testing.assert_array_equal(fmt.qdq(x)[0], 6 * (F32(448) * ts))
    for x in (np.zeros((3, 32), F32), np.full((2, 32), 3e38, F32), np.array([[3e38, -3e38] + [1e-38] * 30], F32)):
        for f in (NVFP4.from_amax(np.abs(x).max()), NVFP4.from_amax(1.0), MXFP4()):
            y = f.qdq(x)
            assert np.all(np.isfinite(y)), (f, x[0, :2])
    np.testing.assert_array_equal(NVFP4.from_amax(0.0).qdq(np.zeros(16, F32)), np.zeros(16, F32))


def test_mxfp4_reference_by_hand():
    fmt = MXFP4()
    def scale_of(amax):
        block = np.zeros(32, F32)
        block[0] = amax
        return fmt.quantize(block).scale
    # X = 2^(floor(log2 amax) - 2): amax 6 -> 1, 7 -> 1 (7 saturates to 6), 8 -> 2, 0.3 -> 2^-4
    for amax, x in [(6, 1), (7, 1), (7.99, 1), (8, 2), (0.3, 2 ** -4), (1, 0.25), (3e38, 2.0 ** 125)]:
        s = scale_of(amax)
        assert s.dtype == ml_dtypes.float8_e8m0fnu and s.astype(np.float64).tolist() == [x], amax
    block = np.zeros(32, F32)
    block[:3] = [7, 5, -3.5]
    np.testing.assert_array_equal(fmt.qdq(block)[:3], [6, 4, -4])
    # zero and tiny blocks: E8M0's smallest scale 2^-127, codes 0
    for amax in (0.0, 2.0 ** -140, 2.0 ** -126):
        assert scale_of(amax).astype(np.float64).tolist() == [2.0 ** -127]
    np.testing.assert_array_equal(fmt.qdq(np.zeros((2, 64), F32)), np.zeros((2, 64), F32))
    # a 2^-125 block is still exact: its scale is the floor, 2^-127, and 4 * 2^-127 = 2^-125
    block = np.full(32, 2.0 ** -125, F32)
    np.testing.assert_array_equal(fmt.qdq(block), block)


def test_reference_along_axis_0_is_the_transpose():
    w = np.random.default_rng(1).standard_normal((64, 6)).astype(F32)
    for fmt in (NVFP4.from_amax(np.abs(w).max()), MXFP4()):
        np.testing.assert_array_equal(fmt.qdq(w, axis=0), fmt.qdq(w.T).T)
        assert fmt.quantize(w, axis=0).scale.shape == (64 // fmt.group, 6)


def test_format_for_and_invalid_formats():
    assert format_for("int", 8, 32) == IntFormat(8, 32)
    assert format_for("nvfp4") == NVFP4() and format_for("mxfp4", group=32) == MXFP4()
    with pytest.raises(ValueError, match="one scale per 16"):
        format_for("nvfp4", group=32)
    with pytest.raises(ValueError, match="unknown number format"):
        format_for("fp8")
    with pytest.raises(FormatError, match="tensor scale"):
        NVFP4().qdq(np.zeros(16, F32))
    with pytest.raises(ValueError, match="multiple of 32"):
        MXFP4().qdq(np.zeros(48, F32))
    with pytest.raises(ValueError, match="group size 16 does not divide the 24"):
        NVFP4().group_size(24)


# -- onnxruntime runs the emitted chains bit-exactly ---------------------------------------------

def run_emitted(build, feeds: dict, out_type=TensorProto.FLOAT) -> np.ndarray:
    """A model of the nodes ``build(emitter)`` emits (constants as Constant nodes), run in
    onnxruntime (default optimizations) on feeds."""
    e = FunctionEmitter()
    build(e)
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for name, v in feeds.items()]
    graph = helper.make_graph(e.nodes, "chain", inputs, [helper.make_tensor_value_info("Y", out_type, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def hard_activations(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussians with outlier blocks and channels, zero blocks, exact ties, powers of two and
    their neighbours, huge and subnormal values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(F32) * np.exp(rng.uniform(-8, 8, (rows, 1))).astype(F32)
    x[:, 5] *= 300
    x[1] = 0
    x[2, :32] = 0
    x[3] = np.tile(np.arange(-4, 4, 0.25, dtype=F32), cols // 32) * 2  # ties under a power-of-two scale
    x[4] = np.ldexp(F32(1), rng.integers(-20, 20, cols)).astype(F32)
    x[5] = np.nextafter(x[4], F32(np.inf))
    x[6] = np.nextafter(x[4], F32(0))
    x[7] = rng.standard_normal(cols).astype(F32) * F32(3e37)
    x[8] = rng.standard_normal(cols).astype(F32) * F32(1e-39)
    x[9] = rng.standard_normal(cols).astype(F32) * F32(2.0 ** -125)
    return x


@pytest.mark.parametrize("fmt", [NVFP4.from_amax(1.0), NVFP4.from_amax(2688.0), NVFP4.from_amax(1e-30),
                                 NVFP4.from_amax(3e38), MXFP4()], ids=lambda f: f"{f.name}-{f}")
def test_activation_chain_is_bit_exact(fmt):
    x = hard_activations(64, 128, seed=3)
    if isinstance(fmt, NVFP4):  # ties under the block scale 1 when the tensor scale is 1
        x[10, :16] = np.arange(-4, 4, 0.5, dtype=F32) + 0.25 * (fmt.tensor_scale == 1.0)
        x[10, 16] = 6
    y = run_emitted(lambda e: emit_fp4_activation_qdq(e, "X", fmt, output="Y"), {"X": x.reshape(4, 16, 128)})
    ref = fmt.qdq(x).reshape(4, 16, 128)
    assert not np.any(np.isnan(ref))
    assert np.array_equal(y, ref), np.argwhere(y != ref)[:5]


def test_activation_chain_float16():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 64)) * np.exp(rng.uniform(-6, 6, (6, 1)))).astype(np.float16)
    x[1] = 0
    x[2, :32] = 0
    x[3] = np.tile(np.arange(-4, 4, 0.25), 2) * 2
    for fmt in (NVFP4.from_amax(np.abs(x).max()), MXFP4()):
        y = run_emitted(lambda e: emit_fp4_activation_qdq(e, "X", fmt, output="Y"), {"X": x},
                        out_type=TensorProto.FLOAT16)
        assert y.dtype == np.float16
        np.testing.assert_array_equal(y, fmt.qdq(x.astype(F32)).astype(np.float16))


@pytest.mark.parametrize("fmt", [NVFP4(), MXFP4()], ids=lambda f: f.name)
def test_weight_chain_is_bit_exact(fmt):
    rng = np.random.default_rng(5)
    w = (rng.standard_t(3, size=(128, 24)) * 0.02).astype(F32)
    w[:32, 0] = 0  # zero blocks
    w[32:64, 1] *= 1e-6  # E4M3-subnormal block scales
    q = fmt.bind(w).quantize(w, axis=0)
    codes, scale = q.format.storage(q)
    assert codes.dtype == ml_dtypes.uint4
    def build(e):
        emit_fp4_weight(e, e.const(codes, "codes"), e.const(scale, "scale"), q.format, w.shape, output="Y")
    y = run_emitted(build, {})
    np.testing.assert_array_equal(y, q.dequantize())
    np.testing.assert_array_equal(y, q.format.qdq(w, axis=0))
    if isinstance(fmt, NVFP4):
        assert np.any(q.scale[2:4, 1].astype(F32) < 2.0 ** -6)  # subnormal E4M3 block scales
        assert np.all(q.scale[:2, 0].astype(F32) == 0) and not np.any(y[:32, 0])
