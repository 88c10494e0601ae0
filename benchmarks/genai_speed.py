"""Prompt and decode speed of decoder models in onnxruntime, plain exports and onnxruntime-genai folders.

    python benchmarks/genai_speed.py fp32=~/.cache/perq-onnx/smollm2/onnx-with-past/model.onnx \\
        perq-ort=out/ort/model.onnx perq-genai=out/genai builder-int4=~/.cache/perq-onnx/genai-ref/int4 \\
        --rounds 3 --og

Each argument is NAME=PATH: an .onnx file (an optimum with-past export or a perq-onnx output; its
session settings come from ``perq_onnx.runtime.session``, e.g. the ort target's MatMulNBits
accuracy level) or a folder with ``genai_config.json`` (its ``model.onnx`` in a plain
onnxruntime session: the accuracy level is the MatMulNBits attribute). The first model is the
reference for the ratios. Per round, every model in turn (interleaved, so a change in the
machine's load affects all alike), with one session per model kept over the rounds:

* prefill: one forward pass of 1 x --seq-len random tokens (all positions' logits, as the export
  computes them), after one warm-up pass;
* decode: a one-token prompt, then --steps greedy steps through the KV cache (``present.*`` fed
  back as ``past_key_values.*``); the median step time, as tokens/s.

The reported number is the median over rounds. With --og, genai folders are also timed in
onnxruntime-genai itself (``og.Generator``: the --seq-len prompt through ``append_tokens``, then
--steps ``generate_next_token``; its KV cache is one shared buffer of max_length); onnxruntime-genai
chooses its own thread count (all cores). --json writes everything measured.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perq_onnx.runtime import session  # noqa: E402


def model_file(path: pathlib.Path) -> pathlib.Path:
    return path / "model.onnx" if path.is_dir() else path


def open_session(path: pathlib.Path, threads: int) -> ort.InferenceSession:
    if path.is_dir():
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        config = json.loads((path / "genai_config.json").read_text())
        sess.head_size = config["model"]["decoder"]["head_size"]
        return sess
    return session(path, threads)


def _empty_past(sess, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past key/values; a symbolic head size (the model builder's) is read from the
    folder's genai_config.json (``sess.head_size``, set by open_session)."""
    def dim(i, axis):
        return i.shape[axis] if isinstance(i.shape[axis], int) else sess.head_size
    return {i.name: np.zeros((batch, i.shape[1], 0, dim(i, 3)), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values")}


def _feeds(sess, ids: np.ndarray, past: dict, past_len: int) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, past_len + ids.shape[1]), np.int64), **past}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None]
    return feeds


def prefill_seconds(sess, ids: np.ndarray) -> float:
    feeds = _feeds(sess, ids, _empty_past(sess), 0)
    t0 = time.perf_counter()
    sess.run(["logits"], feeds)
    return time.perf_counter() - t0


def decode_step_seconds(sess, first: int, steps: int) -> list[float]:
    outputs = [o.name for o in sess.get_outputs()]
    present = [n for n in outputs if n.startswith("present")]
    out = dict(zip(outputs, sess.run(outputs, _feeds(sess, np.array([[first]], np.int64), _empty_past(sess), 0))))
    times = []
    for step in range(steps):
        token = np.array([[int(out["logits"][0, -1].argmax())]], np.int64)
        past = {n.replace("present", "past_key_values", 1): out[n] for n in present}
        feeds = _feeds(sess, token, past, step + 1)
        t0 = time.perf_counter()
        res = sess.run(outputs, feeds)
        times.append(time.perf_counter() - t0)
        out = dict(zip(outputs, res))
    return times


def og_seconds(model, ids: np.ndarray, steps: int) -> tuple[float, list[float]]:
    """(prompt seconds, per-token decode seconds) in onnxruntime-genai."""
    import onnxruntime_genai as og
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + steps + 1, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids[0].astype(np.int32))
    prompt = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        gen.generate_next_token()
        times.append(time.perf_counter() - t0)
    return prompt, times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=PATH (.onnx file or genai folder); the first is the reference")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--og", action="store_true", help="also time genai folders in onnxruntime-genai")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args(argv)

    models = {}
    for item in args.models:
        name, _, path = item.partition("=")
        path = pathlib.Path(os.path.expanduser(path))
        if not path or not model_file(path).is_file():
            ap.error(f"{item}: give NAME=PATH with an .onnx file or a folder holding model.onnx")
        models[name] = path
    sessions = {name: open_session(path, args.threads) for name, path in models.items()}
    og_models = {}
    if args.og:
        import onnxruntime_genai as og
        og_models = {name: og.Model(str(path)) for name, path in models.items() if path.is_dir()}
    vocab = sessions[next(iter(models))].get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else 32000
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, args.seq_len)).astype(np.int64)
    for name, sess in sessions.items():  # warm-up
        prefill_seconds(sess, ids)
        decode_step_seconds(sess, 504 % vocab, 4)
    for name, model in og_models.items():
        og_seconds(model, ids[:, :16], 4)

    raw = {name: {"prefill_s": [], "decode_step_s": [], "og_prompt_s": [], "og_decode_step_s": []} for name in models}
    for r in range(args.rounds):
        for name, sess in sessions.items():
            raw[name]["prefill_s"].append(prefill_seconds(sess, ids))
            raw[name]["decode_step_s"].append(statistics.median(decode_step_seconds(sess, 504 % vocab, args.steps)))
            if name in og_models:
                prompt, steps = og_seconds(og_models[name], ids, args.steps)
                raw[name]["og_prompt_s"].append(prompt)
                raw[name]["og_decode_step_s"].append(statistics.median(steps))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    ref = next(iter(models))
    med = {name: {k: statistics.median(v) if v else None for k, v in m.items()} for name, m in raw.items()}
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, onnxruntime {ort.__version__}, "
          f"{args.threads} threads; prompt 1 x {args.seq_len}, decode {args.steps} steps; median of {args.rounds} "
          f"interleaved rounds; ratios to {ref}\n")
    print("| model | prefill ms | speed-up | decode tok/s | x ref | og prompt ms | og decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, m in med.items():
        r = med[ref]
        og_p = f"{1000 * m['og_prompt_s']:.0f}" if m["og_prompt_s"] else "-"
        og_d = f"{1 / m['og_decode_step_s']:.1f}" if m["og_decode_step_s"] else "-"
        print(f"| {name} | {1000 * m['prefill_s']:.0f} | {r['prefill_s'] / m['prefill_s']:.2f}x | "
              f"{1 / m['decode_step_s']:.1f} | {r['decode_step_s'] / m['decode_step_s']:.2f}x | {og_p} | {og_d} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "models": {k: str(v) for k, v in models.items()}, "seq_len": args.seq_len, "steps": args.steps,
            "rounds": args.rounds, "threads": args.threads, "onnxruntime": ort.__version__,
            "load_average": os.getloadavg(), "raw": raw, "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
