"""How much of a model's float weights already sit on a low-bit block grid.

A model dequantized from a 4-bit GGUF file (Q4_0, Q4_1, Q4_K: 16 levels per block of 32 input
values) has float weights that any quantizer with the same blocks recovers almost exactly, so a
block-32 weight-only comparison measures grid recovery rather than quantization skill, and every
rotation destroys the grid. This module measures it, so benchmarks can say so next to their
numbers.

A block (``block`` consecutive input rows of one output column; MatMul layout ``W[in, out]``) is
*on a grid of L levels* when its values are ``v_min + k * d`` for integers ``0 <= k < L`` with
one step ``d`` per block: at most L distinct values, all differences from the smallest an integer
multiple (within ``rtol`` of the step) of the smallest gap between neighbouring distinct values.
A constant block counts as on the grid. The same test on blocks shifted by half a block tells
alignment from coincidence: a file grid shows up at offset 0 and largely vanishes at the shift.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def on_grid(w: np.ndarray, block: int = 32, levels: int = 16, offset: int = 0, rtol: float = 1e-3) -> np.ndarray:
    """Boolean [blocks, out]: whether each block of ``block`` rows (starting at row ``offset``)
    of ``w`` [in, out] holds at most ``levels`` values of one uniform grid."""
    w = np.asarray(w, dtype=np.float64)
    rows = (w.shape[0] - offset) // block * block
    if rows <= 0:
        return np.zeros((0, w.shape[1]), dtype=bool)
    b = np.sort(w[offset:offset + rows].reshape(-1, block, w.shape[1]), axis=1)  # [blocks, block, out]
    gaps = np.diff(b, axis=1)
    scale = np.maximum(np.abs(b).max(axis=1), 1e-30)                              # [blocks, out]
    distinct = gaps > 1e-6 * scale[:, None, :]
    count = 1 + distinct.sum(axis=1)
    step = np.where(distinct, gaps, np.inf).min(axis=1)                             # smallest real gap
    step = np.where(np.isfinite(step), step, 1.0)
    k = (b - b[:, :1]) / step[:, None, :]
    integral = (np.abs(k - np.round(k)) <= rtol * np.maximum(1.0, k)).all(axis=1)
    span = np.round(k[:, -1]) <= levels - 1
    return (count <= levels) & integral & span


@dataclass(frozen=True)
class GridReport:
    """Fractions of blocks on a grid, over every weight measured."""
    block: int
    levels: int
    aligned: float      # blocks starting at row 0
    shifted: float      # blocks shifted by half a block
    weights: int

    @property
    def from_low_bit_file(self) -> bool:
        """Most aligned blocks on the grid and clearly fewer shifted ones: the weights come from a
        block-quantized file, so block-``block`` comparisons measure grid recovery."""
        return self.aligned > 0.5 and self.aligned > 2 * self.shifted

    def __str__(self) -> str:
        verdict = ("the weights come from a block-quantized file: comparisons at block "
                   f"{self.block} measure grid recovery; compare per channel or at block >= {4 * self.block}"
                   if self.from_low_bit_file else "no low-bit block grid")
        return (f"{self.aligned:.1%} of {self.block}-row blocks on a {self.levels}-level grid "
                f"({self.shifted:.1%} when shifted by {self.block // 2} rows) over {self.weights} weights: {verdict}")


def grid_report(weights, block: int = 32, levels: int = 16) -> GridReport:
    """The grid fractions of an iterable of [in, out] weight arrays (each read once)."""
    aligned = shifted = total_a = total_s = n = 0
    for w in weights:
        a, s = on_grid(w, block, levels), on_grid(w, block, levels, offset=block // 2)
        aligned, total_a = aligned + int(a.sum()), total_a + a.size
        shifted, total_s = shifted + int(s.sum()), total_s + s.size
        n += 1
    return GridReport(block, levels, aligned / max(total_a, 1), shifted / max(total_s, 1), n)
