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
from .runtime import logits, make_feeds, session, vocab_size


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
    return tokenize_text(read_text(path), tokenizer, f"text file {path}")


def read_text(path) -> str:
    """A text file's contents; a named pipe or /dev/stdin is read like a file (once)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise PerqError(f"text file {path} does not exist")
    if path.is_dir():
        raise PerqError(f"text file {path} is a directory")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as exc:
        raise PerqError(f"text file {path}: {exc.strerror or exc}") from None


def tokenize_text(text: str, tokenizer, what: str) -> np.ndarray:
    """All tokens of a text: lines joined with newlines, no special tokens."""
    text = "\n".join(text.splitlines())
    if not text.strip():
        raise PerqError(f"{what} is empty")
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def check_ids(tokens: np.ndarray, vocab: int, what: str, tokenizer_vocab: int | None = None) -> None:
    """Refuse token ids outside the model's vocabulary (the rows of its embedding table): a
    tokenizer of another model would index past the table (onnxruntime's Gather fails or, worse,
    reads garbage). `what` names the tokenizer (and the text); `tokenizer_vocab` is its size."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low >= 0 and high < vocab:
        return
    bad = high if high >= vocab else low
    sizes = f"the tokenizer has {tokenizer_vocab} tokens, " if tokenizer_vocab is not None else ""
    raise PerqError(f"{what}: token id {bad} is outside the model's vocabulary ({sizes}the model's embedding has "
                    f"{vocab} rows); is it the tokenizer of another model? pass --tokenizer DIR with this model's")


def windows(tokens: np.ndarray, seq_len: int, count: int | None, what: str, vocab: int | None = None) -> np.ndarray:
    """The first `count` non-overlapping windows of seq_len tokens, as [count, seq_len] (with
    `vocab`, every id must index the model's embedding: see check_ids)."""
    if seq_len < 1 or (count is not None and count < 1):
        raise PerqError(f"{what}: windows of {seq_len} tokens, {count} of them: both must be positive")
    available = len(tokens) // seq_len
    if available == 0:
        raise PerqError(f"{what} has {len(tokens)} tokens, fewer than one window of --seq-len {seq_len}")
    n = available if count is None else min(count, available)
    out = tokens[: n * seq_len].reshape(n, seq_len)
    if vocab is not None:
        check_ids(out, vocab, what)
    return out


def _cache_names(sess) -> dict[str, str] | None:
    """past_key_values.* input -> present.* output, when the model has a KV cache (else None)."""
    inputs = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    outputs = {o.name for o in sess.get_outputs()}
    names = {i: "present" + i[len("past_key_values"):] for i in inputs}
    if not inputs or any(o not in outputs for o in names.values()):
        return None
    return names


