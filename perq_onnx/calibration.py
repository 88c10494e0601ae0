"""Calibration with onnxruntime: per-channel mean |x| at chosen tensors of the original model.

The tensors are exposed as extra graph outputs and accumulated batch by batch (memory bounded
by one batch's activations). Calibration sequences come from a text file tokenized with the
model's tokenizer, or, data-free, from sequences the model samples itself from a fixed seed.
"""
from __future__ import annotations

import pathlib

import numpy as np
import onnx
from tqdm import tqdm

from .errors import PerqError
from .runtime import logits, make_feeds, session


def load_tokenizer(directory):
    from transformers import AutoTokenizer  # slow import, only when needed

    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise PerqError(f"tokenizer directory {directory} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise PerqError(f"no tokenizer in {directory} ({str(exc).splitlines()[0][:120]}); pass --tokenizer DIR") from None
    tok.model_max_length = 1 << 40  # we cut windows ourselves
    return tok


def tokenize_file(path, tokenizer) -> np.ndarray:
    """All tokens of a text file: lines joined with newlines, no special tokens."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PerqError(f"text file {path} does not exist")
    text = "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines())
    if not text.strip():
        raise PerqError(f"text file {path} is empty")
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def windows(tokens: np.ndarray, seq_len: int, count: int | None, what: str) -> np.ndarray:
    """The first `count` non-overlapping windows of seq_len tokens, as [count, seq_len]."""
    available = len(tokens) // seq_len
    if available == 0:
        raise PerqError(f"{what} has {len(tokens)} tokens, fewer than one window of --seq-len {seq_len}")
    n = available if count is None else min(count, available)
    return tokens[: n * seq_len].reshape(n, seq_len)


def generate(model: onnx.ModelProto, count: int, seq_len: int, seed: int = 0, threads=None) -> np.ndarray:
    """Data-free calibration: `count` sequences sampled from the model itself, all in one batch,
    starting from random tokens of a seeded generator."""
    sess = session(model, threads)
    rng = np.random.default_rng(seed)
    vocab = logits(sess, np.zeros((1, 1), np.int64)).shape[-1]
    ids = rng.integers(0, vocab, size=(count, 1))
    for _ in tqdm(range(seq_len - 1), desc="data-free calibration: sampling", unit="tok", leave=False):
        last = logits(sess, ids)[:, -1, :].astype(np.float64)
        p = np.exp(last - last.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        nxt = [rng.choice(vocab, p=row) for row in p]
        ids = np.concatenate([ids, np.array(nxt, dtype=np.int64)[:, None]], axis=1)
    return ids


def channel_means(model: onnx.ModelProto, tensors: list[str], batches: np.ndarray, threads=None) -> dict[str, np.ndarray]:
    """Mean |x| per channel (last axis) of each named tensor over all tokens of `batches`."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = session(probe, threads)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for ids in tqdm(batches, desc="calibration", unit="seq", leave=False):
        outs = sess.run(tensors, make_feeds(sess, ids[None, :]))
        for name, x in zip(tensors, outs):
            x = np.abs(x.astype(np.float64)).reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0.0) + x.sum(axis=0)
        count += len(ids)
    return {name: s / count for name, s in sums.items()}
