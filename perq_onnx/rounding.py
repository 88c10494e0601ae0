"""Weight rounding in numpy: round-to-nearest (RTN) with a choice of clipping, and GPTQ.

Conventions
-----------
Weights are in ONNX MatMul layout: ``W`` has shape ``[in, out]`` and ``y = x @ W``. Input channels
are rows. A quantization group is a run of ``g`` consecutive rows within one output column, so a
per-group scale has shape ``[ceil(in / g), out]`` (INT groups may be ragged: the last one is
shorter) and a per-channel scale (``group=None``) has shape ``[out]``. The Hessian is ``H = X^T X`` over calibration tokens, shape ``[in, in]``.

Every rule about codes and scales belongs to the weight's number format (perq_onnx/formats.py:
INT-n symmetric or asymmetric, NVFP4, MXFP4); this module only chooses each group's clipping
ratio ``alpha`` and rounds, through the format's hooks (``grid(alpha, extremes)``, ``round``,
``values``). A ``WeightQuant`` is a format plus a clip rule. NVFP4's tensor scale is fixed from
the whole original weight (``format.bind(w)``) before any group is fitted.

Clipping (how ``alpha`` is chosen, independently for every group and column)
---------------------------------------------------------------------------
* ``absmax``: ``alpha = 1``; nothing is clipped.
* ``mse``: grid search minimising ``sum_i (w_i - q(w_i))^2`` over the group, over the format's
  ratios: INT and NVFP4 a coarse grid 0.20, 0.25, ..., 1.00, then steps of 0.005 within +-0.02 of
  the coarse winner; MXFP4, whose scale is a power of two, the spec's exponent (alpha 1), one
  below (0.5) and one above (2). ``alpha = 1`` is always tried, so the result is never worse than
  ``absmax`` on that objective.
* ``act`` (activation-aware): the same search, but each row's squared error is weighted by
  ``H_ii``: ``sum_i H_ii (w_i - q(w_i))^2``. That is the output error ``tr(E^T H E)`` with the
  off-diagonal correlations of ``H`` ignored, which keeps groups and columns independent. A floor
  of ``1e-6 * mean(H_ii)`` on the weights lets plain MSE decide for groups of dead inputs.

GPTQ (Frantar et al., 2022)
---------------------------
GPTQ quantizes the input rows one at a time and, after rounding row ``i``, moves the rows not yet
quantized so as to cancel the output error ``tr(E^T H E)`` that row ``i``'s rounding caused. With
``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``, restricted to the rows still to
process), the rounding error ``e = (w_i - q_i) / U_ii`` is fed back as
``W[j] -= U_ij * e`` for every later row ``j``. Here:

* ``H`` gets ``damp * mean(diag H)`` on its diagonal. A dead input (``H_ii == 0``, never active on
  the calibration data) gets ``H_ii = 1``; it is uncorrelated with everything, so its row is simply
  rounded to nearest (kept, not zeroed, since the input may be live at inference) and nothing is
  fed back from it.
* ``U`` comes from one Cholesky factorisation and one triangular inverse: with ``J`` the order
  reversal and ``J H J = L L^T``, ``U = J L^-1 J``.
* Updates are lazy: the rows after a block of ``block`` rows get the block's updates at once, as
  one matrix product at the end of the block; inside the block the same is done at a finer level
  (row by row within 16 rows, then one product for the rest of the block).
* ``act_order`` processes the rows in order of descending ``H_ii``. Scales always belong to
  contiguous groups of rows in the original order (the exported layout). A group's scale is fitted
  when the first of its rows is processed, from the group's rows as they are at that moment (all
  updates so far applied, pending lazy ones included); without act-order that is the usual "fit
  when the group starts". Per-channel scales are fitted once from the original weights.
* Rows are rounded onto the format's grid (INT codes, or E2M1 values times the group's E4M3 or
  E8M0 scale), and the fed-back error is against the format's dequantized value. NVFP4's tensor
  scale is the original weight's: a group whose updated rows outgrow it gets the E4M3 scale 448
  and its largest values saturate at 6 steps.
* The clip rule is the form's, applied to the group's rows as updated. ``act`` weights each row
  by ``H_ii`` as in RTN: GPTQ's updates cannot undo a row's own rounding error through rows it
  is not correlated with, so a dominant input (a massive activation) still needs its group's
  scale chosen for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import Format, FormatError, IntFormat, Quantized

__all__ = ["CLIPS", "Quantized", "RoundingError", "WeightQuant", "gptq", "relative_error", "rtn"]
CLIPS = ("absmax", "mse", "act")
_SUB_BLOCK = 16  # GPTQ rows updated one by one before a lazy update of the rest of the block
_TILE = 1 << 16  # weights per step of the scale search (keeps its temporaries in cache)


class RoundingError(FormatError):
    """An invalid quantizer form or input; a ValueError as well as perq-onnx's own error."""


