"""Channel transforms T (n x n, orthogonal but for Diagonal) and how they fold into weight slices.

A transform is applied to the channel (last) axis: ``apply(x) == x @ T``. Kinds: a dense
matrix, a Kronecker product of two small matrices, a diagonal, a permutation (x[..., p] == x @ I[:, p]), a block diagonal of one repeated block
(blockdiag(H_b) without materialising n x n), and a chain (T = A @ B). Folding into a weight
(see analysis.Fold) is

* produced channels (axis 1, weight columns and bias): W[:, s] <- W[:, s] @ T, b[s] <- b[s] @ T
* consumed channels (axis 0, weight rows):              W[s, :] <- T^T @ W[s, :]

so that a rotation of the channels by T between producer and consumer cancels. Large weights
(an lm_head of 128k columns) are processed in chunks so that a fold holds only a few MB of
temporaries beyond its result.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK_BYTES = 64 << 20


class Transform:
    size: int | None  # None: any multiple of the block

    def apply(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def matrix(self, n: int) -> np.ndarray:
        """The n x n matrix (for tests and small sizes)."""
        return self.apply(np.eye(n))


@dataclass(frozen=True)
class Dense(Transform):
    q: np.ndarray

    @property
    def size(self):
        return self.q.shape[0]

    def apply(self, x):
        return x @ self.q


@dataclass(frozen=True)
class Permutation(Transform):
    perm: np.ndarray

    @property
    def size(self):
        return self.perm.size

    def apply(self, x):
        return x[..., self.perm]


@dataclass(frozen=True)
class Kron(Transform):
    """kron(A, B) applied as two small products (channel c = i * len(B) + j)."""
    a: np.ndarray
    b: np.ndarray

    @property
    def size(self):
        return self.a.shape[0] * self.b.shape[0]

    def apply(self, x):
        p, q = self.a.shape[0], self.b.shape[0]
        y = x.reshape(*x.shape[:-1], p, q)
        y = np.swapaxes(np.swapaxes(y, -1, -2) @ self.a, -1, -2)  # mixes the p axis: sum_k x[k, l] A[k, i]
        return (y @ self.b).reshape(x.shape)


@dataclass(frozen=True)
class Diagonal(Transform):
    """diag(d): a per-channel scale (not orthogonal: folds an RMSNorm gamma into its readers)."""
    d: np.ndarray

    @property
    def size(self):
        return self.d.size

    def apply(self, x):
        return x * self.d


@dataclass(frozen=True)
class BlockDiagonal(Transform):
    """blockdiag(H, ..., H) for any channel count that H's size divides."""
    block: np.ndarray
    size = None

    def apply(self, x):
        b = self.block.shape[0]
        return (x.reshape(*x.shape[:-1], x.shape[-1] // b, b) @ self.block).reshape(x.shape)


@dataclass(frozen=True)
class Chain(Transform):
    """T = first @ second."""
    first: Transform
    second: Transform

    @property
    def size(self):
        return self.first.size or self.second.size

    def apply(self, x):
        return self.second.apply(self.first.apply(x))


def _chunks(n: int, row_bytes: int):
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def fold_produced(w: np.ndarray, t: Transform, start: int, stop: int) -> np.ndarray:
    """W with W[:, start:stop] <- W[:, start:stop] @ T (float64 arithmetic, w's dtype)."""
    out = np.array(w, dtype=w.dtype, copy=True)
    for rows in _chunks(w.shape[0], 8 * (stop - start)):
        out[rows, start:stop] = t.apply(np.asarray(w[rows, start:stop], dtype=np.float64))
    return out


def fold_consumed(w: np.ndarray, t: Transform, start: int, stop: int) -> np.ndarray:
    """W with W[start:stop, :] <- T^T @ W[start:stop, :] (float64 arithmetic, w's dtype)."""
    out = np.array(w, dtype=w.dtype, copy=True)
    for cols in _chunks(w.shape[1], 8 * (stop - start)):
        out[start:stop, cols] = t.apply(np.asarray(w[start:stop, cols], dtype=np.float64).T).T
    return out
