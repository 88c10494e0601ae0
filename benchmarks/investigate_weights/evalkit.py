"""Shared helpers for the weight-quantization investigation (issue 9).

Run with PYTHONPATH=/work/frozen (the frozen perq-onnx) and OMP_NUM_THREADS=1.
* windows(split, n): first n non-overlapping 512-token windows of WikiText-2 {valid,test}
  (lines joined with "\n", no special tokens) -- same as perq-onnx eval / the Brevitas reference.
* Model: an ONNX decoder whose 7x30 decoder linears (q/k/v/o/gate/up/down MatMuls, found by node
  name) can have their weight initializers swapped; ppl() evaluates with onnxruntime, 1 thread.
* grams(): per distinct linear input, X^T X (float64) over calibration windows.
"""
from __future__ import annotations

import os
import pathlib
import re
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

HERE = pathlib.Path(__file__).resolve().parent
CACHE = pathlib.Path.home() / ".cache/perq-onnx/smollm2/onnx"
FLOAT_MODEL = CACHE / "model.onnx"
DATA = pathlib.Path("/work/shared/data/wikitext-2")
WORK = pathlib.Path(os.environ.get("IW_WORK", "/tmp/iw"))   # big artifacts (models, grams): not in git
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
NAME_RE = re.compile(r"^/model/layers\.(\d+)/(?:self_attn|mlp)/(q|k|v|o|gate|up|down)_proj/MatMul$")

_tok = {}


def tokens(split: str) -> np.ndarray:
    if split not in _tok:
        from perq_onnx.calibration import load_tokenizer, tokenize_file
        _tok[split] = tokenize_file(DATA / f"{split}.txt", load_tokenizer(CACHE))
    return _tok[split]


def windows(split: str, n: int, seq_len: int = 512) -> np.ndarray:
    t = tokens(split)
    n = min(n, len(t) // seq_len)
    return t[: n * seq_len].reshape(n, seq_len)


def session_options():
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.log_severity_level = 3
    return so


def session(model):
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, pathlib.PurePath):
        model = str(model)
    return ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])


def feeds(sess, ids):
    ids = np.asarray(ids, np.int64)
    b, s = ids.shape
    f = {}
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            f[inp.name] = ids
        elif inp.name == "attention_mask":
            f[inp.name] = np.ones((b, s), np.int64)
        elif inp.name == "position_ids":
            f[inp.name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        else:
            raise ValueError(inp.name)
    return f


def window_nll(sess, w):
    z = sess.run(["logits"], feeds(sess, w[None, :]))[0][0, :-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(w) - 1), w[1:]].sum()), len(w) - 1


def ppl(model, wins=None, n=32, return_nll=False):
    """Perplexity over the first n test windows (or the given windows), onnxruntime 1 thread."""
    wins = windows("test", n) if wins is None else wins
    sess = session(model)
    nll = []
    for w in wins:
        nll.append(window_nll(sess, w)[0])
    count = len(wins) * (wins.shape[1] - 1)
    p = float(np.exp(sum(nll) / count))
    return (p, np.array(nll)) if return_nll else p


class Model:
    """An ONNX decoder whose decoder-linear weights ([in, out]) can be replaced."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.proto = onnx.load(str(self.path))
        inits = {t.name: t for t in self.proto.graph.initializer}
        self.inits = inits
        self.linears = {}   # "layers.i.kind" -> initializer name
        self.inputs = {}    # "layers.i.kind" -> input tensor name
        for node in self.proto.graph.node:
            m = NAME_RE.match(node.name)
            if node.op_type == "MatMul" and m:
                key = f"layers.{m.group(1)}.{m.group(2)}"
                assert node.input[1] in inits, (key, node.input[1])
                self.linears[key] = node.input[1]
                self.inputs[key] = node.input[0]
        assert len(self.linears) == 7 * 30, len(self.linears)
        self._orig = {}

    def weight(self, key) -> np.ndarray:
        return numpy_helper.to_array(self.inits[self.linears[key]])

    def weights(self):
        return {k: self.weight(k) for k in self.linears}

    def with_weights(self, new: dict) -> bytes:
        """Serialized model with weights replaced (float32 [in, out]); the proto is restored."""
        saved = {}
        try:
            for key, w in new.items():
                t = self.inits[self.linears[key]]
                saved[key] = onnx.TensorProto()
                saved[key].CopyFrom(t)
                t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), t.name))
            return self.proto.SerializeToString()
        finally:
            for key, t0 in saved.items():
                self.inits[self.linears[key]].CopyFrom(t0)

    def ppl(self, new: dict | None = None, n=32, return_nll=False):
        blob = self.with_weights(new) if new else self.proto.SerializeToString()
        return ppl(blob, n=n, return_nll=return_nll)

    def grams(self, wins) -> dict:
        """X^T X (float64) for each distinct linear input, keyed by input tensor name, and the
        token count. Also per-channel max|x|."""
        names = sorted(set(self.inputs.values()))
        probe = onnx.ModelProto()
        probe.CopyFrom(self.proto)
        for n_ in names:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(n_, onnx.TensorProto.FLOAT, None))
        sess = session(probe)
        g, amax = {}, {}
        for w in wins:
            outs = sess.run(names, feeds(sess, w[None, :]))
            for n_, x in zip(names, outs):
                x = x.reshape(-1, x.shape[-1]).astype(np.float64)
                g[n_] = g.get(n_, 0.0) + x.T @ x
                amax[n_] = np.maximum(amax.get(n_, 0.0), np.abs(x).max(axis=0))
        return {"gram": g, "amax": amax, "tokens": len(wins) * wins.shape[1]}


def timed(fn, *a, **k):
    t = time.time()
    r = fn(*a, **k)
    return r, time.time() - t
