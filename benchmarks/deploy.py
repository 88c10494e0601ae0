"""Deployment benchmark (issue 10): SmolLM2-135M (fp32 recipe) as the fp32 export, onnxruntime's
own INT4 weight quantizer, and perq-onnx's three targets, on one machine in one run.

    python benchmarks/deploy.py                          # full run (32 windows, 5 latency rounds)
    python benchmarks/deploy.py --windows 2 --runs 2     # quick try
    python benchmarks/deploy.py --only fp32,perq-ort     # a subset (others keep their ppl from deploy.json)

Configurations (on the plain export for perplexity, prefill and size; the timed ones also on the
KV-cache export `smollm2-with-past` for decode):

* ``fp32``: the optimum export as it is.
* ``ortq-rtn-b{32,128}-acc{4,0}``: the peer, onnxruntime's ``MatMulNBitsQuantizer`` with its
  default ``DefaultWeightOnlyQuantConfig`` (round to nearest, absmax scale per block), symmetric,
  MatMulNBits, block 32 / 128, accuracy_level 4 or 0. By default every MatMul with a constant
  weight is quantized, *lm_head included* (the export stores the tied lm_head as its own
  initializer); the embedding Gather stays fp32.
* ``perq-ort``: ``perq-onnx optimize --target ort`` with its defaults: R1 full Hadamard + R2
  per-head + P3 massdiff + R3 online block Hadamard b=16, INT4 symmetric full-range weights in
  blocks of 32 input rows rounded by GPTQ with activation-aware scales -> MatMulNBits at accuracy
  level 4 (session setting recorded in the model), lm_head INT4, embedding INT8
  (``--float-embeddings`` would keep both float).
* ``perq-ort-b64`` (``w_group=64``), ``perq-ort-noR3`` (``block="none"``), ``perq-ort-rtn`` (``rounding="rtn"``), ``perq-ort-norot``
  (no rotation or permutation): the same target with one thing changed.
* ``perq-tensorrt``: ``--target tensorrt`` with its defaults (INT4 weight-only blocks of 64: 128
  does not divide SmolLM2's 576; GPTQ; R3 inlined; embedding float, lm_head INT4). TensorRT is not
  installable here: its perplexity and timings are onnxruntime CPU's.
* ``perq-simulate``: the paper's W4A4 research form (``--target simulate``, R3 b=16).

One calibration (WikiText-2 valid 32 x 512) gives every optimize the same permutation statistics
(``stats=``) and GPTQ the same windows (``batches=``).

Measurements:
* ppl: WikiText-2 test, the first N (default 32) non-overlapping 512-token windows, through
  ``perq_onnx.runtime.session(path)`` (the model's recorded session settings), 2 threads.
* bytes: the .onnx file plus its external data files.
* prefill: one forward pass of batch 1 x 512 tokens on the plain export.
* decode: the with-past export, prompt of 1 token, then 256 greedy steps feeding present.* back
  as past_key_values.* (attention_mask growing, position_ids = past length); the median
  per-step time of a run; tokens/s = 1 / that.
* latency is the median over --runs rounds; in each round every configuration is loaded, warmed
  up and timed once, in an order shuffled per round (seed: the round), so that load on this
  shared machine and position in the round affect all alike; 2 intra-op threads. Ratios are to fp32 of the same run.
* peak RSS: VmHWM of a fresh subprocess that loads the model and runs it (plain: one 512-token
  forward; with-past: 64 decode steps).

onnxruntime-genai folders (``--part genai``; ``--part all`` runs both parts), timed where their
users run them, in ``og.Generator``:

* ``builder-fp32``, ``builder-int4``, ``builder-int4-b64``, ``builder-int4-b128``, ``builder-k_quant``,
  ``builder-k_quant_mixed``: onnxruntime-genai's model builder (``python -m
  onnxruntime_genai.models.builder -p fp32|int4 -e cpu``; ``--extra_options block_size=64|128``
  for the RTN rows in larger blocks, ``algo_config=k_quant|k_quant_mixed`` for the last two) from
  the recipe's Hugging Face folder. The
  builder needs transformers 5: give its venv's python with ``--builder-python`` (these rows are
  skipped without it). The builder is a peer run here, never part of perq-onnx.
* ``perq-genai``: ``perq-onnx optimize smollm2 --target genai`` with its defaults (INT4 blocks of
  64), calibrated like the rows above; ``perq-genai-b32`` / ``perq-genai-b128`` are ``--w-group 32``
  / ``128``; ``perq-genai-acc0`` is the same folder with every MatMulNBits at accuracy level
  0 (float activations in the kernel; the writer uses 4); ``perq-genai-R3`` adds ``--block 16``
  (the online block rotation before down_proj and its permutation, off by default in genai); ``perq-genai-int4`` and
  ``perq-genai-int8`` change the embedding's form (``--embedding int4``: INT4 blocks of its own;
  ``int8``: one scale per token; the default for SmolLM2, a tied model, gathers from lm_head's
  INT4 codes: one table);
  ``perq-genai-floatemb`` adds ``--float-embeddings`` (embedding and lm_head float);
  ``perq-genai-kernel-int8`` adds ``--kernel int8`` (the decoder linears over INT8 weights
  widened from the INT4 file at load, int8 activations); ``perq-genai-int8-prompt`` adds
  ``--kernel int8-prompt`` (that INT8 graph for prompts, the MatMulNBits graph for token
  generation, both on one weight file; its ppl column also gives the prompt graph's).
* ppl: the same test windows, the folder's model.onnx in a plain onnxruntime session; MB: every
  file of the folder's model (.onnx and external data); og prompt: ``append_tokens`` of the first
  512 test tokens into a fresh ``og.Generator``; og decode: then --genai-steps
  ``generate_next_token`` calls, the median per token. Every folder once per round in a shuffled
  order (the builder's fp32 folder is the reference of the ratios), median over --runs rounds;
  each round loads every folder afresh (``og.Model``, a short warm-up, the timed prompt and
  tokens, then the model is dropped): five copies of one folder loaded side by side in one
  process decoded at 92-105 tok/s, each copy keeping its speed through the rounds (a one-off
  check, script not kept), so a folder loaded once would carry one placement's luck into every
  round;
  every folder runs with onnxruntime-genai's default threads (on this 2-vCPU machine one intra-op
  thread: the builder's fp32 prompt takes as long as a one-thread plain session, half as long
  with ``"intra_op_num_threads": 2`` in genai_config.json).

Models are cached under $PERQ_CACHE/deploy; existing models are not rebuilt and perplexities
already in deploy.json for the same window count and the same model file (its mtime) are not
re-evaluated (resumable; delete a cached model to rebuild it with the current perq-onnx). Results:
benchmarks/results/deploy.json and deploy.md.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from perq_onnx import calibration, pipeline  # noqa: E402
from perq_onnx.evaluate import perplexity  # noqa: E402
from perq_onnx.genai import prompt_path  # noqa: E402
from perq_onnx.models import resolve  # noqa: E402
from perq_onnx.runtime import make_feeds, session  # noqa: E402
from perq_onnx.settings import Settings  # noqa: E402

from benchmarks.peers import peer_quantize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
THREADS = 2
SEQ_LEN = 512
DECODE_STEPS = 256


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PERQ_CACHE") or "~/.cache/perq-onnx").expanduser() / "deploy"


# ----------------------------------------------------------------------------- configurations

NO_ROTATION = dict(residual_rotation="none", head_rotation=False, block="none", permute="none")

CONFIGS = {
    "fp32": dict(kind="fp32", label="fp32 export"),
    "ortq-rtn-b32-acc4": dict(kind="peer", block=32, acc=4, label="onnxruntime RTN sym b32, acc 4"),
    "ortq-rtn-b32-acc0": dict(timed=False, kind="peer", block=32, acc=0, label="onnxruntime RTN sym b32, acc 0"),
    "ortq-rtn-b128-acc4": dict(kind="peer", block=128, acc=4, label="onnxruntime RTN sym b128, acc 4"),
    "ortq-rtn-b128-acc0": dict(timed=False, kind="peer", block=128, acc=0, label="onnxruntime RTN sym b128, acc 0"),
    # perq-ort is the ort target with its defaults (GPTQ, activation-aware full-range scales);
    # the rows after it change one thing each
    "perq-ort": dict(kind="perq", settings=dict(target="ort"),
                     label="perq ort (online R1+R2+P3+R3 b16), INT4 b32, GPTQ (defaults)"),
    "perq-ort-b64": dict(kind="perq", settings=dict(target="ort", w_group=64),
                         label="perq ort --w-group 64 (the genai target's blocks)"),
    "perq-ort-noR3": dict(kind="perq", settings=dict(target="ort", block="none"),
                          label="perq ort --block none (no R3, so R1 folded)"),
    "perq-ort-rtn": dict(timed=False, kind="perq", settings=dict(target="ort", rounding="rtn"),
                         label="perq ort, round to nearest (act scales)"),
    "perq-ort-norot": dict(timed=False, kind="perq", settings=dict(target="ort", **NO_ROTATION),
                           label="perq ort, no rotation or permutation"),
    # the target picks block 64: its default 128 does not divide SmolLM2's 576 hidden rows
    "perq-tensorrt": dict(timed=False, kind="perq", settings=dict(target="tensorrt"),
                          label="perq tensorrt (INT4 b64 weight-only, GPTQ), run in onnxruntime"),
    "perq-simulate": dict(timed=False, kind="perq", settings=dict(target="simulate", float_target=False),
                          label="perq simulate W4A4 (paper)"),
    # not in the default set: the ort target with embedding and lm_head float
    "perq-ort-floatemb": dict(timed=False, kind="perq", settings=dict(target="ort", float_embeddings=True),
                              label="perq ort --float-embeddings", optional=True),
}
DEFAULT = [k for k, v in CONFIGS.items() if not v.get("optional")]


def timed(name: str) -> bool:
    """Whether a configuration gets latency and decode RSS (and so a with-past build): fp32, the
    block-32/128 peers at accuracy level 4 and the ort target with and without R3 and in blocks of
    64; the others differ from those in quality only and get ppl, size and prefill RSS."""
    return CONFIGS[name].get("timed", True)


def model_paths(name: str) -> dict[str, pathlib.Path]:
    if name == "fp32":
        return {"plain": resolve("smollm2"), "past": resolve("smollm2-with-past")}
    d = cache_root() / name
    return {"plain": d / "plain" / "model.onnx", "past": d / "past" / "model.onnx"}


def lm_head_quantized(path: pathlib.Path) -> dict:
    """Whether the model's lm_head and embedding are quantized (read from the graph)."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    logits = producers[m.graph.output[0].name] if m.graph.output[0].name == "logits" else None
    head = logits.op_type if logits is not None else "?"
    if logits is not None and logits.op_type == "MatMul":
        w = logits.input[1]
        src = producers.get(w)
        head = f"MatMul <- {src.op_type}" if src is not None else "fp32 MatMul"
        if src is not None and src.op_type == "DequantizeLinear":
            head = f"{onnx.TensorProto.DataType.Name(inits[src.input[0]].data_type)} DQ+MatMul"
    elif head == "MatMulNBits":
        bits = next((a.i for a in logits.attribute if a.name == "bits"), 4)
        head = f"INT{bits} MatMulNBits"
    emb = next((n for n in m.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
                and n.input and n.input[0] in inits and len(inits[n.input[0]].dims) == 2), None)
    emb_form = "?"
    if emb is not None:
        t = inits[emb.input[0]]
        emb_form = f"{onnx.TensorProto.DataType.Name(t.data_type)} {emb.op_type}"
    return {"lm_head": head, "embedding": emb_form}


