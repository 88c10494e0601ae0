"""Orthonormal Hadamard matrices.

Powers of two use Sylvester's construction (the ordering a fast Walsh-Hadamard transform
computes). Other sizes use H_m (x) H_{2^k}, where H_m comes from Paley's constructions for a
prime q: type I gives order q + 1 for q = 3 mod 4, type II gives order 2(q + 1) for q = 1 mod 4.
That covers 12, 20, 28, 36, 44, 60, ... and so 576 = 36 * 16, 1536 = 12 * 128, 3072, 5120 ...
"""
from __future__ import annotations

import functools

import numpy as np

from .errors import PerqError


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if r in squares else -1 for r in range(1, q)])
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> np.ndarray | None:
    """An unnormalised +-1 Hadamard matrix of order m from Paley I or II, or None."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):
        s = np.zeros((m, m), dtype=np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return np.eye(m, dtype=np.int64) + s
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            c = np.zeros((q + 1, q + 1), dtype=np.int64)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = _jacobsthal(q)
            a = np.array([[1, -1], [-1, -1]])
            b = np.array([[1, 1], [1, -1]])
            return np.kron(np.eye(q + 1, dtype=np.int64), a) + np.kron(c, b)
    return None


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=32)
def _hadamard_int(n: int) -> np.ndarray | None:
    if is_power_of_two(n):
        return _sylvester(n)
    for k in range(n.bit_length()):
        m, rest = divmod(n, 1 << k)
        if rest:
            break
        base = _paley(m)
        if base is not None:
            return np.kron(base, _sylvester(1 << k))
    return None


def hadamard_factors(n: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with kron(A, B) == hadamard(n): H_m (x) H_{2^k} for a Paley order m, and for powers
    of two H_{2^a} (x) H_{2^b} (Sylvester's construction is a Kronecker power). Applying them one
    after the other costs n (a + b) per vector instead of n^2."""
    hadamard(n)  # refuses sizes without a construction
    k = (n & -n).bit_length() - 1          # the power of two in n
    if is_power_of_two(n):
        return hadamard(1 << (k // 2), dtype), hadamard(1 << (k - k // 2), dtype)
    for j in range(k + 1):                 # the same Paley order _hadamard_int picks
        m = n >> j
        if _paley(m) is not None:
            return (_paley(m) / np.sqrt(m)).astype(dtype), hadamard(1 << j, dtype)
    raise AssertionError(f"no Kronecker factors for {n}")  # unreachable: hadamard(n) exists


def has_hadamard(n: int) -> bool:
    return _hadamard_int(n) is not None


def hadamard(n: int, dtype=np.float64) -> np.ndarray:
    """The orthonormal Hadamard matrix of order n (H @ H.T = I)."""
    h = _hadamard_int(n)
    if h is None:
        raise PerqError(
            f"no Hadamard construction is known to perq-onnx for size {n} (it handles 2^k times "
            "a Paley order such as 12, 20, 28, 36, 44, 60); pass --random-orthogonal to use a "
            "seeded random orthogonal matrix instead"
        )
    return (h / np.sqrt(n)).astype(dtype)


def random_orthogonal(n: int, seed: int, dtype=np.float64) -> np.ndarray:
    """A seeded Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.sign(np.diag(r))[None, :]).astype(dtype)


def orthogonal(n: int, random_seed: int | None = None, dtype=np.float64) -> np.ndarray:
    """Hadamard of order n, or a seeded random orthogonal matrix when a seed is given and no
    Hadamard construction exists."""
    if random_seed is not None and not has_hadamard(n):
        return random_orthogonal(n, random_seed, dtype)
    return hadamard(n, dtype)


def block_diagonal(block: np.ndarray, n: int) -> np.ndarray:
    """blockdiag(block, ..., block) of total size n."""
    b = block.shape[0]
    return np.kron(np.eye(n // b, dtype=block.dtype), block)
