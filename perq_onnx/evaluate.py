"""Perplexity and logit comparison of ONNX models with onnxruntime."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .errors import PerqError
from .runtime import logits, session, vocab_size


@dataclass
class Perplexity:
    ppl: float
    tokens: int        # predicted tokens
    windows: int
    seconds: float
    vocab: int = 0     # the model's vocabulary (logits per position)


def window_nll(sess, window: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of every next-token prediction in one window."""
    z = logits(sess, window[None, :])[0, :-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(window) - 1), window[1:]].sum()), len(window) - 1


def check_ids_fit(sess, ids: np.ndarray, model) -> int:
    """The model's vocabulary, after checking that every id indexes it (else a PerqError naming
    the model: its tokenizer is not the one the ids came from)."""
    vocab = vocab_size(sess)
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise PerqError(f"{model}: token id {bad} is outside its vocabulary of {vocab}; "
                        "the text was tokenized for another model (pass --tokenizer DIR with this model's)")
    return vocab


def perplexity(model, windows: np.ndarray, threads=None, progress=True, sess=None) -> Perplexity:
    """Perplexity over non-overlapping windows [n, seq_len] (each window starts afresh)."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise PerqError(f"perplexity needs at least one window of at least 2 tokens (got {list(windows.shape)})")
    start = time.perf_counter()
    sess = sess or session(model, threads)
    vocab = check_ids_fit(sess, windows, model)
    nll, count = 0.0, 0
    for w in tqdm(windows, desc="perplexity", unit="win", disable=not progress, leave=False):
        s, n = window_nll(sess, w)
        nll, count = nll + s, count + n
    return Perplexity(float(np.exp(nll / count)), count, len(windows), time.perf_counter() - start, vocab)


# What `verify` compares on when it is given no --text but finds a tokenizer: ordinary English
# prose (random token ids are text no model was trained on, and agreement on them understates
# how close a quantized model stays to its float form).
SAMPLE_TEXT = """\
The river ran low that summer, and the children of the village spent their afternoons on the
wide stones that the water had left dry. Their grandmother said the stones had been there
before the bridge, before the mill, and before anyone had thought to give the river a name.
In the evenings the farmers came down to the bank to talk about the weather, the price of
grain, and the new road that the council had promised for many years and never built.
A small library opened in the old school building in the autumn. It had two rooms, a stove,
and shelves of books that people from the town had given away: novels with broken spines,
atlases of countries that no longer existed, cookbooks, and a complete set of encyclopedias
from the year the librarian was born. On Saturday mornings she read stories aloud, and by
winter more adults than children came to listen.
Scientists measure the age of a tree by counting its rings, but the width of each ring also
records the rain and the warmth of the year in which it grew. A wet spring leaves a broad pale
band; a dry one leaves a narrow dark line. Read together, the rings of old trees describe
centuries of weather that no one wrote down, and they help us understand how the climate has
changed and how it may change again.
When the first train arrived, the whole town walked to the station to see it. The engine was
smaller than people had expected, and louder, and it left a smell of smoke and hot iron that
hung over the platform for an hour. Within a year the market was twice its old size, and the
baker had to hire two apprentices to keep up with the orders from travellers.
"""


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
    token ids (random unless given) and compare their logits. Models of different vocabularies
    cannot be compared (PerqError)."""
    if ids is None and (batch < 1 or seq_len < 1):
        raise PerqError(f"--batch {batch} --seq-len {seq_len}: both must be positive")
    a, b = session(model_a, threads), session(model_b, threads)
    va, vb = vocab_size(a), vocab_size(b)
    if va != vb:
        raise PerqError(f"{model_a} has a vocabulary of {va}, {model_b} of {vb}: "
                        "verify compares two forms of one model")
    if ids is None:
        ids = np.random.default_rng(seed).integers(0, va, size=(batch, seq_len))
    check_ids_fit(a, ids, model_a)
    la, lb = logits(a, ids), logits(b, ids)
    if la.shape != lb.shape:
        raise PerqError(f"{model_a} gives logits of shape {list(la.shape)}, {model_b} {list(lb.shape)}")
    diff = float(np.abs(la - lb).max())
    pa, pb = _log_softmax(la), _log_softmax(lb)
    kl = float((np.exp(pa) * (pa - pb)).sum(axis=-1).mean())
    top1 = float((la.argmax(-1) == lb.argmax(-1)).mean())
    fa, fb = la.reshape(-1).astype(np.float64), lb.reshape(-1).astype(np.float64)
    cosine = float(fa @ fb / max(np.linalg.norm(fa) * np.linalg.norm(fb), 1e-30))
    return Difference(diff, diff / max(float(np.abs(la).max()), 1e-30), top1, kl, cosine)