def file_bytes(path: pathlib.Path) -> int:
    """The .onnx file plus the external data files its initializers reference."""
    return sum(f.stat().st_size for f in model_files(path))


def model_files(path: pathlib.Path) -> set[pathlib.Path]:
    """The .onnx file and the external data files its initializers reference."""
    m = onnx.load(str(path), load_external_data=False)
    files = {path}
    tensors = list(m.graph.initializer)
    for f in m.functions:
        tensors += [a.t for n in f.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    tensors += [a.t for n in m.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        for e in t.external_data:
            if e.key == "location":
                files.add(path.parent / e.value)
    return files


def build(name: str, stats: dict, batches: np.ndarray, log) -> None:
    cfg = CONFIGS[name]
    if cfg["kind"] == "fp32":
        return
    src = {"plain": resolve("smollm2"), "past": resolve("smollm2-with-past")}
    for variant, dst in model_paths(name).items():
        if dst.exists() or (variant == "past" and not timed(name)):
            continue
        t0 = time.perf_counter()
        if cfg["kind"] == "peer":
            peer_quantize(src[variant], dst, cfg["block"], cfg["acc"])
        else:
            settings = Settings.parse(**dict(cfg["settings"]))
            # batches are only run where the settings need calibration (GPTQ Hessians)
            pipeline.optimize(src[variant], dst, settings, stats=stats, progress=False, batches=batches)
        log(f"built {name} [{variant}] in {time.perf_counter() - t0:.0f} s")


# ------------------------------------------------------------------------------------ timings

def prefill_time(path, ids: np.ndarray) -> float:
    sess = session(path, THREADS)
    feeds = make_feeds(sess, ids)
    sess.run(["logits"], feeds)  # warm-up
    t0 = time.perf_counter()
    sess.run(["logits"], feeds)
    return time.perf_counter() - t0


def decode(sess, first: int, steps: int, timed: bool = True) -> tuple[list[float], list[int]]:
    """Prompt of one token, then `steps` greedy steps with the KV cache; per-step seconds."""
    feeds = make_feeds(sess, np.array([[first]], dtype=np.int64))
    outputs = [o.name for o in sess.get_outputs()]
    present = [n for n in outputs if n.startswith("present")]
    past_names = [n.replace("present", "past_key_values") for n in present]
    out = dict(zip(outputs, sess.run(outputs, feeds)))
    times, tokens = [], []
    for step in range(steps):
        nxt = int(out["logits"][0, -1].argmax())
        tokens.append(nxt)
        past_len = step + 1
        feeds = {"input_ids": np.array([[nxt]], dtype=np.int64),
                 "attention_mask": np.ones((1, past_len + 1), dtype=np.int64)}
        if "position_ids" in {i.name for i in sess.get_inputs()}:
            feeds["position_ids"] = np.array([[past_len]], dtype=np.int64)
        feeds.update({p: out[c] for p, c in zip(past_names, present)})
        t0 = time.perf_counter()
        res = sess.run(outputs, feeds)
        times.append(time.perf_counter() - t0)
        out = dict(zip(outputs, res))
    return times, tokens


_DECODE_SRC = inspect.getsource(decode)  # read now: the file may change while a long run is going


def decode_time(path, first: int) -> tuple[float, list[int]]:
    sess = session(path, THREADS)
    decode(sess, first, 4)  # warm-up
    times, tokens = decode(sess, first, DECODE_STEPS)
    return statistics.median(times), tokens


RSS_CHILD = r"""
import sys, json, pathlib, time, numpy as np
sys.path.insert(0, {root!r})
from perq_onnx.runtime import session, make_feeds
{decode_src}
path, kind = {path!r}, {kind!r}
sess = session(path, {threads})
if kind == "plain":
    ids = np.random.default_rng(0).integers(0, 49152, size=(1, {seq}))
    sess.run(["logits"], make_feeds(sess, ids))
else:
    decode(sess, 504, 64)
for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        print(json.dumps(int(line.split()[1]) * 1024))
"""


def peak_rss(path, kind: str) -> int | None:
    code = RSS_CHILD.format(root=str(ROOT), path=str(path), kind=kind, threads=THREADS, seq=SEQ_LEN,
                            decode_src=_DECODE_SRC)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    if r.returncode != 0:
        print(r.stderr[-2000:])
        return None
    return int(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ report

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    mem = None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "nproc": os.cpu_count(), "ram_bytes": mem,
            "python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def goals(res: dict) -> list[str]:
    r = res["configs"]
    out = []

    def get(name, key):
        return r.get(name, {}).get(key)

    fp_pre, fp_dec, fp_bytes = get("fp32", "prefill_s"), get("fp32", "decode_s_per_token"), get("fp32", "bytes")
    pre, dec, by = get("perq-ort", "prefill_s"), get("perq-ort", "decode_s_per_token"), get("perq-ort", "bytes")
    if fp_dec and dec:
        s = fp_dec / dec
        out.append(f"decode >= 2x faster than fp32: {'MET' if s >= 2 else 'MISSED'} ({s:.2f}x: "
                   f"{1 / dec:.1f} vs {1 / fp_dec:.1f} tokens/s)")
    if fp_pre and pre:
        s = fp_pre / pre
        out.append(f"prefill >= 1.3x faster than fp32: {'MET' if s >= 1.3 else 'MISSED'} ({s:.2f}x: "
                   f"{pre * 1e3:.0f} vs {fp_pre * 1e3:.0f} ms)")
    if fp_bytes and by:
        s = by / fp_bytes
        out.append(f"file <= 0.3x fp32: {'MET' if s <= 0.3 else 'MISSED'} ({s:.3f}x: {by / 1e6:.1f} vs "
                   f"{fp_bytes / 1e6:.1f} MB)")
    p, q4, q0 = get("perq-ort", "ppl"), get("ortq-rtn-b32-acc4", "ppl"), get("ortq-rtn-b32-acc0", "ppl")
    if p and q4:
        out.append(f"ort ppl below onnxruntime's RTN at block 32: {'MET' if p < q4 else 'MISSED'} "
                   f"({p:.2f} vs {q4:.2f} at accuracy level 4" + (f", {q0:.2f} at level 0)" if q0 else ")"))
    d3, d0 = get("perq-ort", "decode_s_per_token"), get("perq-ort-noR3", "decode_s_per_token")
    p3, p0 = get("perq-ort", "prefill_s"), get("perq-ort-noR3", "prefill_s")
    if d3 and d0:
        c = d3 / d0 - 1
        extra = f"; prefill {p3 / p0 - 1:+.1%}" if p3 and p0 else ""
        out.append(f"R3 costs <= 3% of decode latency: {'MET' if c <= 0.03 else 'MISSED'} ({c:+.1%}: "
                   f"{d3 * 1e3:.2f} vs {d0 * 1e3:.2f} ms/token{extra})")
    t, w = get("perq-tensorrt", "ppl"), p
    if t and w:
        out.append(f"tensorrt ppl ~ ort weight-only: {'MET' if abs(t / w - 1) <= 0.05 else 'MISSED'} "
                   f"({t:.2f} vs {w:.2f}, {t / w - 1:+.1%}; onnxruntime CPU, TensorRT not installable here)")
    return out


def markdown(res: dict) -> str:
    if not res.get("configs"):  # a genai-only results file
        return "\n".join(["# Deployment benchmark: SmolLM2-135M (fp32 recipe)", *genai_markdown(res)]) + "\n"
    m = res["machine"]
    lines = ["# Deployment benchmark: SmolLM2-135M (fp32 recipe)", "",
             f"Machine: {m['platform']}, {m['cpu']}, nproc {m['nproc']}, RAM {m['ram_bytes'] / 2**30:.1f} GiB, "
             f"onnxruntime {m['onnxruntime']}, python {m['python']}; {m['date']}; load average at start "
             f"{m['load_average_at_start']:.1f} (shared machine).",
             f"ppl: WikiText-2 test, first {res['windows']} x {SEQ_LEN} windows (perq_onnx.runtime.session: each "
             "model's recorded session settings). Latency: median of "
             f"{res['runs']} round-robin rounds, {THREADS} intra-op threads; prefill = one 1 x {SEQ_LEN} forward "
             f"(plain export); decode = 1-token prompt then {res['decode_steps']} greedy steps with the KV cache "
             "(with-past export), median per-token time. Peak RSS: a fresh process that loads the model and "
             "runs it (prefill: one 512-token forward; decode: 64 steps). Ratios are to fp32 in the same run.", "",
             "| configuration | ppl | MB (x fp32) | prefill ms (x) | decode tok/s (x) | RSS prefill / decode MB "
             "| lm_head | embedding |",
             "|---|---|---|---|---|---|---|---|"]
    r = res["configs"]
    fp = r.get("fp32", {})
    for name, c in sorted(r.items(), key=lambda kv: list(CONFIGS).index(kv[0])):
        def ratio(key, inverse=False):
            a, b = c.get(key), fp.get(key)
            if not a or not b:
                return ""
            return f" ({(b / a if inverse else a / b):.2f}x)"
        dec = c.get("decode_s_per_token")
        rss = f"{fmt(c.get('rss_prefill') and c['rss_prefill'] / 1e6, '.0f')} / " \
              f"{fmt(c.get('rss_decode') and c['rss_decode'] / 1e6, '.0f')}"
        lines.append(f"| {name}: {CONFIGS[name]['label']} | {fmt(c.get('ppl'), '.2f')} | "
                     f"{fmt(c.get('bytes') and c['bytes'] / 1e6, '.1f')}{ratio('bytes')} | "
                     f"{fmt(c.get('prefill_s') and c['prefill_s'] * 1e3, '.0f')}{ratio('prefill_s')} | "
                     f"{fmt(dec and 1 / dec, '.1f')}{ratio('decode_s_per_token', True)} | {rss} | "
                     f"{c.get('lm_head', '')} | {c.get('embedding', '')} |")
    lines += ["", "Goals (perq-ort = `--target ort`, default rotations, weight blocks of 32):", ""]
    lines += [f"* {g}" for g in goals(res)]
    lines += ["", "Notes:", ""] + [f"* {n}" for n in res.get("notes", [])]
    lines += genai_markdown(res)
    return "\n".join(lines) + "\n"


NOTES = [
    "onnxruntime's MatMulNBitsQuantizer (RTN, symmetric) quantizes every MatMul with a constant weight, "
    "lm_head included, and leaves the embedding fp32; perq-onnx's ort target makes lm_head INT4 and the "
    "embedding INT8 (--float-embeddings keeps both float), which the file-size column reflects.",
    "The peer's accuracy level is a MatMulNBits attribute (4: int8 activations in the kernel, 0: float); "
    "perq-onnx's ort output records level 4 in its metadata, which perq_onnx.runtime.session applies.",
    "TensorRT is not installable here: the perq-tensorrt row is onnxruntime CPU running the TensorRT-form "
    "graph (DQ+MatMul fused to MatMulNBits at accuracy level 0).",
    "perq-simulate is the research form (INT4 activations as standard-op QDQ chains): not a deployment "
    "format; its latency shows the cost of simulating A4 with standard ops.",
]


# ------------------------------------------------------------- onnxruntime-genai folders

GENAI_CONFIGS = {
    "builder-fp32": dict(kind="builder", precision="fp32", label="builder fp32 (the reference)"),
    "builder-int4": dict(kind="builder", precision="int4", label="builder int4 (RTN, block 32: its default)"),
    "builder-int4-b64": dict(kind="builder", precision="int4", block=64, label="builder int4, RTN in blocks of 64"),
    "builder-int4-b128": dict(kind="builder", precision="int4", block=128, label="builder int4, RTN in blocks of 128"),
    "builder-k_quant": dict(kind="builder", precision="int4", algo="k_quant", label="builder int4 k_quant"),
    "builder-k_quant_mixed": dict(kind="builder", precision="int4", algo="k_quant_mixed",
                                  label="builder int4 k_quant_mixed (lm_head and sensitive layers int8)"),
    "perq-genai": dict(kind="perq", settings=dict(target="genai"),
                       label="perq-onnx --target genai (defaults: R1+R2, GPTQ, b64, acc 4, embedding tied)"),
    "perq-genai-b32": dict(kind="perq", settings=dict(target="genai", w_group=32),
                           label="perq-onnx --target genai --w-group 32 (the default before)"),
    "perq-genai-b128": dict(kind="perq", settings=dict(target="genai", w_group=128),
                            label="perq-onnx --target genai --w-group 128 (a ragged last block at 576)"),
    "perq-genai-acc0": dict(kind="acc0", of="perq-genai", label="the same, MatMulNBits accuracy level 0"),
    "perq-genai-R3": dict(kind="perq", settings=dict(target="genai", block=16),
                          label="perq-onnx --target genai --block 16 (R3 and P3 kept: the default before)"),
    "perq-genai-int4": dict(kind="perq", settings=dict(target="genai", embedding="int4"),
                            label="perq-onnx --target genai --embedding int4 (an INT4 table of its own)"),
    "perq-genai-int8": dict(kind="perq", settings=dict(target="genai", embedding="int8"),
                            label="perq-onnx --target genai --embedding int8"),
    "perq-genai-floatemb": dict(kind="perq", settings=dict(target="genai", float_embeddings=True),
                                label="perq-onnx --target genai --float-embeddings"),
    "perq-genai-kernel-int8": dict(kind="perq", settings=dict(target="genai", kernel="int8"),
                                   label="perq-onnx --target genai --kernel int8 (INT8 GEMMs; lm_head MatMulNBits)"),
    "perq-genai-int8-prompt": dict(kind="perq", settings=dict(target="genai", kernel="int8-prompt"),
                                   label="perq-onnx --target genai --kernel int8-prompt (prompts through the INT8 "
                                         "graph, tokens through MatMulNBits; one weight file)"),
}
GENAI_STEPS = 128


def genai_folder(name: str) -> pathlib.Path:
    return cache_root() / name


def build_genai(name: str, stats, batches, builder_python: str | None, log) -> bool:
    """Build the folder unless it exists; False when it cannot be built here (no builder venv)."""
    cfg, dst = GENAI_CONFIGS[name], genai_folder(name)
    if (dst / "genai_config.json").is_file():
        return True
    t0 = time.perf_counter()
    if cfg["kind"] == "builder":
        if not builder_python:
            log(f"{name}: skipped (give --builder-python: the model builder needs its own venv)")
            return False
        hf = resolve("smollm2").parent.parent / "hf"
        cmd = [builder_python, "-m", "onnxruntime_genai.models.builder", "-m", "HuggingFaceTB/SmolLM2-135M-Instruct",
               "-i", str(hf), "-o", str(dst), "-p", cfg["precision"], "-e", "cpu",
               "-c", str(cache_root() / "builder-cache")]
        extra = [f"{key}={cfg[name]}" for name, key in (("algo", "algo_config"), ("block", "block_size"))
                 if name in cfg]
        if extra:
            cmd += ["--extra_options", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            raise SystemExit(f"{name}: the model builder failed:\n{r.stderr[-3000:]}")
    elif cfg["kind"] == "acc0":
        src = genai_folder(cfg["of"])
        dst.mkdir(parents=True)
        m = onnx.load(str(src / "model.onnx"), load_external_data=False)
        for node in m.graph.node:
            for a in node.attribute:
                if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                    a.i = 0
        for f in src.iterdir():
            if f.name != "model.onnx":
                os.link(f, dst / f.name)
        onnx.save(m, str(dst / "model.onnx"))
    else:
        settings = Settings.parse(**dict(cfg["settings"]))
        pipeline.optimize(resolve("smollm2"), dst / "model.onnx", settings, stats=stats, progress=False,
                          batches=batches)
    log(f"built {name} in {time.perf_counter() - t0:.0f} s")
    return True


def shuffled(names, round_: int) -> list[str]:
    """The configurations in this round's order: shuffled with the round as seed (a fixed order
    showed ~10% position effects between folders in og.Generator here)."""
    order = list(names)
    random.Random(round_).shuffle(order)
    return order


def reusable_ppl(record: dict, model_mtime_ns: int) -> bool:
    """A previous run's ppl stands only for the very model file it measured (a rebuilt model,
    e.g. by a newer perq-onnx, is measured again)."""
    return record.get("ppl") is not None and record.get("model_mtime_ns") == model_mtime_ns


def folder_bytes(folder: pathlib.Path) -> int:
    """The folder's model: model.onnx (and a two-graph folder's prompt graph) and the external
    data files they reference."""
    graphs = [g for g in (folder / "model.onnx", prompt_path(folder / "model.onnx")) if g.is_file()]
    return sum(f.stat().st_size for f in set().union(*map(model_files, graphs)))


OG_RSS_CHILD = r"""
import json, pathlib, numpy as np, onnxruntime_genai as og
model = og.Model({folder!r})
params = og.GeneratorParams(model)
params.set_search_options(max_length={seq} + 33, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(np.asarray({ids!r}, np.int32))
for _ in range(32):
    gen.generate_next_token()
for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        print(json.dumps(int(line.split()[1]) * 1024))
"""


def og_peak_rss(folder: pathlib.Path, ids: np.ndarray) -> int | None:
    """VmHWM of a fresh process that loads the folder in onnxruntime-genai, appends the prompt and
    generates 32 tokens."""
    code = OG_RSS_CHILD.format(folder=str(folder), seq=ids.shape[1], ids=ids[0].tolist())
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-2000:])
        return None
    return int(r.stdout.strip().splitlines()[-1])


def og_seconds(model, ids: np.ndarray, steps: int) -> tuple[float, list[float]]:
    """(prompt seconds, per-token decode seconds) in a fresh og.Generator."""
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


def genai_goals(r: dict, name: str = "perq-genai") -> list[str]:
    out = []
    p, fp, b4 = r.get(name, {}), r.get("builder-fp32", {}), r.get("builder-int4", {})
    if p.get("og_prompt_s") and fp.get("og_prompt_s") and b4.get("og_prompt_s"):
        x, xb = fp["og_prompt_s"] / p["og_prompt_s"], fp["og_prompt_s"] / b4["og_prompt_s"]
        ok = x >= 1.5 and p["og_prompt_s"] <= b4["og_prompt_s"]
        out.append(f"prompt >= 1.5x fp32 and at least the builder's int4: {'MET' if ok else 'MISSED'} "
                   f"({x:.2f}x fp32; builder int4 {xb:.2f}x)")
    if p.get("og_decode_s") and b4.get("og_decode_s"):
        ok = p["og_decode_s"] <= b4["og_decode_s"]
        out.append(f"decode at least the builder's int4: {'MET' if ok else 'MISSED'} "
                   f"({1 / p['og_decode_s']:.1f} vs {1 / b4['og_decode_s']:.1f} tokens/s)")
    km = r.get("builder-k_quant_mixed", {})
    if p.get("bytes") and km.get("bytes"):
        out.append(f"weights no larger than the builder's k_quant_mixed: {'MET' if p['bytes'] <= km['bytes'] else 'MISSED'} "
                   f"({p['bytes'] / 1e6:.1f} vs {km['bytes'] / 1e6:.1f} MB)")
    builders = {n: c["ppl"] for n, c in r.items() if n.startswith("builder-") and n != "builder-fp32" and c.get("ppl")}
    if p.get("ppl") and builders:
        best = min(builders, key=builders.get)
        out.append(f"ppl below every builder int4 variant: {'MET' if p['ppl'] < builders[best] else 'MISSED'} "
                   f"({p['ppl']:.2f}; best builder {best} {builders[best]:.2f})")
    return out


def genai_markdown(res: dict) -> list[str]:
    g = res.get("genai")
    if not g:
        return []
    r, fp = g["configs"], g["configs"].get("builder-fp32", {})

    def ratio(c, key):
        return f" ({fp[key] / c[key]:.2f}x)" if c.get(key) and fp.get(key) else ""

    lines = ["", "## onnxruntime-genai folders in og.Generator", "",
             f"{g['machine']['date']}, load average {g['machine']['load_average_at_start']:.1f} at start, "
             f"{g['machine'].get('load_average_at_end') or 0:.1f} at end; onnxruntime-genai {g['onnxruntime_genai']}. "
             f"ppl: the same {res['windows']} x {SEQ_LEN} test windows. og prompt: {SEQ_LEN} test tokens appended to a "
             f"fresh Generator; og decode: then {g['steps']} tokens, median per token; median of {g['runs']} "
             "interleaved rounds; ratios (speed-up) to the builder's fp32 folder in the same run.", "",
             "og peak RSS: a fresh process loading the folder in onnxruntime-genai, a 512-token prompt and 32 tokens.", "",
             "| folder | ppl | MB (x fp32) | og prompt ms (x) | og decode tok/s (x) | og peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for name, c in sorted(r.items(), key=lambda kv: list(GENAI_CONFIGS).index(kv[0])):
        size = f"{c['bytes'] / 1e6:.1f}" + (f" ({c['bytes'] / fp['bytes']:.2f}x)" if fp.get("bytes") else "")
        ppl = fmt(c.get('ppl'), '.2f') + (f" (prompt graph {c['ppl_prompt_graph']:.2f})" if c.get("ppl_prompt_graph") else "")
        lines.append(f"| {name}: {GENAI_CONFIGS[name]['label']} | {ppl} | {size} | "
                     f"{fmt(c.get('og_prompt_s') and c['og_prompt_s'] * 1e3, '.0f')}{ratio(c, 'og_prompt_s')} | "
                     f"{fmt(c.get('og_decode_s') and 1 / c['og_decode_s'], '.1f')}{ratio(c, 'og_decode_s')} | "
                     f"{fmt(c.get('og_peak_rss') and c['og_peak_rss'] / 2**20, '.0f')} |")
    for name in ("perq-genai", "perq-genai-kernel-int8", "perq-genai-int8-prompt"):
        if name in r:
            lines += ["", f"Goals ({name} against the builder):", ""] + [f"* {x}" for x in genai_goals(r, name)]
    return lines


def genai_part(args, res: dict, prev: dict, test: np.ndarray, valid: np.ndarray, stats_of, log, save) -> None:
    import onnxruntime_genai as og
    names = list(GENAI_CONFIGS) if not args.only else [n for n in args.only if n in GENAI_CONFIGS]
    if "builder-fp32" not in names:
        names = ["builder-fp32"] + names
    need = [n for n in names if GENAI_CONFIGS[n]["kind"] == "perq" and not (genai_folder(n) / "genai_config.json").is_file()]
    if "perq-genai-acc0" in names and "perq-genai" not in names:
        names.insert(names.index("perq-genai-acc0"), "perq-genai")
    stats = stats_of() if need else None
    names = [n for n in names if build_genai(n, stats, valid, args.builder_python, log)]
    old = prev.get("genai", {}).get("configs", {}) if prev.get("windows") == len(test) else {}
    g = res["genai"] = {"machine": machine(), "runs": args.runs, "steps": args.genai_steps,
                        "onnxruntime_genai": og.__version__, "configs": {}}
    for n in names:
        c = g["configs"][n] = {"folder": str(genai_folder(n)), "bytes": folder_bytes(genai_folder(n)),
                               "model_mtime_ns": (genai_folder(n) / "model.onnx").stat().st_mtime_ns}
        if reusable_ppl(old.get(n, {}), c["model_mtime_ns"]):
            c["ppl"] = old[n]["ppl"]
            if old[n].get("ppl_prompt_graph"):
                c["ppl_prompt_graph"] = old[n]["ppl_prompt_graph"]
        else:
            p = perplexity(genai_folder(n) / "model.onnx", test, threads=THREADS, progress=False)
            c["ppl"] = p.ppl
            log(f"{n}: ppl {p.ppl:.3f} ({p.seconds:.0f} s), {c['bytes'] / 1e6:.1f} MB")
            prompt_graph = prompt_path(genai_folder(n) / "model.onnx")
            if prompt_graph.is_file():
                c["ppl_prompt_graph"] = perplexity(prompt_graph, test, threads=THREADS, progress=False).ppl
                log(f"{n}: its prompt graph's ppl {c['ppl_prompt_graph']:.3f}")
        if not args.no_latency:
            c["og_peak_rss"] = og_peak_rss(genai_folder(n), test[0][None, :SEQ_LEN])
        save()
    if args.no_latency:
        return
    ids = test[0][None, :SEQ_LEN]
    raw = {n: {"prompt": [], "decode": []} for n in names}
    for r in range(args.runs):
        for n in shuffled(names, r):
            model = og.Model(str(genai_folder(n)))  # afresh each round (see the module docstring)
            og_seconds(model, ids[:, :16], 4)  # warm-up
            prompt, steps = og_seconds(model, ids, args.genai_steps)
            del model
            raw[n]["prompt"].append(prompt)
            raw[n]["decode"].append(statistics.median(steps))
            c = g["configs"][n]
            c.update(og_prompt_samples_s=raw[n]["prompt"], og_decode_samples_s=raw[n]["decode"],
                     og_prompt_s=statistics.median(raw[n]["prompt"]), og_decode_s=statistics.median(raw[n]["decode"]))
            log(f"round {r + 1}/{args.runs} {n}: og prompt {prompt * 1e3:.0f} ms, decode {raw[n]['decode'][-1] * 1e3:.2f} ms/token")
        save()
    g["machine"]["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def ort_part(args, names: list[str], res: dict, prev: dict, test, valid, stats_of, log, save) -> None:
    """Build, evaluate and time the plain-session configurations (CONFIGS)."""
    for n in names:
        if CONFIGS[n]["kind"] != "fp32" and (not model_paths(n)["plain"].exists()
                                             or timed(n) and not model_paths(n)["past"].exists()):
            build(n, stats_of() if CONFIGS[n]["kind"] == "perq" else None, valid, log)
    old = prev.get("configs", {}) if prev.get("windows") == len(test) else {}
    # ppl, size, structure: per configuration (kept from a previous run with the same windows)
    for n in names:
        paths = model_paths(n)
        c = res["configs"].setdefault(n, {k: v for k, v in old.get(n, {}).items() if k != "not_timed_in_this_run"})
        c.update({"plain": str(paths["plain"]), "past": str(paths["past"]), "bytes": file_bytes(paths["plain"]),
                  **({"bytes_past": file_bytes(paths["past"])} if paths["past"].exists() else {}),
                  **lm_head_quantized(paths["plain"])})
        mtime = paths["plain"].stat().st_mtime_ns
        reuse = reusable_ppl(old.get(n, {}), mtime)  # (c may be old's own record: check first)
        c["model_mtime_ns"] = mtime
        if reuse:
            c["ppl"] = old[n]["ppl"]
            log(f"{n}: ppl {c['ppl']:.3f} (from the previous run)")
        else:
            p = perplexity(paths["plain"], test, threads=THREADS, progress=False)
            c["ppl"] = p.ppl
            log(f"{n}: ppl {p.ppl:.3f} ({p.seconds:.0f} s)")
        save()
    # keep other configurations' ppl from the previous file (for --only runs)
    for n, c in old.items():
        if n not in res["configs"]:
            res["configs"][n] = dict(c)
            if not args.no_latency:
                res["configs"][n]["not_timed_in_this_run"] = True
    save()

    if not args.no_rss:
        for n in names:
            c = res["configs"][n]
            paths = model_paths(n)
            c["rss_prefill"] = peak_rss(paths["plain"], "plain")
            c["rss_decode"] = peak_rss(paths["past"], "past") if timed(n) else None
            log(f"{n}: peak RSS prefill {fmt(c['rss_prefill'] and c['rss_prefill'] / 1e6, '.0f')} MB, "
                f"decode {fmt(c['rss_decode'] and c['rss_decode'] / 1e6, '.0f')} MB")
            save()

    if not args.no_latency:
        ids = test[0][None, :SEQ_LEN]
        first = int(test[0][0])
        samples = {n: {"prefill": [], "decode": []} for n in names if timed(n)}
        for r in range(args.runs):
            for n in shuffled(samples, r):
                paths = model_paths(n)
                samples[n]["prefill"].append(prefill_time(paths["plain"], ids))
                d, tokens = decode_time(paths["past"], first)
                samples[n]["decode"].append(d)
                c = res["configs"][n]
                c["prefill_samples_s"] = samples[n]["prefill"]
                c["decode_samples_s_per_token"] = samples[n]["decode"]
                c["prefill_s"] = statistics.median(samples[n]["prefill"])
                c["decode_s_per_token"] = statistics.median(samples[n]["decode"])
                c["decode_tokens_first16"] = tokens[:16]
                log(f"round {r + 1}/{args.runs} {n}: prefill {samples[n]['prefill'][-1] * 1e3:.0f} ms, "
                    f"decode {d * 1e3:.2f} ms/token")
            save()


def main(argv=None) -> int:
    global DECODE_STEPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("ort", "genai", "all"), default="all",
                    help="plain-session configurations, onnxruntime-genai folders, or both (default)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default=None, help="comma-separated configuration names (fp32 / builder-fp32 are always timed)")
    ap.add_argument("--no-latency", action="store_true", help="build and evaluate ppl/size only")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--decode-steps", type=int, default=DECODE_STEPS, help=f"decode steps per run (default {DECODE_STEPS})")
    ap.add_argument("--genai-steps", type=int, default=GENAI_STEPS, help=f"og decode steps per round (default {GENAI_STEPS})")
    ap.add_argument("--builder-python", default=os.environ.get("PERQ_BUILDER_PYTHON"),
                    help="python of a venv with onnxruntime-genai's model builder (transformers 5); "
                         "default $PERQ_BUILDER_PYTHON; without it the builder rows are skipped")
    ap.add_argument("--out", default=str(RESULTS / "deploy"), help="output stem (default results/deploy)")
    args = ap.parse_args(argv)
    DECODE_STEPS = args.decode_steps
    args.only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    for n in args.only or []:
        if n not in CONFIGS and n not in GENAI_CONFIGS:
            ap.error(f"--only {n}: choose from {', '.join([*CONFIGS, *GENAI_CONFIGS])}")
    names = DEFAULT if not args.only else [n for n in args.only if n in CONFIGS]
    if "fp32" not in names:
        names = ["fp32"] + names
    out_json, out_md = pathlib.Path(args.out + ".json"), pathlib.Path(args.out + ".md")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(out_json.read_text()) if out_json.exists() else {}
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f} s, load {os.getloadavg()[0]:.1f}] {msg}", flush=True)

    plain = resolve("smollm2")
    resolve("smollm2-with-past")
    tok = calibration.load_tokenizer(plain.parent)
    test = calibration.windows(calibration.tokenize_file(DATA / "test.txt", tok), SEQ_LEN, args.windows, "test.txt")
    valid = calibration.windows(calibration.tokenize_file(DATA / "valid.txt", tok), 512, 32, "valid.txt")
    stats = {}

    def stats_of() -> dict:
        """One calibration (valid 32 x 512) for every perq build, cached."""
        if not stats:
            stats_file = cache_root() / "stats.npz"
            if stats_file.exists():
                stats.update(np.load(stats_file))
            else:
                log("calibrating (pipeline.calibrate on the plain export, valid 32 x 512) ...")
                stats.update(pipeline.calibrate(plain, valid, threads=THREADS, progress=False))
                stats_file.parent.mkdir(parents=True, exist_ok=True)
                np.savez(stats_file, **stats)
        return stats

    res = {"machine": machine(), "windows": len(test), "runs": args.runs, "seq_len": SEQ_LEN,
           "decode_steps": DECODE_STEPS, "threads": THREADS, "configs": {}, "notes": NOTES}
    same = prev.get("windows") == len(test)
    if same and (args.no_latency or args.part == "genai"):
        # a run that does not time the plain-session part keeps that part's record
        res.update({k: prev[k] for k in ("runs", "decode_steps", "machine", "configs") if k in prev})
    if same and args.part == "ort" and "genai" in prev:
        res["genai"] = prev["genai"]

    def save():
        out_json.write_text(json.dumps(res, indent=1))
        out_md.write_text(markdown(res))

    if args.part in ("ort", "all"):
        ort_part(args, names, res, prev, test, valid, stats_of, log, save)
    if args.part in ("genai", "all"):
        genai_part(args, res, prev, test, valid, stats_of, log, save)
    res["seconds"] = time.perf_counter() - start
    res["machine"]["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    save()
    print(out_md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
