"""Number formats: each owns its code grid, its scale rule and its exact numpy reference; the FP4
formats also own the standard-op ONNX chains that onnxruntime runs bit-exactly to that reference.

Weights are in ONNX MatMul layout ``W[in, out]``; a *group* (block) is ``g`` consecutive input rows
of one output column, so a group's scales have shape ``[ceil(in / g), out]`` (per output channel:
``[out]``; only INT groups may be ragged). Activations are blocked along their last axis.

Formats
-------
* ``IntFormat(bits, group, symmetric, full_range)``: INT-n, per output channel (``group=None``)
  or per group of rows. Symmetric: zero point 0, int8 codes in ``[-2^(b-1), 2^(b-1) - 1]``,
  ``w ~ code * scale`` with ``scale = alpha * max|w| / (2^(b-1) - 1)``: 2^b - 1 levels, the code
  -2^(b-1) unused. ``full_range`` uses all 2^b levels: ``scale = alpha * m / -2^(b-1)``, ``m`` the
  group's largest-magnitude weight *with its sign* (a step 8/7 finer at 4 bits; the scale is
  negative where that extreme is positive, which onnxruntime accepts and TensorRT does not).
  Asymmetric: uint8 codes in ``[0, 2^b - 1]``, an integer zero point per scale and
  ``w ~ (code - zero) * scale``, where the range ``[min(w, 0), max(w, 0)]`` is shrunk by ``alpha``
  before it is split into ``2^b - 1`` steps. Scales are float32, and codes are always rounded against the float32 scale,
  so ``Quantized.dequantize()`` is exactly what the quantizer measured.
* ``NVFP4(tensor_scale)``: E2M1 values (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives), one E4M3
  (float8_e4m3fn) scale per 16 values, one float32 tensor scale. In float32, in this order::

      tensor_scale = amax(tensor) / 2688          (6 * 448; 1.0 where that is 0: an all-zero tensor)
      raw   = (amax(block) / 6) / tensor_scale    (a clipped weight: alpha * amax(block))
      s8    = e4m3(min(raw, 448))                 RNE, subnormals kept, saturating at 448
      s     = float32(s8) * tensor_scale          = DequantizeLinear(s8, tensor_scale)
      y     = x / (s == 0 ? 1 : s)
      code  = e2m1(y)                             0 where s == 0: a zero block stays zero
      value = code * s

  Weights take ``tensor_scale`` from their own amax; activations from a calibrated (static) amax
  (``NVFP4.from_amax``), the block scales being dynamic.
* ``MXFP4()`` (OCP Microscaling v1.0): E2M1 values, one E8M0 scale X = 2^E per 32 values with
  ``E = floor(log2(max(amax(block), 2^-125))) - 2`` (emax of E2M1 is 2), computed exactly from the
  float's exponent; ``y = x / X``, ``code = e2m1(y)``, ``value = code * X``. The floor at 2^-125
  gives E >= -127, E8M0's smallest: a zero block gets X = 2^-127 and codes 0 (never NaN).
  In ONNX the exponent is ``Floor(Log(a) / ln 2)``, corrected by one either way by comparing a
  with exact powers of two gathered from a table; X is gathered from a table too.

``e2m1(y)``: round half to even onto the E2M1 grid, saturating at +-6: with step 0.5 / 1 / 2 for
``|y| < 2`` / ``< 4`` / ``>= 4``, ``clip(round_half_even(y / step) * step, -6, 6)``.

Hooks of every format (rounding.py's RTN, clip search and GPTQ use only these)
------------------------------------------------------------------------------
``bind(w)`` (fixes tensor-level state from the whole weight: NVFP4's tensor scale),
``group_size(rows)``, ``extremes(wg)`` (what the scale rule reads from groups ``wg[G, g, out]``),
``grid(alpha, extremes)`` (stored scale as float64 numbers, zero point or None, for clipping ratio
``alpha``), ``round(w, scale, zero)`` (codes), ``values(codes, scale, zero)`` (dequantized),
``clip_error`` (the clip search's per-group objective), ``clip_coarse``/``clip_fine`` (the ratios
it tries) and ``package`` (a ``Quantized``).
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto

from .errors import PerqError

CLIP_COARSE = tuple(np.round(np.arange(0.20, 1.0001, 0.05), 4))  # clipping ratios tried first
CLIP_FINE = tuple(np.round(np.arange(-0.02, 0.0201, 0.005), 4))  # offsets around the coarse winner
E2M1_MAX, E4M3_MAX = 6.0, 448.0
NVFP4_TENSOR_DIVISOR = np.float32(E2M1_MAX * E4M3_MAX)  # 2688
MX_EMAX_ELEM = 2  # E2M1's largest exponent: 6 = 1.5 * 2^2
MX_AMAX_FLOOR = 2.0 ** -125  # amax below this gives E8M0's smallest scale, 2^-127
F32 = np.float32


class FormatError(PerqError, ValueError):
    """An invalid number format or input; a ValueError as well as perq-onnx's own error."""


