"""Numpy fake quantizers for [in, out] MatMul weights (symmetric INT4), one scale per output
column per group of g input rows (g = None: per output channel).

rules:
  absmax7 : s = max|w| / 7, q in [-8, 7]                     (perq-onnx's alpha = 1 candidate)
  ort     : s = m / -8 with m the signed value of largest |w|  (onnxruntime MatMulNBits RTN symmetric,
            MLAS range2scale); q = clamp(round(w/s), -8, 7): the extreme lands on -8 exactly
  mse     : perq-onnx's rule: s = alpha * max|w| / 7, alpha by coarse(17)+fine(11) search minimising
            sum (w - Q(w))^2 over the column-group (exact copy of passes/quantize_weights.py)
  wmse    : like mse but minimising sum_k d_k (w_k - Q(w_k))^2 with d = diag(X^T X) of the input
            (activation-weighted, per-row importance)
  mse8 / wmse8: the searches with qmax 8 ("m/-8" style grid: s = alpha*max|w|/8, alpha in [0.2, 1.15])
"""
from __future__ import annotations

import numpy as np
import torch


def _blocks(w, g):
    rows, cols = w.shape
    g = g or rows
    return torch.from_numpy(np.ascontiguousarray(w, np.float32)).reshape(rows // g, g, cols), g


def _fq(wt, scale, lo=-8, hi=7):
    return torch.clamp(torch.round(wt / scale), lo, hi) * scale


def _round_half_up(x):
    """MLAS rounds v/s + 8 with roundf, i.e. ties go up (toward +inf) in the signed domain;
    torch.round is half-to-even. The Q4_1-derived weights hit exact .5 ties ~0.03% of the time."""
    return torch.floor(x + 0.5)


def absmax7(w, g=None, **_):
    wt, _g = _blocks(w, g)
    s = wt.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7
    return _fq(wt, s).reshape(w.shape).numpy()


def ort(w, g=None, **_):
    wt, _g = _blocks(w, g)
    mx, mn = wt.amax(dim=1, keepdim=True), wt.amin(dim=1, keepdim=True)
    m = torch.where(mx.abs() > mn.abs(), mx, mn)      # MLAS range2scale
    s = m / -8.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    # negative s: clamp(round(w/s)) * s; MLAS computes roundf(w * (1/s) + 8) in float32
    codes = torch.clamp(_round_half_up(wt * (1.0 / s) + 8.0) - 8.0, -8, 7)
    return (codes * s).reshape(w.shape).numpy()


def _search(wt, amax, qmax, alphas, d):
    best_err = torch.full_like(amax, float("inf"))
    best_alpha = torch.ones_like(amax)
    for alpha in alphas:
        scale = alpha * amax / qmax
        e = (torch.clamp(torch.round(wt / scale), -qmax - 1, qmax) * scale - wt) ** 2
        err = (e * d).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_alpha = torch.where(better, alpha * torch.ones_like(amax), best_alpha)
    return best_alpha


def _mse(w, g, d, qmax, lo_hi):
    wt, g = _blocks(w, g)
    dd = torch.ones(1, g, 1) if d is None else torch.from_numpy(
        np.asarray(d, np.float32)).reshape(wt.shape[0], g, 1)
    amax = wt.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    a0, a1 = lo_hi
    coarse = _search(wt, amax, qmax, torch.linspace(a1, a0, 17), dd)
    step = (a1 - a0) / 16
    fine = [torch.clamp(coarse + step * k / 5, 0.05, a1) for k in range(-5, 6)]
    alpha = _search(wt, amax, qmax, fine, dd)
    return _fq(wt, alpha * amax / qmax, -qmax - 1, qmax).reshape(w.shape).numpy()


def mse(w, g=None, **_):
    return _mse(w, g, None, 7, (0.2, 1.0))


def wmse(w, g=None, d=None, **_):
    return _mse(w, g, d, 7, (0.2, 1.0))


def mse_wide(w, g=None, **_):
    return _mse_int4_grid(w, g, None)


def _mse_int4_grid(w, g, d, a0=0.5, a1=1.15):
    """s = alpha * amax / 7 with alpha in [a0, a1] (alpha > 1 lets the extreme land on -8)."""
    return _mse(w, g, d, 7, (a0, a1))


def wmse_wide(w, g=None, d=None, **_):
    return _mse_int4_grid(w, g, d)


def brevitas(w, g=None, **_):
    """Brevitas 0.13.4 Int8WeightPerChannelFloatMSE at 4 bits (read from its source): narrow range
    [-7, 7], scale = c / 7, c from a 20-point grid search xl + (xr - xl) * t, xl = amax/20, xr = amax,
    t in {0} U linspace(1/19, 1, 19), minimising the per-channel squared weight error."""
    wt, _g = _blocks(w, g)
    amax = wt.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    xl = amax / 20
    cands = [xl] + [xl + (amax - xl) * t for t in torch.linspace(1.0 / 19, 1.0, 19)]
    best, best_err = None, None
    for c in cands:
        q = torch.clamp(torch.round(wt / (c / 7)), -7, 7) * (c / 7)
        e = ((q - wt) ** 2).sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = q, e
        else:
            better = e < best_err
            best = torch.where(better, q, best)
            best_err = torch.where(better, e, best_err)
    return best.reshape(w.shape).numpy()


RULES = {"brevitas": brevitas, "absmax7": absmax7, "ort": ort, "mse": mse, "wmse": wmse, "mse_wide": mse_wide, "wmse_wide": wmse_wide}


def quantize(rule, w, g=None, d=None):
    """rule may end in '_shift16': groups offset by 16 input rows (np.roll), i.e. misaligned with
    the Q4_1 blocks of 32 the float weights came from (same group size, same weights)."""
    if rule.endswith("_shift16"):
        base = rule[: -len("_shift16")]
        dd = None if d is None else np.roll(d, 16)
        return np.roll(RULES[base](np.roll(w, 16, axis=0), g, d=dd), -16, axis=0)
    return RULES[rule](w, g, d=d)


def output_error(w, q, gram):
    """||X W - X Q||^2 / ||X W||^2 from the Gram matrix X^T X."""
    dlt = (q - w).astype(np.float64)
    w = w.astype(np.float64)
    return float(np.einsum("ij,ij->", gram @ dlt, dlt) / np.einsum("ij,ij->", gram @ w, w))


def weight_error(w, q):
    return float(((q - w) ** 2).sum() / (w**2).sum())
