"""perq_onnx.rounding: RTN with absmax / MSE / activation-aware clipping, and GPTQ."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from perq_onnx.formats import MXFP4, NVFP4, IntFormat, nvfp4_tensor_scale
from perq_onnx.rounding import Quantized, WeightQuant, gptq, relative_error, rtn

ROWS, COLS = 256, 48


def output_error(w, q: Quantized, h) -> float:
    """tr((W - Q)^T H (W - Q)), computed here independently of relative_error."""
    d = np.asarray(w, np.float64) - q.dequantize().astype(np.float64)
    return float(np.einsum("ij,ik,kj->", d, h, d))


def correlated_hessian(rows=ROWS, tokens=4096, seed=0):
    """H = X^T X for inputs with strongly correlated channels (a shared low-rank part on top of an
    AR(1) chain) and three outlier channels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, 24)) @ rng.standard_normal((24, rows))
    chain = rng.standard_normal((tokens, rows))
    for c in range(1, rows):
        chain[:, c] = 0.9 * chain[:, c - 1] + np.sqrt(1 - 0.81) * chain[:, c]
    x += chain
    x[:, [rows // 50, rows // 3, rows - 55]] *= 12.0
    return x.T @ x


def weights(rows=ROWS, cols=COLS, seed=1):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


def reference_gptq(w, h, form: WeightQuant, order, damp=0.01):
    """Unblocked optimal-brain-quantizer loop, written independently of the module: quantize one
    row, spread its error over the remaining rows with H^-1 of the remaining rows, then drop the
    row from H^-1 (Schur complement). Scales: per channel from the original W, per group when the
    group's first row comes up, from its rows as they are then (the module's documented rule)."""
    w = np.asarray(w, np.float64).copy()
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.inv(h)
    g = form.group or len(w)
    qmin, qmax = form.code_range
    scales, codes = {}, np.zeros_like(w)
    remaining = list(order)
    for r in order:
        k = r // g
        if k not in scales:
            amax = np.abs(w[k * g:(k + 1) * g]).max(axis=0)
            scales[k] = (amax / qmax).astype(np.float32).astype(np.float64)
        codes[r] = np.clip(np.rint(w[r] / scales[k]), qmin, qmax)
        err = w[r] - codes[r] * scales[k]
        remaining.remove(r)
        rest = np.array(remaining, dtype=int)
        if rest.size:
            w[rest] -= np.outer(hinv[rest, r] / hinv[r, r], err)
        hinv = hinv - np.outer(hinv[:, r], hinv[r, :]) / hinv[r, r]
    return codes


# -- form and layout -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_codes_in_range_and_layout(bits, group, method):
    w = np.random.default_rng(2).standard_t(3, size=(ROWS, COLS)).astype(np.float32)
    form = WeightQuant(bits=bits, group=group, clip="mse")
    h = correlated_hessian() if method == "gptq" else None
    q = rtn(w, form) if h is None else gptq(w, h, form)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert q.codes.dtype == np.int8 and q.codes.shape == (ROWS, COLS)
    assert q.codes.min() >= lo and q.codes.max() <= hi
    assert q.codes.min() < lo + 3 and q.codes.max() > hi - 3  # the range is actually used
    assert q.scale.dtype == np.float32 and q.zero_point is None
    if group is None:
        assert q.scale.shape == (COLS,)
        expected = q.codes.astype(np.float32) * q.scale[None, :]
    else:
        assert q.scale.shape == (ROWS // group, COLS)
        expected = np.empty((ROWS, COLS), np.float32)
        for k in range(ROWS // group):  # contiguous blocks of `group` rows share a scale
            rows = slice(k * group, (k + 1) * group)
            expected[rows] = q.codes[rows].astype(np.float32) * q.scale[k]
    deq = q.dequantize()
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, expected)
    assert relative_error(w, q, h) < (0.08 if bits == 4 else 0.001)  # GPTQ: measured through H


def test_absmax_scale_and_rtn_rounding():
    w = weights()
    q = rtn(w, WeightQuant(group=32, clip="absmax"))
    amax = np.abs(w.reshape(ROWS // 32, 32, COLS)).max(axis=1)
    np.testing.assert_allclose(q.scale, amax / 7, rtol=1e-6)
    # round to nearest: every weight is within half a step of its dequantized value
    step = np.repeat(q.scale, 32, axis=0)
    assert np.all(np.abs(w - q.dequantize()) <= 0.5 * step * (1 + 1e-5))


@pytest.mark.parametrize("group", [None, 32])
def test_full_range_maps_the_signed_extreme_to_the_lowest_code(group):
    w = weights()
    narrow = rtn(w, WeightQuant(group=group, clip="absmax"))
    full = rtn(w, WeightQuant(group=group, clip="absmax", full_range=True))
    g = ROWS if group is None else group
    wg = w.reshape(ROWS // g, g, COLS)
    extreme = np.take_along_axis(wg, np.abs(wg).argmax(axis=1)[:, None], axis=1)[:, 0]
    scale = full.scale.reshape(-1, COLS)
    np.testing.assert_allclose(scale, extreme / -8, rtol=1e-6)  # negative where the extreme is positive
    assert (scale < 0).any() and (scale > 0).any()
    assert full.codes.min() == -8 and narrow.codes.min() >= -7
    # the step is 8/7 finer: about (7/8)^2 of the squared error of the narrow grid
    ratio = relative_error(w, full) / relative_error(w, narrow)
    assert 0.65 < ratio < 0.85, ratio
    # GPTQ fits the same grid
    assert gptq(w, correlated_hessian(), WeightQuant(group=group, clip="absmax", full_range=True)).codes.min() == -8


def test_act_clip_steers_gptq_scales_toward_a_dominant_input():
    """A massive activation on one input: its row's own rounding error reaches the output through
    H_ii and cannot be cancelled through uncorrelated rows, so GPTQ needs the group scale chosen
    for that row (clip="act") as RTN does."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, ROWS))
    x[:, 5] *= 40.0
    h = x.T @ x
    w = weights()
    errors = {clip: output_error(w, gptq(w, h, WeightQuant(group=32, clip=clip, full_range=True)), h)
              for clip in ("mse", "act")}
    assert errors["act"] < 0.7 * errors["mse"], errors


def test_asymmetric_codes_and_zero_points():
    w = np.random.default_rng(3).standard_normal((ROWS, COLS)).astype(np.float32) + 0.5
    form = WeightQuant(bits=4, group=64, symmetric=False, clip="mse")
    for q in (rtn(w, form), gptq(w, correlated_hessian(), form)):
        assert q.codes.dtype == np.uint8 and q.codes.max() <= 15
        assert q.zero_point.shape == q.scale.shape == (ROWS // 64, COLS)
        assert q.zero_point.max() <= 15
        zero, scale = np.repeat(q.zero_point, 64, 0), np.repeat(q.scale, 64, 0)
        expected = (q.codes.astype(np.float32) - zero) * scale
        np.testing.assert_array_equal(q.dequantize(), expected)
    sym = relative_error(w, rtn(w, WeightQuant(bits=4, group=64, clip="mse")))
    assert relative_error(w, rtn(w, form)) < sym  # shifted weights: a zero point helps


# -- clipping ------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [None, 64])
def test_mse_clipping_beats_absmax_on_heavy_tails(group):
    w = np.random.default_rng(4).standard_t(3, size=(512, 64))
    absmax = relative_error(w, rtn(w, WeightQuant(group=group, clip="absmax")))
    mse = relative_error(w, rtn(w, WeightQuant(group=group, clip="mse")))
    assert mse < (0.75 if group is None else 0.9) * absmax  # seen: 0.67 / 0.82


def test_mse_never_worse_than_absmax_per_column():
    w = np.random.default_rng(5).standard_t(2, size=(64, 200))
    err = {c: ((w - rtn(w, WeightQuant(clip=c)).dequantize()) ** 2).sum(axis=0)
           for c in ("absmax", "mse")}
    assert np.all(err["mse"] <= err["absmax"] * (1 + 1e-6))
    assert np.mean(err["mse"] < err["absmax"] * 0.99) > 0.5


def test_activation_aware_clipping():
    # one input row per group carries most of the activation energy; act clipping protects it
    rng = np.random.default_rng(6)
    w = rng.standard_t(3, size=(ROWS, COLS))
    diag = np.ones(ROWS)
    diag[::32] = 100.0
    h = np.diag(diag)
    form = dict(group=32)

    def weighted(q):
        return float(np.sum(diag[:, None] * (w - q.dequantize()) ** 2))
    act = weighted(rtn(w, WeightQuant(clip="act", **form), hessian=h))
    mse = weighted(rtn(w, WeightQuant(clip="mse", **form)))
    absmax = weighted(rtn(w, WeightQuant(clip="absmax", **form)))
    assert act < 0.9 * mse and act <= absmax  # seen: act / mse = 0.59
    # a group of dead inputs (H_ii = 0) falls back to plain MSE clipping
    diag[:32] = 0.0
    act_codes = rtn(w, WeightQuant(clip="act", **form), hessian=np.diag(diag)).codes
    mse_codes = rtn(w, WeightQuant(clip="mse", **form)).codes
    np.testing.assert_array_equal(act_codes[:32], mse_codes[:32])
    with pytest.raises(ValueError, match="Hessian"):
        rtn(w, WeightQuant(clip="act"))


# -- GPTQ ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(group, act_order):
    h, w = correlated_hessian(), weights()
    form = WeightQuant(bits=4, group=group, clip="mse")
    base = output_error(w, rtn(w, form), h)
    q = gptq(w, h, form, act_order=act_order)
    ratio = output_error(w, q, h) / base
    assert ratio < 0.25, ratio  # seen: 0.02-0.05
    w64 = w.astype(np.float64)
    expected = output_error(w, q, h) / np.sum(w64 * (h @ w64))
    assert relative_error(w, q, h) == pytest.approx(expected, rel=1e-9)


def test_gptq_matches_unblocked_reference():
    rows, cols = 64, 16
    h, w = correlated_hessian(rows, seed=7), weights(rows, cols, seed=8)
    for group, act_order in [(None, False), (None, True), (16, False), (16, True)]:
        form = WeightQuant(bits=4, group=group, clip="absmax")
        order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(rows)
        expected = reference_gptq(w, h, form, order)
        for block in (128, 5):  # one block for all rows, and lazy updates across many blocks
            codes = gptq(w, h, form, act_order=act_order, block=block).codes
            assert np.mean(codes == expected) > 0.995, (group, act_order, block)


def test_gptq_block_size_does_not_change_the_result():
    h, w = correlated_hessian(), weights()
    form = WeightQuant(group=32)
    a, b = gptq(w, h, form, block=128), gptq(w, h, form, block=7)
    assert np.mean(a.codes == b.codes) > 0.999


def test_gptq_on_identity_hessian_is_rtn():
    w = weights()
    for group in (None, 32):
        form = WeightQuant(group=group, clip="mse")
        np.testing.assert_array_equal(gptq(w, np.eye(ROWS), form).codes, rtn(w, form).codes)
        # nearly identity: weak correlations leave GPTQ close to RTN
        rng = np.random.default_rng(9)
        noise = rng.standard_normal((ROWS, ROWS)) * 0.01
        h = np.eye(ROWS) + noise @ noise.T
        ratio = output_error(w, gptq(w, h, form), h) / output_error(w, rtn(w, form), h)
        assert 0.85 < ratio < 1.1, ratio


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", ["absmax", "mse", "act"])
def test_ragged_groups_are_groups_of_their_own_rows(symmetric, clip):
    """Blocks of 48 on 256 rows: 5 x 48 + 16. Each group, the short last one included, is rounded
    exactly as that group's rows would be on their own per channel, and GPTQ keeps the layout."""
    w, h = weights(), correlated_hessian()
    form = WeightQuant(group=48, symmetric=symmetric, clip=clip, full_range=symmetric)
    q = rtn(w, form, h)
    assert q.codes.shape == (ROWS, COLS) and q.scale.shape == (6, COLS)
    for k in range(6):
        rows = slice(48 * k, min(48 * (k + 1), ROWS))
        alone = rtn(w[rows], WeightQuant(format=dataclasses.replace(form.format, group=None), clip=clip),
                    h[rows, rows])
        np.testing.assert_array_equal(q.codes[rows], alone.codes)
        np.testing.assert_array_equal(q.scale[k], alone.scale)
        if not symmetric:
            np.testing.assert_array_equal(q.zero_point[k], alone.zero_point)
    expected = (q.codes.astype(np.float32) - (0 if symmetric else np.repeat(q.zero_point, 48, 0)[:ROWS])) \
        * np.repeat(q.scale, 48, 0)[:ROWS]
    np.testing.assert_array_equal(q.dequantize(), expected)
    g = gptq(w, h, form)
    assert g.codes.shape == (ROWS, COLS) and g.scale.shape == (6, COLS)
    assert output_error(w, g, h) < output_error(w, q, h)


def test_gptq_dead_inputs():
    h, w = correlated_hessian(), weights()
    dead = np.array([0, 17, 100, 255])
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    for group in (None, 32):
        form = WeightQuant(group=group, clip="absmax")
        q, base = gptq(w, h, form), rtn(w, form)
        assert np.all(np.isfinite(q.scale))
        # dead rows get nothing fed back: per channel they are exactly round-to-nearest
        if group is None:
            np.testing.assert_array_equal(q.codes[dead], base.codes[dead])
        assert np.all(np.abs(w[dead] - q.dequantize()[dead]) <= 0.5 * np.abs(w).max() / 7 * 1.01)
        assert output_error(w, q, h) < 0.8 * output_error(w, base, h)
    # without damping, the dead inputs alone would make H singular
    q = gptq(w, h, WeightQuant(), damp=0.0)
    assert np.all(np.isfinite(q.dequantize()))
    assert output_error(w, q, h) < 0.8 * output_error(w, rtn(w, WeightQuant()), h)


def test_act_order_with_groups_keeps_contiguous_groups():
    h, w = correlated_hessian(), weights()
    # make the act order interleave groups thoroughly
    h[np.diag_indices(ROWS)] += np.random.default_rng(10).permutation(ROWS) * 50.0
    form = WeightQuant(group=32, clip="mse")
    q = gptq(w, h, form, act_order=True)
    assert q.scale.shape == (ROWS // 32, COLS)
    manual = q.codes.astype(np.float64).reshape(ROWS // 32, 32, COLS) * q.scale[:, None, :]
    np.testing.assert_array_equal(manual.reshape(ROWS, COLS).astype(np.float32), q.dequantize())
    # the scale of each contiguous group fits that group's rows: the codes use its range
    span = np.abs(q.codes.reshape(ROWS // 32, 32, COLS)).max(axis=1)
    assert np.median(span) >= 6
    assert output_error(w, q, h) < 0.8 * output_error(w, rtn(w, form), h)


# -- FP4 formats ---------------------------------------------------------------------------------

FP4 = [NVFP4(), MXFP4()]


def fp4_weights(rows=ROWS, cols=COLS, seed=11):
    """Heavy-tailed weights with a zero block and one tiny column (E4M3-subnormal NVFP4 scales)."""
    w = (np.random.default_rng(seed).standard_t(4, size=(rows, cols)) * 0.02).astype(np.float32)
    w[:32, 0] = 0
    w[:, 1] *= 1e-5
    return w


@pytest.mark.parametrize("fmt", FP4, ids=lambda f: f.name)
def test_fp4_rtn_absmax_is_the_format_reference(fmt):
    w = fp4_weights()
    q = rtn(w, WeightQuant(format=fmt, clip="absmax"))
    ref = fmt.bind(w).quantize(w, axis=0)  # the numpy reference, blocks along the input rows
    assert q.codes.dtype == ref.codes.dtype and q.scale.dtype == ref.scale.dtype
    assert q.scale.shape == (ROWS // fmt.group, COLS)
    np.testing.assert_array_equal(q.codes.astype(np.float32), ref.codes.astype(np.float32))
    np.testing.assert_array_equal(q.scale.astype(np.float32), ref.scale.astype(np.float32))
    deq = q.dequantize()
    assert deq.dtype == np.float32 and np.all(np.isfinite(deq)) and not np.any(deq[:32, 0])
    np.testing.assert_array_equal(deq, fmt.bind(w).qdq(w, axis=0))
    if isinstance(fmt, NVFP4):
        assert q.format.tensor_scale == nvfp4_tensor_scale(np.abs(w).max())


@pytest.mark.parametrize("fmt", FP4, ids=lambda f: f.name)
def test_fp4_mse_clip_never_worse_than_absmax(fmt):
    w = fp4_weights()
    err = {c: ((w - rtn(w, WeightQuant(format=fmt, clip=c)).dequantize()) ** 2).sum(axis=0)
           for c in ("absmax", "mse")}
    assert np.all(err["mse"] <= err["absmax"] * (1 + 1e-6))
    assert err["mse"].sum() < 0.97 * err["absmax"].sum()


def test_mxfp4_clip_search_picks_power_of_two_scales():
    w = fp4_weights()
    q = rtn(w, WeightQuant(format=MXFP4(), clip="mse"))
    exponents = np.log2(q.scale.astype(np.float64))
    np.testing.assert_array_equal(exponents, np.round(exponents))
    spec = np.log2(rtn(w, WeightQuant(format=MXFP4(), clip="absmax")).scale.astype(np.float64))
    assert set(np.unique(exponents - spec)) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("fmt", FP4, ids=lambda f: f.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_fp4_gptq_beats_rtn_on_correlated_inputs(fmt, act_order):
    h, w = correlated_hessian(), weights()
    form = WeightQuant(format=fmt, clip="mse")
    q = gptq(w, h, form, act_order=act_order)
    assert q.codes.dtype == fmt.code_dtype and q.scale.dtype == fmt.scale_dtype
    assert np.all(np.isfinite(q.dequantize()))
    ratio = output_error(w, q, h) / output_error(w, rtn(w, form), h)
    assert ratio < 0.3, ratio
    if isinstance(fmt, NVFP4):  # the tensor scale is the original weight's, fixed before GPTQ
        assert q.format.tensor_scale == nvfp4_tensor_scale(np.abs(w).max())


@pytest.mark.parametrize("fmt", FP4, ids=lambda f: f.name)
def test_fp4_gptq_on_identity_hessian_is_rtn(fmt):
    w = fp4_weights()
    form = WeightQuant(format=fmt, clip="mse")
    a, b = gptq(w, np.eye(ROWS), form), rtn(w, form)
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())


def test_fp4_act_clip_protects_a_dominant_input():
    rng = np.random.default_rng(6)
    w = rng.standard_t(3, size=(ROWS, COLS))
    diag = np.ones(ROWS)
    diag[::16] = 100.0

    def weighted(clip):
        q = rtn(w, WeightQuant(format=NVFP4(), clip=clip), hessian=np.diag(diag))
        return float(np.sum(diag[:, None] * (w - q.dequantize()) ** 2))
    assert weighted("act") < 0.95 * weighted("mse")


def test_formats_through_weight_quant():
    """WeightQuant(bits, group, ...) is the INT format; format= takes any; asymmetric INT keeps
    its zero points in Quantized."""
    assert WeightQuant(4, 32, False, "mse").format == IntFormat(4, 32, False)
    form = WeightQuant(format=IntFormat(4, 64, symmetric=False), clip="absmax")
    assert (form.bits, form.group, form.symmetric, form.clip) == (4, 64, False, "absmax")
    w = weights() + 0.01
    q = rtn(w, form)
    assert q.zero_point is not None and q.zero_point.shape == (ROWS // 64, COLS)
    np.testing.assert_array_equal(q.codes, rtn(w, WeightQuant(4, 64, False, "absmax")).codes)
    assert dataclasses.replace(WeightQuant(format=MXFP4(), clip="act"), clip="mse").format == MXFP4()
    with pytest.raises(ValueError, match="group size 16 does not divide the 24 input rows"):
        rtn(np.ones((24, 4)), WeightQuant(format=NVFP4()))


# -- invalid forms -------------------------------------------------------------------------------

def test_invalid_forms_raise():
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        WeightQuant(bits=3)
    with pytest.raises(ValueError, match="clip must be one of"):
        WeightQuant(clip="percentile")
    with pytest.raises(ValueError, match="positive"):
        WeightQuant(group=0)
    with pytest.raises(ValueError, match="full_range applies to symmetric"):
        WeightQuant(symmetric=False, full_range=True)
    w = weights()
    with pytest.raises(ValueError, match="group size 16 does not divide the 40 input rows"):
        rtn(w[:40], WeightQuant(format=NVFP4()))  # FP4 blocks are the format's: never ragged
    with pytest.raises(ValueError, match="does not divide"):
        gptq(w[:40], np.eye(40), WeightQuant(format=MXFP4()))
    with pytest.raises(ValueError, match=r"Hessian must be \[256, 256\]"):
        gptq(w, np.eye(COLS), WeightQuant())
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(w, -np.ones((ROWS, ROWS)) + 2 * np.eye(ROWS), WeightQuant(), damp=0.0)


def test_float_target_splits_the_error_and_is_the_weight_when_inputs_are_exact():
    """||X W - X~ Q||^2 = ||X W - X~ W'||^2 + ||X~ (W' - Q)||^2 for any Q (W' the least-squares
    weight for the quantized input X~), so GPTQ of W' against H~ minimises the whole; with X~ = X
    the target is W itself."""
    from perq_onnx.rounding import float_target
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 24)) @ rng.standard_normal((24, 24))
    xq = x + 0.3 * rng.standard_normal(x.shape) * np.abs(x)  # a quantizer's error, larger on large inputs
    w = rng.standard_normal((24, 8))
    h, c = xq.T @ xq, xq.T @ x
    target = float_target(w, h, c, damp=1e-12)
    q = gptq(target, h, WeightQuant(4, None, True, "mse")).dequantize().astype(np.float64)
    whole = np.sum((x @ w - xq @ q) ** 2)
    split = np.sum((x @ w - xq @ target) ** 2) + np.sum((xq @ (target - q)) ** 2)
    assert whole == pytest.approx(split, rel=1e-6)
    q_plain = gptq(w, h, WeightQuant(4, None, True, "mse")).dequantize().astype(np.float64)
    assert whole < np.sum((x @ w - xq @ q_plain) ** 2)  # rounding W itself leaves the activation error
    np.testing.assert_allclose(float_target(w, x.T @ x, x.T @ x, damp=1e-12), w, rtol=1e-6, atol=1e-8)
