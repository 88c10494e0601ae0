"""Latency of the perq custom-op library against the standard-op function bodies.

    python benchmarks/ops.py                      # op table -> benchmarks/results/ops.md, ops.json
    python benchmarks/ops.py --provider cuda --quantizer nvfp4   # GPU -> ops_cuda_nvfp4.md, .json
    python benchmarks/ops.py --model A.onnx --seq-len 512    # end-to-end, with and without the library

Op table: BlockHadamard alone and the fused BlockHadamardQuantize (``--quantizer int``, default)
or BlockHadamardQuantizeFP4 (``--quantizer nvfp4`` / ``mxfp4``), each as the one-node model of
perq_onnx.functions.single_op_model, run by onnxruntime's CPU execution provider (intra-op threads
2 by default) with the library registered (the C++ kernel) and without it (onnxruntime runs the
model-local function: Reshape, MatMul with H_b, Reshape, then the ReduceMin/Max ... Quantize/
DequantizeLinear chain). Each timing is the median of --repeats runs after warm-up runs, the runs
with and without the library alternating; inputs and the output buffer are bound once
(IOBinding) so that no copy is timed. ``--provider cuda``: the CUDA execution provider, inputs and
outputs bound in GPU memory (onnxruntime synchronises the GPU at the end of each run).

--model: the median latency of one forward pass of a PeRQ model (with BlockHadamard /
BlockHadamardQuantize nodes) on random input_ids of --seq-len tokens (attention_mask of ones and
position_ids 0..n-1 when the model takes them; empty past key/values when it has them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perq_onnx import __version__, ops  # noqa: E402
from perq_onnx.functions import (BLOCK_HADAMARD, BLOCK_HADAMARD_QUANTIZE, BLOCK_HADAMARD_QUANTIZE_FP4,  # noqa: E402
                                 single_op_model)
from perq_onnx.errors import PerqError  # noqa: E402
from perq_onnx.runtime import make_feeds  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "perq_onnx": __version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False).stdout.strip().splitlines()
        if gpu:
            info["gpu"] = gpu[0].replace(", ", ", driver ")
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    return info


def session_options(threads: int, with_library: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The two sessions' runs alternate: idle pool threads must not spin on the CPUs the other
    # session is running on.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ops.session_options(so) if with_library else so


PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def bind(sess: ort.InferenceSession, feeds: dict, out_buffers=None):
    """IOBinding with inputs bound once; outputs go to out_buffers (name -> preallocated array or
    OrtValue) where given, else to buffers onnxruntime allocates."""
    binding = sess.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, value)
    out_buffers = out_buffers or {}
    for out in sess.get_outputs():
        y = out_buffers.get(out.name)
        if isinstance(y, ort.OrtValue):
            binding.bind_ortvalue_output(out.name, y)
        elif y is not None:
            binding.bind_output(out.name, "cpu", 0, y.dtype, list(y.shape), y.ctypes.data)
        else:
            binding.bind_output(out.name, "cpu")
    return binding


def quantized_op(args) -> tuple[str, dict]:
    """The fused op the table times besides BlockHadamard, with its attributes."""
    if args.quantizer == "int":
        return BLOCK_HADAMARD_QUANTIZE, dict(bits=args.bits, symmetric=int(args.symmetric))
    attrs = {"format": args.quantizer}
    if args.quantizer == "nvfp4":
        attrs["tensor_scale"] = 1.0 / 448  # calibration's amax / (6 * 448) for activations of amax 6
    return BLOCK_HADAMARD_QUANTIZE_FP4, attrs


def time_interleaved(runs: dict, repeats: int, warmup: int) -> dict:
    """runs: name -> (session, binding, ...). Times (ms) of each, the runs alternating so that a
    change of machine load hits both alike."""
    for sess, binding, *_ in runs.values():
        for _ in range(warmup):
            sess.run_with_iobinding(binding)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (sess, binding, *_) in runs.items():
            t0 = time.perf_counter()
            sess.run_with_iobinding(binding)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def bench_ops(args) -> dict:
    rows = []
    rng = np.random.default_rng(0)
    quant_op, quant_attrs = quantized_op(args)
    for channels in args.channels:
        for tokens in args.tokens:
            x = rng.standard_normal((1, tokens, channels)).astype(np.float32)
            y = np.empty_like(x)
            if args.provider == "cuda":
                x, y = (ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in (x, y))
            for block in args.blocks:
                for op_type, attrs in ((BLOCK_HADAMARD, {}), (quant_op, quant_attrs)):
                    model = single_op_model(op_type, channels, block_size=block, **attrs).SerializeToString()
                    result = {"op": op_type, "block_size": block, "shape": [1, tokens, channels], **attrs}
                    runs = {}
                    for key, with_lib in (("library", True), ("function_body", False)):
                        sess = ort.InferenceSession(model, session_options(args.threads, with_lib),
                                                    providers=PROVIDERS[args.provider])
                        runs[key] = (sess, bind(sess, {"X": x}, {"Y": y}))
                    for key, times in time_interleaved(runs, args.repeats, args.warmup).items():
                        result[f"{key}_ms"] = round(statistics.median(times), 3)
                        result[f"{key}_min_ms"] = round(min(times), 3)
                    del runs
                    result["speedup"] = round(result["function_body_ms"] / result["library_ms"], 2)
                    rows.append(result)
                    print(f"{op_type:22s} b={block:<4d} [1, {tokens}, {channels}]  library {result['library_ms']:8.2f} ms"
                          f"  function body {result['function_body_ms']:8.2f} ms  x{result['speedup']:.1f}", flush=True)
    return {"machine": machine(), "provider": args.provider, "threads": args.threads, "repeats": args.repeats,
            "warmup": args.warmup, "quantizer": args.quantizer, "quantize": quant_attrs, "results": rows}


def report_name(report: dict) -> str:
    """ops (the CPU INT table, as before), else ops_<provider>[_<quantizer>]."""
    parts = ["ops"] + ([report["provider"]] if report["provider"] != "cpu" else [])
    return "_".join(parts + ([report["quantizer"]] if report["quantizer"] != "int" else []))


def write_ops_report(report: dict, out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report_name(report)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    q = report["quantize"]
    quant_op = BLOCK_HADAMARD_QUANTIZE if report["quantizer"] == "int" else BLOCK_HADAMARD_QUANTIZE_FP4
    cuda = report["provider"] == "cuda"
    command = "python benchmarks/ops.py" + (" --provider cuda" if cuda else "") + \
        (f" --quantizer {report['quantizer']}" if report["quantizer"] != "int" else "")
    lines = [
        f"# perq custom-op library: {'GPU' if cuda else 'CPU'} latency",
        "",
        f"Generated by `{command}`. onnxruntime "
        + ("CUDA execution provider (GPU: " + m.get("gpu", "?") + "), input and output in GPU memory, "
           if cuda else f"CPU execution provider, intra-op threads = {report['threads']}, ")
        + f"median of {report['repeats']} runs after {report['warmup']} "
        "warm-up runs (library and function-body runs alternating; thread-pool spinning off), inputs and "
        "output bound once (IOBinding). *library*: the C++ kernel "
        "(`perq_onnx.ops`); *function body*: the same one-node model without the library, i.e. the "
        "model-local function of standard ops that onnxruntime runs otherwise. "
        f"{quant_op} with " + ", ".join(f"{k}={v}" for k, v in q.items()) + ". float32.",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['os']}; Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}, perq-onnx {m['perq_onnx']}"
        f" ({m['commit']}); {m['date']}."
        + (f" 1-minute load average at start: {m['load_average_1min_at_start']} (shared machine: timings are noisy)."
           if "load_average_1min_at_start" in m else ""),
        "",
        "| op | b | shape [1, T, C] | library ms | function body ms | speedup |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        shape = "[" + ", ".join(str(d) for d in r["shape"]) + "]"
        lines.append(f"| {r['op']} | {r['block_size']} | {shape} | {r['library_ms']:.2f} | "
                     f"{r['function_body_ms']:.2f} | {r['speedup']:.1f}x |")
    fused = [r["speedup"] for r in report["results"] if r["op"] == quant_op]
    alone = [r["speedup"] for r in report["results"] if r["op"] == BLOCK_HADAMARD]
    if fused and alone:
        lines += ["", f"Speedup, {quant_op}: min {min(fused):.1f}x, median {statistics.median(fused):.1f}x; "
                      f"BlockHadamard: min {min(alone):.1f}x, median {statistics.median(alone):.1f}x."]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return out_dir / f"{name}.md"


# --------------------------------------------------------------------------------------------
# end-to-end model latency

def model_feeds(sess: ort.InferenceSession, seq_len: int, vocab: int, batch: int, seed: int) -> dict:
    """Random token ids with the feeds perq-onnx itself uses (mask, positions, empty cache)."""
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq_len))
    try:
        return make_feeds(sess, ids)
    except PerqError as exc:
        raise SystemExit(str(exc))


def count_perq_nodes(path: pathlib.Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    counts = {}
    for node in model.graph.node:
        if node.domain == "perq":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def bench_model(args) -> dict:
    path = pathlib.Path(args.model)
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    result = {"model": str(path), "perq_nodes": count_perq_nodes(path), "seq_len": args.seq_len,
              "batch": args.batch, "threads": args.threads, "repeats": args.repeats, "machine": machine()}
    runs = {}
    for key, with_lib in (("library", True), ("function_body", False)):
        sess = ort.InferenceSession(str(path), session_options(args.threads, with_lib),
                                    providers=["CPUExecutionProvider"])
        feeds = model_feeds(sess, args.seq_len, args.vocab, args.batch, seed=0)
        runs[key] = (sess, bind(sess, feeds), feeds)  # feeds kept alive while bound
    if args.baseline:  # the same model without the online rotation: R3's share of the latency
        sess = ort.InferenceSession(str(args.baseline), session_options(args.threads, False),
                                    providers=["CPUExecutionProvider"])
        feeds = model_feeds(sess, args.seq_len, args.vocab, args.batch, seed=0)
        runs["baseline"] = (sess, bind(sess, feeds), feeds)
        result["baseline"] = str(args.baseline)
    for key, times in time_interleaved(runs, args.repeats, args.warmup).items():
        result[f"{key}_ms"] = round(statistics.median(times), 2)
        result[f"{key}_min_ms"] = round(min(times), 2)
    del runs
    result["speedup"] = round(result["function_body_ms"] / result["library_ms"], 3)
    if args.baseline:
        for key in ("library", "function_body"):
            result[f"r3_overhead_{key}"] = round(result[f"{key}_ms"] / result["baseline_ms"] - 1, 4)
        print(f"baseline without R3: {result['baseline_ms']:.2f} ms; R3 overhead: "
              f"{result['r3_overhead_library']:+.1%} with the library, "
              f"{result['r3_overhead_function_body']:+.1%} with the function body")
    print(f"| model | perq nodes | seq len | library ms | function body ms | speedup |\n"
          f"| --- | --- | ---: | ---: | ---: | ---: |\n"
          f"| {path.name} | {result['perq_nodes']} | {args.seq_len} | {result['library_ms']:.2f} | "
          f"{result['function_body_ms']:.2f} | {result['speedup']:.2f}x |")
    if args.output:
        out = pathlib.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per case (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--channels", type=int, nargs="+", default=[1536, 8192])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--symmetric", action="store_true", help="symmetric quantization (default asymmetric)")
    p.add_argument("--quantizer", choices=["int", "nvfp4", "mxfp4"], default="int",
                   help="the fused op timed besides BlockHadamard: BlockHadamardQuantize (int, --bits, "
                        "--symmetric) or BlockHadamardQuantizeFP4 in that format")
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu",
                   help="onnxruntime execution provider (cuda: needs onnxruntime-gpu and a library built with nvcc)")
    p.add_argument("--out-dir", default=str(RESULTS), help="where the table (.md) and its .json go")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--model", help="end-to-end: a PeRQ ONNX model to time with and without the library")
    p.add_argument("--baseline", help="--model: the same model without the online rotation (--block none), "
                                       "to measure R3's overhead")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=1000, help="input_ids drawn from [0, vocab)")
    p.add_argument("--output", help="--model: also write the result as JSON here")
    p.add_argument("--build", action="store_true", help="build the op library first")
    args = p.parse_args(argv)
    if args.build:
        ops.build_library(verbose=True)
    ops.library_path()  # fail early, with the hint to build
    if args.model:
        bench_model(args)
        return
    if args.provider == "cuda" and ("CUDAExecutionProvider" not in ort.get_available_providers()
                                    or not ops.cuda_available()):
        raise SystemExit("--provider cuda needs onnxruntime's CUDA execution provider and an op library with "
                         "CUDA kernels (built where nvcc is found)")
    report = bench_ops(args)
    if not args.no_write:
        path = write_ops_report(report, pathlib.Path(args.out_dir))
        print(f"wrote {path} and its .json")


if __name__ == "__main__":
    try:
        main()
    except ops.PerqError as exc:
        raise SystemExit(f"error: {exc}")