@dataclass(frozen=True, init=False)
class WeightQuant:
    """The quantizer's form: a number format (perq_onnx.formats) and the clip rule choosing its
    scales. ``WeightQuant(bits, group, symmetric, clip, full_range)`` is the INT format of those
    fields (see the module docstring); ``WeightQuant(format=NVFP4(), clip="mse")`` any format.
    ``bits``, ``group``, ``symmetric``, ``full_range``, ``code_range`` and ``group_size`` are the
    format's."""
    format: Format
    clip: str

    def __init__(self, bits: int = 4, group: int | None = None, symmetric: bool = True, clip: str = "mse",
                 full_range: bool = False, *, format: Format | None = None):
        if format is None:
            format = IntFormat(bits, group, symmetric, full_range)
        if clip not in CLIPS:
            raise RoundingError(f"clip must be one of {', '.join(CLIPS)}; got {clip!r}")
        object.__setattr__(self, "format", format)
        object.__setattr__(self, "clip", clip)

    bits = property(lambda self: self.format.bits)
    group = property(lambda self: self.format.group)
    symmetric = property(lambda self: self.format.symmetric)
    full_range = property(lambda self: self.format.full_range)
    code_range = property(lambda self: self.format.code_range)

    def group_size(self, rows: int) -> int:
        """Rows per scale for a weight with ``rows`` input rows; raises if the group won't fit."""
        return self.format.group_size(rows)


# -- checks --------------------------------------------------------------------------------------