# -- element and scale rounding ------------------------------------------------------------------

def e2m1_round(y) -> np.ndarray:
    """float32 y rounded half-to-even onto the E2M1 grid, saturating at +-6 (float32 values)."""
    y = np.asarray(y, F32)
    a = np.abs(y)
    step = np.where(a < 2, F32(0.5), np.where(a < 4, F32(1), F32(2)))
    return np.clip(np.rint(y / step) * step, F32(-E2M1_MAX), F32(E2M1_MAX))


def e4m3_round(v) -> np.ndarray:
    """float32 v >= 0 as float8_e4m3fn: round half to even (subnormals kept), saturating at 448."""
    return np.minimum(np.asarray(v, F32), F32(E4M3_MAX)).astype(ml_dtypes.float8_e4m3fn)


def nvfp4_tensor_scale(amax) -> np.float32:
    """NVIDIA's per-tensor scale amax / (6 * 448) in float32; 1.0 where that is 0."""
    ts = F32(amax) / NVFP4_TENSOR_DIVISOR
    return ts if ts > 0 else F32(1.0)


def mx_exponent(amax) -> np.ndarray:
    """The E8M0 shared exponent floor(log2(max(amax, 2^-125))) - 2 (int), exact from frexp."""
    return np.frexp(np.maximum(np.asarray(amax, np.float64), MX_AMAX_FLOOR))[1] - 1 - MX_EMAX_ELEM


def e2m1_bit_values() -> np.ndarray:
    """The 16 E2M1 bit patterns (sign bit 3, exponent bits 2-1, mantissa bit 0) as float32."""
    bits = np.arange(16)
    exponent, mantissa = (bits >> 1) & 3, bits & 1
    magnitude = np.where(exponent == 0, 0.5 * mantissa, (1 + 0.5 * mantissa) * 2.0 ** (exponent - 1))
    return np.where(bits & 8, -magnitude, magnitude).astype(F32)


def e8m0_values() -> np.ndarray:
    """The 256 E8M0 bytes as float32: 2^(k - 127), byte 255 NaN."""
    with np.errstate(over="ignore"):
        values = np.ldexp(1.0, np.arange(256) - 127).astype(F32)
    values[255] = np.nan
    return values


# -- quantized tensors ---------------------------------------------------------------------------

