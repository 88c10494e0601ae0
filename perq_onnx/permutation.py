"""Channel permutations that spread l1 mass over the blocks of a block rotation.

Every function takes the per-channel mass (calibrated mean |x|) and the block size b, and returns
``perm`` such that the permuted vector is ``x[..., perm]``; block j holds ``perm[j*b:(j+1)*b]``.
"""
from __future__ import annotations

import numpy as np

from .errors import PerqError

METHODS = ("massdiff", "zigzag", "random", "none")


def _check(mass: np.ndarray, block: int) -> int:
    if mass.ndim != 1:
        raise PerqError("channel statistics must be a vector")
    if block <= 0 or mass.size % block:
        raise PerqError(f"block size {block} does not divide {mass.size} channels")
    return mass.size // block


def _descending(mass: np.ndarray) -> np.ndarray:
    return np.argsort(-mass, kind="stable")  # ties: lower channel index first


def massdiff(mass: np.ndarray, block: int) -> np.ndarray:
    """PeRQ mass diffusion: seed the n blocks with the n heaviest channels, then give each next
    heaviest channel to the non-full block of least mass (ties: lowest block index)."""
    n = _check(mass, block)
    order = _descending(mass)
    blocks = [[c] for c in order[:n]]
    totals = mass[order[:n]].astype(np.float64).copy()
    for c in order[n:]:
        j = int(np.argmin(totals))  # first minimum = lowest index
        blocks[j].append(c)
        totals[j] += mass[c]
        if len(blocks[j]) == block:
            totals[j] = np.inf
    return np.array([c for blk in blocks for c in blk], dtype=np.int64)


def zigzag(mass: np.ndarray, block: int) -> np.ndarray:
    """DuQuant's zigzag: deal channels, heaviest first, to blocks 0..n-1 then n-1..0, and so on."""
    n = _check(mass, block)
    order = _descending(mass)
    blocks = [[] for _ in range(n)]
    for rank, c in enumerate(order):
        turn, pos = divmod(rank, n)
        blocks[pos if turn % 2 == 0 else n - 1 - pos].append(c)
    return np.array([c for blk in blocks for c in blk], dtype=np.int64)


def random(mass: np.ndarray, block: int, seed: int = 0) -> np.ndarray:
    _check(mass, block)
    return np.random.default_rng(seed).permutation(mass.size).astype(np.int64)


def identity(mass: np.ndarray, block: int) -> np.ndarray:
    _check(mass, block)
    return np.arange(mass.size, dtype=np.int64)


def permutation(method: str, mass: np.ndarray, block: int, seed: int = 0) -> np.ndarray:
    if method == "massdiff":
        return massdiff(mass, block)
    if method == "zigzag":
        return zigzag(mass, block)
    if method == "random":
        return random(mass, block, seed)
    if method == "none":
        return identity(mass, block)
    raise PerqError(f"unknown permutation method '{method}' (choose from {', '.join(METHODS)})")


def block_masses(mass: np.ndarray, perm: np.ndarray, block: int) -> np.ndarray:
    """l1 mass of each block after permuting."""
    return mass[perm].reshape(-1, block).sum(axis=1)