def _check_weight(w) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise RoundingError(f"weight must be a non-empty [in, out] matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise RoundingError("weight has non-finite values")
    return w


def _check_hessian(hessian, rows: int) -> np.ndarray:
    h = np.asarray(hessian, dtype=np.float64)
    if h.shape != (rows, rows):
        raise RoundingError(f"Hessian must be [{rows}, {rows}] for a weight with {rows} input "
                            f"rows, got {h.shape}")
    if not np.all(np.isfinite(h)):
        raise RoundingError("Hessian has non-finite values")
    if np.any(np.diag(h) < 0):
        raise RoundingError("Hessian has a negative diagonal entry; expected X^T X")
    return h


# -- the clip search -----------------------------------------------------------------------------

def _fit(wg: np.ndarray, fmt: Format, clip: str, row_weight=None):
    """Scale and zero point ``[G, out]`` (stored values, as float64) for grouped weights
    ``wg [G, g, out]`` under the clip rule: the format's ratios ``clip_coarse``, then
    ``clip_fine`` offsets around each winner; ``row_weight [G, g, 1]`` weights each row's squared
    error (clip="act")."""
    extremes = fmt.extremes(wg)
    if clip == "absmax":
        return fmt.grid(1.0, extremes)
    coarse_alphas, fine = np.asarray(fmt.clip_coarse), np.asarray(fmt.clip_fine)
    best = np.ones((wg.shape[0], wg.shape[2]))
    step = max(1, _TILE // (wg.shape[0] * wg.shape[1]))  # output columns per cache-sized tile
    for c in range(0, wg.shape[2], step):
        cols = slice(c, c + step)
        w = np.ascontiguousarray(wg[:, :, cols])
        tile = tuple(None if x is None else x[:, cols] for x in extremes)
        errs = np.stack([fmt.clip_error(w, tile, a, row_weight) for a in coarse_alphas])
        coarse = coarse_alphas[np.argmin(errs, axis=0)]
        if not fine.size:
            best[:, cols] = coarse
            continue
        alphas = np.clip(coarse[None] + fine[:, None, None], 0.01, 1.0)
        errs = np.stack([fmt.clip_error(w, tile, a, row_weight) for a in alphas])
        best[:, cols] = np.take_along_axis(alphas, np.argmin(errs, axis=0)[None], axis=0)[0]
    return fmt.grid(best, extremes)


def _row_weights(diag: np.ndarray) -> np.ndarray:
    """clip="act"'s per-row weights H_ii, floored so that plain MSE decides for dead inputs."""
    return diag + 1e-6 * max(diag.mean(), 1e-30)


# -- public API ----------------------------------------------------------------------------------

def rtn(w, form: WeightQuant, hessian=None) -> Quantized:
    """Round to nearest, the scales chosen by the form's clip rule (``hessian`` only for "act")."""
    w = _check_weight(w)
    rows, cols = w.shape
    fmt = form.format.bind(w)  # NVFP4: the tensor scale from the whole weight
    g, n = fmt.group_size(rows), fmt.n_groups(rows)
    pad = n * g - rows  # a ragged last group is padded with zero rows: no format's extremes move
    row_weight = None
    if form.clip == "act":
        if hessian is None:
            raise RoundingError('clip="act" needs the Hessian (X^T X) of the layer input')
        diag = np.pad(np.diag(_check_hessian(hessian, rows)), (0, pad))
        row_weight = _row_weights(diag).reshape(n, g, 1)
    wg = np.pad(w.astype(np.float64), ((0, pad), (0, 0))).reshape(n, g, cols)
    scale, zero = _fit(wg, fmt, form.clip, row_weight)
    codes = fmt.round(wg, scale[:, None], None if zero is None else zero[:, None])
    return fmt.package(codes.reshape(n * g, cols)[:rows], scale, zero, per_channel=fmt.group is None)


def _invert_lower_inplace(lower: np.ndarray) -> None:
    """Overwrite a lower-triangular matrix with its inverse, recursively by 2x2 blocks:
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]."""
    n = lower.shape[0]
    if n <= 256:
        lower[:] = np.tril(np.linalg.inv(lower))
        return
    h = n // 2
    _invert_lower_inplace(lower[:h, :h])
    _invert_lower_inplace(lower[h:, h:])
    lower[h:, :h] = -_triangular_product(lower[h:, h:], _triangular_product(
        lower[:h, :h], lower[h:, :h], left=False), left=True)


def _triangular_product(lower: np.ndarray, other: np.ndarray, left: bool) -> np.ndarray:
    """``lower @ other`` (left) or ``other @ lower``, skipping the zero upper half of ``lower``
    (about half the work of a dense product)."""
    n = lower.shape[0]
    if n <= 512:
        return lower @ other if left else other @ lower
    h = n // 2
    top, corner, bottom = lower[:h, :h], lower[h:, :h], lower[h:, h:]
    if left:  # [[T, 0], [C, B]] @ [x; y] = [T x; C x + B y]
        x, y = other[:h], other[h:]
        return np.vstack([_triangular_product(top, x, True),
                          corner @ x + _triangular_product(bottom, y, True)])
    x, y = other[:, :h], other[:, h:]  # [x, y] @ [[T, 0], [C, B]] = [x T + y C, y B]
    return np.hstack([_triangular_product(top, x, False) + y @ corner,
                      _triangular_product(bottom, y, False)])


def gptq(w, hessian, form: WeightQuant, *, act_order=True, damp=0.01, block=128) -> Quantized:
    """GPTQ rounding of ``w [in, out]`` against the input Hessian ``hessian [in, in]``."""
    w = _check_weight(w)
    rows, cols = w.shape
    fmt = form.format.bind(w)  # NVFP4: the tensor scale from the whole original weight
    g = fmt.group_size(rows)
    h = _check_hessian(hessian, rows)
    if damp < 0 or block < 1:
        raise RoundingError(f"need damp >= 0 and block >= 1, got damp={damp}, block={block}")
    diag = np.diag(h).copy()
    row_weight = _row_weights(diag) if form.clip == "act" else None

    def weights_of(rows):  # clip="act"'s row weights for _fit, shaped [1, rows, 1]
        return None if row_weight is None else row_weight[rows][None, :, None]
    order = np.argsort(-diag, kind="stable") if act_order else np.arange(rows)
    position = np.argsort(order)  # position[row] = when that row is processed
    h = h[np.ix_(order, order)]  # our own copy, in processing order
    dead = np.flatnonzero(diag[order] == 0)
    h[dead, dead] = 1.0
    h[np.diag_indices(rows)] += damp * diag.mean()
    # U with U^T U = H^-1: with J the order reversal and J H J = L L^T, U = J L^-1 J.
    try:
        lower = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError:
        raise RoundingError("the damped Hessian is not positive definite; raise damp") from None
    del h
    _invert_lower_inplace(lower)
    u = np.ascontiguousarray(lower[::-1, ::-1])
    del lower

    work = w.astype(np.float64)[order]  # rows in processing order, updated as we go
    n_groups = fmt.n_groups(rows)  # the last group may be ragged (shorter): its members are fewer
    scale = np.empty((n_groups, cols))
    zero = np.empty((n_groups, cols)) if fmt.has_zero_point else None
    fitted = np.zeros(n_groups, dtype=bool)
    if fmt.group is None:
        scale[0], z = _fit(w.astype(np.float64)[None], fmt, form.clip, weights_of(slice(None)))
        if zero is not None:
            zero[0] = z
        fitted[0] = True
    codes = np.empty((rows, cols), fmt.code_dtype)

    for start in range(0, rows, block):
        stop = min(start + block, rows)
        current = work[start:stop].copy()  # this block, brought up to date as it is processed
        errors = np.empty((stop - start, cols))  # scaled rounding errors, fed back to later rows
        for sub in range(0, stop - start, _SUB_BLOCK):
            sub_stop = min(sub + _SUB_BLOCK, stop - start)
            for i in range(sub, sub_stop):
                p = start + i
                k = order[p] // g
                if not fitted[k]:
                    # the group's rows as they are now: work[] plus this block's pending updates
                    members = position[k * g:(k + 1) * g]
                    now = work[members] - u[start:p, members].T @ errors[:i]
                    scale[k], z = _fit(now[None], fmt, form.clip, weights_of(slice(k * g, (k + 1) * g)))
                    if zero is not None:
                        zero[k] = z
                    fitted[k] = True
                z = None if zero is None else zero[k]
                q = fmt.round(current[i], scale[k], z)
                codes[p] = q
                errors[i] = (current[i] - fmt.values(q, scale[k], z)) / u[p, p]
                current[i + 1:sub_stop] -= np.outer(u[p, p + 1:start + sub_stop], errors[i])
            done, rest = slice(start + sub, start + sub_stop), slice(start + sub_stop, stop)
            current[sub_stop:] -= u[done, rest].T @ errors[sub:sub_stop]
        work[stop:] -= u[start:stop, stop:].T @ errors

    codes = codes[position]  # back to the original row order
    return fmt.package(codes, scale, zero, per_channel=fmt.group is None)


def float_target(w, hessian, cross, damp=0.01) -> np.ndarray:
    """The weight to round (RTN or GPTQ) when the layer's input is quantized: ``w [in, out]`` is
    applied to the float input X, the quantized weight will see the quantized input X~, and the
    error to minimise is ||X W - X~ Q||^2. With H~ = X~^T X~ (``hessian``) and C = X~^T X
    (``cross``), W' = H~^-1 C W is the least-squares best weight for X~, and the error splits
    into ||X W - X~ W'||^2 (independent of Q) plus ||X~ (W' - Q)||^2: GPTQ of W' against H~
    minimises the whole; RTN rounds the same W'. The solve is damped toward W, not toward zero: W' minimises the error
    plus lambda ||W' - W||^2, lambda = ``damp`` times H~'s mean diagonal (GPTQ's damping), so
    that directions the calibration tokens barely excite keep the original weight."""
    w, h, c = _check_weight(w), np.asarray(hessian, np.float64), np.asarray(cross, np.float64)
    if h.shape != (w.shape[0],) * 2 or c.shape != h.shape:
        raise RoundingError(f"float_target: Hessian {h.shape} and cross term {c.shape} do not fit W {w.shape}")
    lam = damp * max(np.diag(h).mean(), 1e-30)
    w = w.astype(np.float64)
    return np.linalg.solve(h + lam * np.eye(h.shape[0]), c @ w + lam * w)


def relative_error(w, q: Quantized, hessian=None) -> float:
    """``||W - Q||^2 / ||W||^2``, or with the Hessian ``tr((W-Q)^T H (W-Q)) / tr(W^T H W)``."""
    w = _check_weight(w).astype(np.float64)
    diff = w - q.dequantize().astype(np.float64)
    if hessian is None:
        return float(np.sum(diff * diff) / np.sum(w * w))
    h = _check_hessian(hessian, w.shape[0])
    return float(np.sum(diff * (h @ diff)) / np.sum(w * (h @ w)))
