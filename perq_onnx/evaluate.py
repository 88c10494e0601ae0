"""Perplexity and logit comparison of ONNX models with onnxruntime."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .runtime import logits, session


@dataclass
class Perplexity:
    ppl: float
    tokens: int        # predicted tokens
    windows: int
    seconds: float


def window_nll(sess, window: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of every next-token prediction in one window."""
    z = logits(sess, window[None, :])[0, :-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(window) - 1), window[1:]].sum()), len(window) - 1


def perplexity(model, windows: np.ndarray, threads=None, progress=True, sess=None) -> Perplexity:
    """Perplexity over non-overlapping windows [n, seq_len] (each window starts afresh)."""
    start = time.perf_counter()
    sess = sess or session(model, threads)
    nll, count = 0.0, 0
    for w in tqdm(windows, desc="perplexity", unit="win", disable=not progress, leave=False):
        s, n = window_nll(sess, w)
        nll, count = nll + s, count + n
    return Perplexity(float(np.exp(nll / count)), count, len(windows), time.perf_counter() - start)


@dataclass
class Difference:
    max_abs: float
    relative: float    # max |a - b| / max |a|


def compare_logits(model_a, model_b, batch=2, seq_len=16, seed=0, threads=None) -> Difference:
    """Run both models on the same random token ids and compare their logits."""
    a, b = session(model_a, threads), session(model_b, threads)
    vocab = logits(a, np.zeros((1, 1), np.int64)).shape[-1]
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq_len))
    la, lb = logits(a, ids), logits(b, ids)
    diff = float(np.abs(la - lb).max())
    return Difference(diff, diff / max(float(np.abs(la).max()), 1e-30))
