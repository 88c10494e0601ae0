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
    top1: float        # fraction of positions where both models predict the same next token
    kl: float          # mean KL(p_a || p_b) per position, nats
    cosine: float      # cosine similarity of the flattened logits


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare_logits(model_a, model_b, batch=2, seq_len=16, seed=0, threads=None, ids=None) -> Difference:
    """Run both models (each with the session settings its target deploys it with) on the same
    token ids (random unless given) and compare their logits."""
    a, b = session(model_a, threads), session(model_b, threads)
    if ids is None:
        vocab = logits(a, np.zeros((1, 1), np.int64)).shape[-1]
        ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq_len))
    la, lb = logits(a, ids), logits(b, ids)
    diff = float(np.abs(la - lb).max())
    pa, pb = _log_softmax(la), _log_softmax(lb)
    kl = float((np.exp(pa) * (pa - pb)).sum(axis=-1).mean())
    top1 = float((la.argmax(-1) == lb.argmax(-1)).mean())
    fa, fb = la.reshape(-1).astype(np.float64), lb.reshape(-1).astype(np.float64)
    cosine = float(fa @ fb / max(np.linalg.norm(fa) * np.linalg.norm(fb), 1e-30))
    return Difference(diff, diff / max(float(np.abs(la).max()), 1e-30), top1, kl, cosine)
