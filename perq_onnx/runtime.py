"""onnxruntime sessions and input feeds for decoder LLMs exported by optimum."""
from __future__ import annotations

import json
import os
import pathlib
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from .errors import PerqError


def deploy_config(model) -> dict[str, str]:
    """The session settings a perq-onnx output asks for (metadata ``perq.ort.session_config``,
    written by the ort target), read without loading weights."""
    if isinstance(model, onnx.ModelProto):
        props = model.metadata_props
    else:
        props = onnx.load(str(model), load_external_data=False).metadata_props
    value = next((p.value for p in props if p.key == "perq.ort.session_config"), None)
    return json.loads(value) if value else {}


MAX_THREADS_PER_CPU = 4
MAX_THREADS_CAP = 1024


def max_threads() -> int:
    """The largest --threads accepted: 4 per CPU of this machine, at most 1024 (onnxruntime
    starts one thread per intra-op thread; beyond the CPUs they only compete)."""
    return min(MAX_THREADS_CAP, MAX_THREADS_PER_CPU * (os.cpu_count() or 1))


def check_threads(threads: int | None) -> int | None:
    """--threads as given, or a one-line PerqError naming the bound."""
    if threads is None:
        return None
    if threads < 1:
        raise PerqError(f"--threads {threads}: must be a positive integer")
    if threads > max_threads():
        raise PerqError(f"--threads {threads}: at most {max_threads()} ({MAX_THREADS_PER_CPU} per CPU, this machine has "
                        f"{os.cpu_count()}; never more than {MAX_THREADS_CAP})")
    return threads


def session_options(threads: int | None = None, config: dict | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # DQ(int4) + MatMul fuses to MatMulNBits; accuracy level 0 keeps float activations (exact QDQ)
    # unless the model's target asks for another level.
    for key, value in {"session.qdq_matmulnbits_accuracy_level": "0", **(config or {})}.items():
        opts.add_session_config_entry(key, value)
    opts.log_severity_level = 3
    if check_threads(threads):
        opts.intra_op_num_threads = threads
    return opts


def session(model, threads: int | None = None, options: ort.SessionOptions | None = None,
            config: dict | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session from a path or a ModelProto (large protos go through a file),
    with the session settings the model's target recorded (or `config`)."""
    opts = options or session_options(threads, deploy_config(model) if config is None else config)
    try:
        if isinstance(model, onnx.ModelProto):
            if model.ByteSize() < 1_900_000_000:
                return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.onnx")
                onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
                return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise PerqError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
    sess.genai_head_size = _genai_head_size(pathlib.Path(model))
    return sess


def _genai_head_size(path: pathlib.Path) -> int | None:
    """The head size an onnxruntime-genai folder declares (the model builder leaves the past
    key/value head dimension symbolic; make_feeds needs it for an empty cache)."""
    config = path.parent / "genai_config.json"
    try:
        return int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_feeds(sess: ort.InferenceSession, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for token ids [batch, seq]: attention mask of ones, positions 0..seq-1 and empty
    past key/values when the model has them."""
    ids = np.asarray(ids, dtype=np.int64)
    batch, seq = ids.shape
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, seq), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        elif inp.name.startswith("past_key_values"):
            dims = [d if isinstance(d, int) else 0 for d in inp.shape]
            dims[0] = batch
            if len(dims) == 4 and not isinstance(inp.shape[3], int):  # [batch, heads, past, head size]
                dims[3] = getattr(sess, "genai_head_size", None) or 0
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros(dims, dtype=dtype)
        else:
            raise PerqError(f"model input '{inp.name}' is not one perq-onnx knows how to feed "
                            "(expected input_ids, attention_mask, position_ids, past_key_values.*)")
    return feeds


def logits(sess: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
    return sess.run(["logits"], make_feeds(sess, ids))[0]


def vocab_size(sess: ort.InferenceSession) -> int:
    """The number of logits per position (the model's vocabulary), from one one-token run."""
    return int(logits(sess, np.zeros((1, 1), np.int64)).shape[-1])