def _sample(rng, last: np.ndarray, vocab: int) -> np.ndarray:
    """One token per row from softmax(last), in row order from rng."""
    last = last.astype(np.float64)
    p = np.exp(last - last.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.array([rng.choice(vocab, p=row) for row in p], dtype=np.int64)[:, None]


# Data-free sampling costs one decoder step per token with a KV cache and a re-run of the whole
# prefix per token without one; both are bounded so that a large --seq-len cannot run for hours.
DATA_FREE_MAX_TOKENS = 65536          # count x seq_len, sampled with a KV cache
DATA_FREE_MAX_POSITIONS = 1_048_576   # count x seq_len^2 / 2 positions re-run without a cache


def check_data_free_cost(count: int, seq_len: int, cached: bool) -> None:
    """Refuse data-free sampling beyond the bounds above, naming them and the way out."""
    if cached and count * seq_len > DATA_FREE_MAX_TOKENS:
        raise PerqError(f"data-free calibration of {count} x {seq_len} tokens: at most {DATA_FREE_MAX_TOKENS} "
                        "sampled tokens (--calib-samples x --seq-len); give --calib-data FILE for more")
    positions = count * seq_len * (seq_len - 1) // 2
    if not cached and positions > DATA_FREE_MAX_POSITIONS:
        longest = int((2 * DATA_FREE_MAX_POSITIONS / max(count, 1)) ** 0.5)
        raise PerqError(f"data-free calibration with --seq-len {seq_len} on a model without a KV cache re-runs the "
                        f"whole prefix for every token ({positions:,} positions, at most "
                        f"{DATA_FREE_MAX_POSITIONS:,}): use --seq-len {longest} or less with --calib-samples "
                        f"{count}, a model exported with past key values, or --calib-data FILE")


def generate(model_path, count: int, seq_len: int, seed: int = 0, threads=None, incremental: bool = True) -> np.ndarray:
    """Data-free calibration: `count` sequences sampled from the model itself, all in one batch,
    starting from random tokens of a seeded generator.

    With a KV cache (past_key_values.* inputs, present.* outputs) and `incremental`, each step
    feeds only the new token and the cache (linear cost in seq_len); otherwise each step re-runs
    the whole prefix (quadratic). check_data_free_cost bounds both.
    Both draw the same random numbers in the same order, so they give the same ids up to the
    rounding differences of the two ways of computing the logits."""
    sess = session(model_path, threads)
    cache = _cache_names(sess) if incremental else None
    check_data_free_cost(count, seq_len, cache is not None)
    rng = np.random.default_rng(seed)
    vocab = vocab_size(sess)
    ids = rng.integers(0, vocab, size=(count, 1))
    steps = tqdm(range(seq_len - 1), desc="data-free calibration: sampling", unit="tok", leave=False)
    if cache is None:
        for _ in steps:
            ids = np.concatenate([ids, _sample(rng, logits(sess, ids)[:, -1, :], vocab)], axis=1)
        return ids
    feeds = make_feeds(sess, ids)
    outputs = ["logits", *cache.values()]
    for _ in steps:
        out = dict(zip(outputs, sess.run(outputs, feeds)))
        nxt = _sample(rng, out["logits"][:, -1, :], vocab)
        ids = np.concatenate([ids, nxt], axis=1)
        t = ids.shape[1] - 1  # position of the new token
        feeds = {name: value for name, value in feeds.items() if not name.startswith("past_key_values")}
        feeds["input_ids"] = nxt
        if "attention_mask" in feeds:
            feeds["attention_mask"] = np.ones((count, t + 1), np.int64)
        if "position_ids" in feeds:
            feeds["position_ids"] = np.full((count, 1), t, np.int64)
        for past, present in cache.items():
            feeds[past] = out[present]
    return ids


STATISTICS = ("mean_abs", "absmax", "xtx", "xty")


def _accumulate(kind: str, acc, x: np.ndarray, y: np.ndarray | None = None):
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    if kind == "xty":
        return (0.0 if acc is None else acc) + x.T @ y.reshape(-1, y.shape[-1]).astype(np.float64)
    if kind == "mean_abs":
        return (0.0 if acc is None else acc) + np.abs(x).sum(axis=0)
    if kind == "absmax":
        m = np.abs(x).max(axis=0)
        return m if acc is None else np.maximum(acc, m)
    return (0.0 if acc is None else acc) + x.T @ x


class Calibrator:
    """Runs the model *as rewritten so far* with onnxruntime over the calibration batches and
    collects named per-channel statistics of chosen tensors, one batch at a time:

    * ``mean_abs``: mean |x| per channel (what the permutations read),
    * ``absmax``: max |x| per channel (static activation scales),
    * ``xtx``: X^T X over all tokens (the Hessian of a linear layer's output error; GPTQ),
    * ``xty``: X^T Y of a pair of tensors, requested as the key (x, y) (the float target of
      rounding.float_target: the quantized input against the float one).

    Memory: onnxruntime's copy of the model plus one batch's activations and the accumulators.
    """

    def __init__(self, batches: np.ndarray, threads: int | None = None, progress: bool = True):
        self.batches = batches
        self.threads = threads
        self.progress = progress

    @property
    def tokens(self) -> int:
        return int(self.batches.size)

    def collect(self, session_path, requests: dict) -> dict:
        """requests: tensor name (a pair of names for ``xty``) -> statistic; returns the same keys
        -> value. session_path is a model file in which every requested tensor is a graph output."""
        for kind in set(requests.values()):
            if kind not in STATISTICS:
                raise ValueError(f"unknown statistic {kind!r}")
        sess = session(session_path, self.threads)
        names = tensor_names(requests)
        acc: dict = {}
        for ids in tqdm(self.batches, desc="calibration", unit="seq", leave=False, disable=not self.progress):
            outs = dict(zip(names, sess.run(names, make_feeds(sess, ids[None, :]))))
            for key, kind in requests.items():
                if isinstance(key, tuple):
                    acc[key] = _accumulate(kind, acc.get(key), outs[key[0]], outs[key[1]])
                else:
                    acc[key] = _accumulate(kind, acc.get(key), outs[key])
        del sess
        return {name: value / self.tokens if requests[name] == "mean_abs" else value for name, value in acc.items()}


def tensor_names(requests) -> list[str]:
    """The tensors a set of requests reads (a pair key (x, y) reads both)."""
    names = {}
    for key in requests:
        for name in key if isinstance(key, tuple) else (key,):
            names[name] = None
    return list(names)


def with_outputs(model: onnx.ModelProto, tensors) -> onnx.ModelProto:
    """model with the named tensors added as graph outputs (in place; returned for chaining)."""
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))  # type left to onnxruntime
    return model