@dataclass
class Quantized:
    """Codes ``[in, out]`` with scales per output channel ``[out]`` or per group of contiguous rows
    ``[in / g, out]``. INT: int8/uint8 codes, float32 scales, ``zero_point`` (shaped like ``scale``,
    uint8) when asymmetric; ``dequantize()`` = ``(codes - zero_point) * scale`` in float32. FP4:
    float4_e2m1fn codes, float8_e4m3fn (NVFP4) or float8_e8m0fnu (MXFP4) scales, the NVFP4 tensor
    scale in ``format.tensor_scale``; ``dequantize()`` = the format's reference value."""
    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None = None
    format: Format | None = None

    def _per_row(self, a: np.ndarray) -> np.ndarray:
        rows = self.codes.shape[0]
        if a.ndim == 1:
            return a[None, :]
        return np.repeat(a, getattr(self.format, "group", None) or rows // a.shape[0], axis=0)[:rows]

    def dequantize(self) -> np.ndarray:
        if isinstance(self.format, FP4Format):
            return self.format.values(self.codes, self._per_row(self.scale))
        values = self.codes.astype(F32)
        if self.zero_point is not None:
            values -= self._per_row(self.zero_point).astype(F32)
        return values * self._per_row(self.scale)


# -- formats -------------------------------------------------------------------------------------

class Format:
    """A number format's hooks (module docstring); subclasses (frozen dataclasses) define
    ``extremes``, ``grid``, ``round``, ``values`` and ``package``."""
    name = "format"
    bits = 4
    group: int | None = None
    symmetric = True
    full_range = False
    has_zero_point = False
    code_dtype = np.float64
    clip_coarse = CLIP_COARSE
    clip_fine = CLIP_FINE

    ragged = False  # whether the last group of rows may be shorter (INT: as onnxruntime pads)

    def bind(self, w) -> Format:
        """The format with any tensor-level state fitted from the whole weight (default: itself)."""
        return self

    def group_size(self, rows: int) -> int:
        """Rows per scale for ``rows`` input rows; raises if a group that must divide does not."""
        if self.group is None:
            return rows
        if rows % self.group and not self.ragged:
            raise FormatError(f"group size {self.group} does not divide the {rows} input rows of the weight")
        return self.group

    def n_groups(self, rows: int) -> int:  # scales per output column: ceil(rows / group)
        return -(-rows // self.group_size(rows))

    def clip_error(self, w, extremes, alpha, row_weight=None) -> np.ndarray:
        """Per group and column: sum over the group's rows of row_weight * (w - value)^2."""
        scale, zero = self.grid(alpha, extremes)
        zero = None if zero is None else zero[:, None]
        diff = self.values(self.round(w, scale[:, None], zero), scale[:, None], zero) - w
        diff *= diff
        if row_weight is not None:
            diff *= row_weight
        return diff.sum(axis=1)


@dataclass(frozen=True)
class IntFormat(Format):
    """INT-n, symmetric (narrow or ``full_range``) or asymmetric; per channel or groups of rows,
    the last group maybe shorter (128 on 576 rows: 4 x 128 + 64; DequantizeLinear, MatMulNBits)."""
    ragged = True
    bits: int = 4
    group: int | None = None
    symmetric: bool = True
    full_range: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise FormatError(f"weight bits must be 4 or 8, got {self.bits!r}")
        if self.group is not None and (not isinstance(self.group, (int, np.integer)) or self.group <= 0):
            raise FormatError(f"group must be a positive number of rows or None, got {self.group!r}")
        if self.full_range and not self.symmetric:
            raise FormatError("full_range applies to symmetric forms (asymmetric ones use every code)")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def has_zero_point(self) -> bool:
        return not self.symmetric

    @property
    def code_dtype(self) -> type:
        return np.int8 if self.symmetric else np.uint8

    @property
    def code_range(self) -> tuple[int, int]:
        if self.symmetric:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def extremes(self, wg):
        """(lo, hi) per group: symmetric hi = max|w| (full range: the signed extreme), lo None;
        asymmetric the range [min(w, 0), max(w, 0)]."""
        if not self.symmetric:
            return np.minimum(wg.min(axis=1), 0.0), np.maximum(wg.max(axis=1), 0.0)
        if self.full_range:
            return None, np.take_along_axis(wg, np.abs(wg).argmax(axis=1)[:, None], axis=1)[:, 0]
        return None, np.abs(wg).max(axis=1)

    def grid(self, alpha, extremes):
        """Scale (float32 values held in float64) and zero point for the range alpha * [lo, hi]."""
        lo, hi = extremes
        qmin, qmax = self.code_range
        if self.symmetric:
            scale, zero = alpha * hi / (qmin if self.full_range else qmax), None
        else:
            scale = alpha * (hi - lo) / qmax
        scale = np.where(scale != 0, scale, 1.0).astype(F32).astype(np.float64)
        if not self.symmetric:
            zero = np.clip(np.rint(-alpha * lo / scale), qmin, qmax)
        return scale, zero

    def round(self, w, scale, zero=None):
        """Codes (float64) of w against the grid; scale/zero broadcast against w."""
        codes = np.rint(w / scale)
        if zero is not None:
            codes += zero
        return np.clip(codes, *self.code_range, out=codes)

    def values(self, codes, scale, zero=None):
        return (codes - zero) * scale if zero is not None else codes * scale

    def clip_error(self, w, extremes, alpha, row_weight=None):
        """The objective in units of steps, times scale^2 (the rounding of the INT results)."""
        scale, zero = self.grid(alpha, extremes)
        scaled = w / scale[:, None]
        diff = np.rint(scaled)
        if zero is not None:
            diff += zero[:, None]
        np.clip(diff, *self.code_range, out=diff)
        if zero is not None:
            diff -= zero[:, None]
        diff -= scaled  # error in steps: (q - z) - w / s
        diff *= diff
        if row_weight is not None:
            diff *= row_weight
        return diff.sum(axis=1) * scale * scale

    def package(self, codes, scale, zero, per_channel: bool) -> Quantized:
        codes = codes.astype(np.int8 if self.symmetric else np.uint8)
        scale = scale.astype(F32)
        if zero is not None:
            zero = zero.astype(np.uint8)
        if per_channel:
            scale, zero = scale[0], (zero[0] if zero is not None else None)
        return Quantized(codes=codes, scale=scale, zero_point=zero, format=self)


class FP4Format(Format):
    """E2M1 values with one scale per ``group`` values; subclasses give the scale rule."""
    code_dtype = ml_dtypes.float4_e2m1fn
    scale_dtype: type = F32

    def block_scale(self, amax) -> np.ndarray:  # pragma: no cover - interface
        """The stored scale (float64 numbers) of blocks whose (clipped) amax is ``amax``."""
        raise NotImplementedError

    def effective(self, scale) -> np.ndarray:  # pragma: no cover - interface
        """The float32 step every code is multiplied by, from the stored scale."""
        raise NotImplementedError

    def extremes(self, wg):
        return (np.abs(wg).max(axis=1).astype(F32),)

    def grid(self, alpha, extremes):
        return self.block_scale(alpha * extremes[0].astype(np.float64)), None

    def round(self, w, scale, zero=None):
        s = self.effective(scale)
        with np.errstate(over="ignore"):  # overflow to inf saturates at 6
            codes = e2m1_round(np.asarray(w, F32) / np.where(s == 0, F32(1), s))
        return np.where(s == 0, F32(0), codes)

    def values(self, codes, scale, zero=None):
        return np.asarray(codes).astype(F32) * self.effective(scale)

    def package(self, codes, scale, zero, per_channel: bool) -> Quantized:
        return Quantized(codes=np.asarray(codes).astype(self.code_dtype),
                         scale=np.asarray(scale).astype(self.scale_dtype), format=self)

    # numpy reference of activations (and of RTN weights along axis 0)
    def quantize(self, x, axis: int = -1) -> Quantized:
        """Codes and block scales of x blocked along ``axis`` (alpha = 1), both in x's layout
        (the scales' ``axis`` shrunk by ``group``)."""
        x = np.moveaxis(np.asarray(x, F32), axis, -1)
        if x.shape[-1] % self.group:
            raise FormatError(f"{self.name}: the blocked axis ({x.shape[-1]}) is not a multiple of "
                              f"{self.group}")
        blocks = x.reshape(*x.shape[:-1], -1, self.group)
        amax = np.abs(blocks).max(axis=-1)
        scale = self.block_scale(amax.astype(np.float64))
        codes = self.round(blocks, scale[..., None]).reshape(x.shape)
        return self.package(np.moveaxis(codes, -1, axis), np.moveaxis(scale, -1, axis), None, False)

    def qdq(self, x, axis: int = -1) -> np.ndarray:
        """Quantize-dequantize of x in blocks along ``axis``: the reference of the ONNX chains."""
        q = self.quantize(x, axis)
        codes = np.moveaxis(q.codes, axis, -1)
        scale = np.repeat(np.moveaxis(q.scale, axis, -1), self.group, axis=-1)
        return np.moveaxis(self.values(codes, scale), -1, axis)

    def storage(self, q: Quantized) -> tuple[np.ndarray, np.ndarray]:
        """(codes as uint4 E2M1 bit patterns, scales as float8_e4m3fn / uint8 E8M0 bytes): the
        initializers ``emit_fp4_weight`` reads."""
        return q.codes.view(np.uint8).astype(ml_dtypes.uint4), q.scale


@dataclass(frozen=True)
class NVFP4(FP4Format):
    """NVIDIA's FP4: E4M3 scale per 16 values and a float32 tensor scale (module docstring)."""
    tensor_scale: float | None = None  # None until bound to a weight (or from a calibrated amax)
    group = 16
    name = "nvfp4"
    scale_dtype = ml_dtypes.float8_e4m3fn

    @classmethod
    def from_amax(cls, amax) -> NVFP4:
        return cls(float(nvfp4_tensor_scale(amax)))

    def bind(self, w) -> NVFP4:
        return NVFP4.from_amax(np.abs(np.asarray(w)).max())

    def _tensor_scale(self) -> np.float32:
        if self.tensor_scale is None:
            raise FormatError("NVFP4 needs its tensor scale: bind() it to a weight or use from_amax()")
        return F32(self.tensor_scale)

    def block_scale(self, amax):
        with np.errstate(over="ignore"):  # overflow to inf saturates at 448
            raw = np.asarray(amax, F32) / F32(E2M1_MAX) / self._tensor_scale()
        return e4m3_round(raw).astype(np.float64)

    def effective(self, scale):
        return np.asarray(scale).astype(F32) * self._tensor_scale()


@dataclass(frozen=True)
class MXFP4(FP4Format):
    """OCP MXFP4: E8M0 (power of two) scale per 32 values (module docstring). The clip search
    picks per block among the spec's exponent, one below (clipping) and one above (no saturation
    of an amax in [6, 8) * 2^k) by the clip rule's objective; ``absmax`` is the spec's rule."""
    group = 32
    name = "mxfp4"
    scale_dtype = ml_dtypes.float8_e8m0fnu
    clip_coarse = (1.0, 0.5, 2.0)  # first wins ties: the spec's exponent
    clip_fine = ()

    def block_scale(self, amax):
        return np.ldexp(1.0, np.clip(mx_exponent(amax), -127, 127))

    def effective(self, scale):
        return np.asarray(scale).astype(F32)

    def storage(self, q: Quantized):
        codes, scale = super().storage(q)
        return codes, scale.view(np.uint8)


def format_for(kind: str, bits: int = 4, group: int | None = None, symmetric: bool = True,
               full_range: bool = False) -> Format:
    """The format named by settings.NumberFormat's value ("int", "nvfp4", "mxfp4"); the INT
    fields apply to "int" only (FP4 formats have fixed blocks and no zero point)."""
    kind = str(getattr(kind, "value", kind))
    if kind == "int":
        return IntFormat(bits, group, symmetric, full_range)
    fmt = {"nvfp4": NVFP4(), "mxfp4": MXFP4()}.get(kind)
    if fmt is None:
        raise FormatError(f"unknown number format {kind!r}; choose int, nvfp4 or mxfp4")
    if bits != 4 or group not in (None, fmt.group) or not symmetric or full_range:
        raise FormatError(f"{kind} has 4-bit E2M1 values, symmetric, one scale per {fmt.group}")
    return fmt


# -- standard-op ONNX chains ---------------------------------------------------------------------

def _emit_e2m1_round(e, y):
    """e2m1(y) with standard ops: Round (half to even) of y / step, times step, clipped to +-6."""
    a = e.op("Abs", [y], "abs_y")
    step = e.op("Where", [e.op("Less", [a, e.const(np.array(2, F32), "two")], "below_2"),
                          e.const(np.array(0.5, F32), "step_half"),
                          e.op("Where", [e.op("Less", [a, e.const(np.array(4, F32), "four")], "below_4"),
                                         e.const(np.array(1, F32), "step_one"),
                                         e.const(np.array(2, F32), "step_two")], "step_upper")], "step")
    rounded = e.op("Mul", [e.op("Round", [e.op("Div", [y, step], "in_steps")], "rounded_steps"), step], "rounded")
    return e.op("Clip", [rounded, e.const(np.array(-E2M1_MAX, F32), "min_e2m1"),
                         e.const(np.array(E2M1_MAX, F32), "max_e2m1")], "e2m1")


def _emit_nvfp4_scale(e, amax, ts):
    """(s, divisor): s = float32(e4m3(min((amax / 6) / ts, 448))) * ts; divisor = s, or 1 where
    s == 0 (ts: the tensor scale's float32 scalar tensor)."""
    raw = e.op("Div", [e.op("Div", [amax, e.const(np.array(E2M1_MAX, F32), "six")], "amax_6"), ts], "raw_scale")
    clipped = e.op("Min", [raw, e.const(np.array(E4M3_MAX, F32), "e4m3_max")], "raw_scale_sat")
    s8 = e.op("Cast", [clipped], "scale_e4m3", to=TensorProto.FLOAT8E4M3FN, saturate=1)
    s = e.op("Mul", [e.op("Cast", [s8], "scale_e4m3_float", to=TensorProto.FLOAT), ts], "scale")
    zero = e.op("Equal", [s, e.const(np.array(0, F32), "zero")], "scale_is_zero")
    return s, e.op("Where", [zero, e.const(np.array(1, F32), "one"), s], "divisor")


_MX_OFFSET = 127  # table index of 2^0


def _emit_mx_scale(e, amax):
    """X = 2^(floor(log2(max(amax, 2^-125))) - 2): a Log estimate of the exponent, corrected
    exactly by comparing with powers of two gathered from a table (so X is exact)."""
    exps = np.arange(258) - _MX_OFFSET
    with np.errstate(over="ignore"):
        powers = e.const(np.ldexp(1.0, exps).astype(F32), "powers_of_two")
        scales = e.const(np.ldexp(1.0, exps - MX_EMAX_ELEM).astype(F32), "mx_scales")
    a = e.op("Max", [amax, e.const(np.array(MX_AMAX_FLOOR, F32), "amax_floor")], "amax_floored")
    log2 = e.op("Div", [e.op("Log", [a], "ln_amax"), e.const(np.array(np.log(2), F32), "ln2")], "log2_amax")
    guess = e.op("Cast", [e.op("Add", [e.op("Floor", [log2], "exp_guess"),
                                       e.const(np.array(_MX_OFFSET, F32), "offset")], "idx_guess_f")],
                 "idx_guess", to=TensorProto.INT64)
    over = e.op("Greater", [e.op("Gather", [powers, guess], "pow_guess"), a], "guess_over")
    idx = e.op("Sub", [guess, e.op("Cast", [over], "over_int", to=TensorProto.INT64)], "idx_down")
    next_pow = e.op("Gather", [powers, e.op("Add", [idx, e.const(np.array(1, np.int64), "one_int")], "idx_next")],
                    "pow_next")
    under = e.op("LessOrEqual", [next_pow, a], "guess_under")
    idx = e.op("Add", [idx, e.op("Cast", [under], "under_int", to=TensorProto.INT64)], "idx")
    return e.op("Gather", [scales, idx], "scale")


def emit_fp4_activation_qdq(e, x, fmt: FP4Format, output=None, tensor_scale=None):
    """Dynamic FP4 quantize-dequantize of x over its last axis in blocks of fmt.group, in float32
    between Cast(x, float) and CastLike(y, x), with exactly the float32 operations of the module
    docstring (NVFP4: fmt.tensor_scale a constant, or the scalar tensor ``tensor_scale`` where
    given, the block scales dynamic; MXFP4: all dynamic).
    Ops: Shape, Reshape [-1, g], Abs, ReduceMax, Div, Min, Cast (FLOAT8E4M3FN, saturate=1), Mul,
    Equal, Where (NVFP4) / Max, Log, Floor, Add, Cast, Gather, Greater, Sub, LessOrEqual (MXFP4),
    then Less, Where, Round, Clip (E2M1); opset 21."""
    x32 = e.op("Cast", [x], "x_float", to=TensorProto.FLOAT)
    shape = e.op("Shape", [x32], "shape")
    blocks = e.op("Reshape", [x32, e.const(np.array([-1, fmt.group], np.int64), "block_shape")], "blocks")
    amax = e.op("ReduceMax", [e.op("Abs", [blocks], "abs_x"), e.const(np.array([-1], np.int64), "last_axis")],
                "amax", keepdims=1)
    if isinstance(fmt, NVFP4):
        ts = tensor_scale or e.const(np.array(fmt._tensor_scale(), F32), "tensor_scale")
        scale, divisor = _emit_nvfp4_scale(e, amax, ts)
    else:
        scale = divisor = _emit_mx_scale(e, amax)
    codes = _emit_e2m1_round(e, e.op("Div", [blocks, divisor], "scaled"))
    y = e.op("Reshape", [e.op("Mul", [codes, scale], "dequantized"), shape], "unblocked")
    return e.op("CastLike", [y, x], "y_like_x", output=output)


def emit_fp4_weight(e, codes, scale, fmt: FP4Format, shape: tuple[int, int], output=None):
    """The float32 weight ``[in, out] = shape`` from ``fmt.storage(q)`` initializers: ``codes``
    (UINT4 E2M1 bit patterns ``[in, out]``) and ``scale`` (``[in / g, out]``: FLOAT8E4M3FN for
    NVFP4, UINT8 E8M0 bytes for MXFP4). value = Gather(E2M1 table, codes) * block scale, the
    NVFP4 block scale being DequantizeLinear(scale, tensor_scale) = float32(e4m3) * tensor_scale,
    the MXFP4 one Gather(2^(k - 127) table, scale); equal to ``q.dequantize()``."""
    rows, cols = shape
    table = e.const(e2m1_bit_values(), "e2m1_values")
    values = e.op("Gather", [table, e.op("Cast", [codes], "code_index", to=TensorProto.INT32)], "e2m1")
    if isinstance(fmt, NVFP4):
        block = e.op("DequantizeLinear", [scale, e.const(np.array(fmt._tensor_scale(), F32), "tensor_scale")],
                     "block_scale")
    else:
        exponent = e.op("Cast", [scale], "scale_index", to=TensorProto.INT32)
        block = e.op("Gather", [e.const(e8m0_values(), "e8m0_values"), exponent], "block_scale")
    grouped = e.op("Reshape", [values, e.const(np.array([rows // fmt.group, fmt.group, cols], np.int64),
                                                       "grouped_shape")], "grouped")
    scaled = e.op("Mul", [grouped, e.op("Unsqueeze", [block, e.const(np.array([1], np.int64), "axis_1")],
                                        "block_scale_rows")], "scaled")
    return e.op("Reshape", [scaled, e.const(np.array([rows, cols], np.int64), "weight_shape")], "weight",
                output=output)
