"""Checks that quantizers.ort reproduces onnxruntime's MatMulNBits symmetric RTN (MLAS
quantize_matmul_4bits, block 32) bit for bit on every decoder linear of the float model:
scale = m / -8 with m = max if |max| > |min| else min; code = clamp(floor(w/scale + 0.5), -8, 7)
(MLAS rounds w/s + 8 with roundf, so .5 ties go up; the Q4_1-derived weights hit ties)."""
import sys
import numpy as np
sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E
import quantizers as Q
from onnxruntime.capi._pybind_state import quantize_matmul_4bits

m = E.Model(E.FLOAT_MODEL)
worst, n = 0.0, 0
for key in m.linears:
    w = np.ascontiguousarray(m.weight(key))
    rows, cols = w.shape
    b = 32
    kb = rows // b
    packed = np.zeros((cols, kb, b // 2), np.uint8)
    zp = np.zeros((cols, (kb + 1) // 2), np.uint8)
    sc = np.zeros((cols, kb), np.float32)
    quantize_matmul_4bits(packed, w, sc, zp, b, cols, rows, True)
    codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(cols, kb, b).astype(np.int32) - 8
    deq = (codes * sc[:, :, None]).reshape(cols, rows).T
    worst = max(worst, float(np.abs(deq - Q.quantize("ort", w, b)).max()))
    n += 1
print(f"{n} linears: max |MLAS dequant - quantizers.ort| = {worst}")
