"""Weight-only INT4 quality of SmolLM2-135M at settings its GGUF grid cannot fool (issue 21).

    python benchmarks/weight_only.py                          # everything (resumable)
    nohup python benchmarks/weight_only.py > weight_only.log 2>&1 &
    python benchmarks/weight_only.py --windows 2 --only fp32,perq-rtn-norot@pc --out /tmp/wo  # quick try
    python benchmarks/weight_only.py --only b64,perq-gptq-rot  # granularities, methods or rows
    python benchmarks/weight_only.py --report-only            # re-render .md and .png from the json
    python benchmarks/weight_only.py --valid --windows 16     # the screen on held-out valid windows 32-47
    PERQ_SRC=/tmp/snap python benchmarks/weight_only.py       # import perq_onnx from a snapshot of a
        # commit (perq_onnx/ with passes/ and models/ inside it) while others edit this tree

SmolLM2's float weights are a dequantized Q4_1 GGUF: they lie on asymmetric 16-level grids of 32
input rows, so an asymmetric block-32 quantizer recovers them almost exactly. The run measures
that (perq_onnx/weight_grid.py) and compares at per output channel, block 128 and block 64 only.

Protocol: WikiText-2 test, 32 non-overlapping 512-token windows starting at window index 32
(windows 32-63; earlier benchmarks read 0-31, on which no default was tuned here); perq's
statistics and Hessians from valid 32 x 512, one calibration shared by every perq row. Only the
210 decoder linears are quantized; lm_head and the embedding stay float in every row. Every model
is evaluated with one session setup: 2 intra-op threads and the session config
session.qdq_matmulnbits_accuracy_level = 0 (DequantizeLinear + MatMul fused to MatMulNBits
computes in fp32, as the peers at accuracy level 0); a tiny model checks that this key works.

Rows: fp32; onnxruntime's MatMulNBitsQuantizer (benchmarks/peers.py) at blocks 64/128: RTN
symmetric, RTN asymmetric, HQQ; perq-onnx --target simulate --a-bits 16 (INT4 weights as
DequantizeLinear -> MatMul): RTN and GPTQ, each without and with the default rotations, and
asymmetric GPTQ without and with rotations, at every granularity; all with --w-clip act.

Models are cached under $PERQ_CACHE/weight_only (default ~/.cache/perq-onnx/weight_only);
results are appended to benchmarks/results/weight_only.json as rows finish (rows already there
for the same windows are not re-run); weight_only.md and weight_only.png are rendered from it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = pathlib.Path(os.environ.get("PERQ_SRC") or ROOT)
sys.path[:0] = [str(SRC)] + ([str(ROOT)] if SRC != ROOT else [])

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from tqdm import tqdm  # noqa: E402

import perq_onnx  # noqa: E402
from perq_onnx import calibration, pipeline  # noqa: E402
from perq_onnx.errors import PerqError  # noqa: E402
from perq_onnx.evaluate import perplexity  # noqa: E402
from perq_onnx.models import resolve  # noqa: E402
from perq_onnx.runtime import session  # noqa: E402
from perq_onnx.settings import Settings  # noqa: E402

from benchmarks.peers import peer_quantize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
THREADS, SEQ_LEN, FIRST_WINDOW, CALIB_WINDOWS = 2, 512, 32, 32
ACC0 = {"session.qdq_matmulnbits_accuracy_level": "0"}
DECODER_LINEARS = 210  # 30 layers x q, k, v, o, gate, up, down

GRANULARITIES = {"pc": (None, "per channel"), "b128": (128, "block 128"), "b64": (64, "block 64")}
RUN_ORDER = ("pc", "b64", "b128")  # block 128 needs ragged blocks (K = 576) last; asymmetric perq rows after all
NO_ROTATION = dict(residual_rotation="none", head_rotation=False, block="none", permute="none")
ROTATIONS = dict(residual_rotation="full", head_rotation=True)  # forced ("auto": rotation_choice.py decides)
ONLINE_R1 = dict(residual_rotation="online", head_rotation=True)  # the default since 2026-12-04 (pipeline.py)
PERQ_COMMON = dict(target="simulate", a_bits=16, w_bits=4, w_clip="act", threads=THREADS)
METHODS = {
    "ort-rtn-sym": dict(peer="rtn-sym", label="onnxruntime RTN, symmetric"),
    "ort-rtn-asym": dict(peer="rtn-asym", label="onnxruntime RTN, asymmetric"),
    "ort-hqq": dict(peer="hqq", label="onnxruntime HQQ (asymmetric, float zero points)"),
    "perq-rtn-norot": dict(settings=dict(rounding="rtn", **NO_ROTATION), label="perq RTN, no rotations"),
    "perq-rtn-rot": dict(settings=dict(rounding="rtn", **ROTATIONS), label="perq RTN, rotations"),
    "perq-rtn-auto": dict(settings=dict(rounding="rtn"), label="perq RTN, the rotations its planner keeps"),
    "perq-rtn-r2": dict(settings=dict(rounding="rtn", **dict(NO_ROTATION, head_rotation=True)),
                        label="perq RTN, R2 alone (what the planner kept at blocks before its keep margin)"),
    "perq-gptq-norot": dict(settings=dict(rounding="gptq", **NO_ROTATION), label="perq GPTQ, no rotations"),
    "perq-gptq-rot": dict(settings=dict(rounding="gptq", **ROTATIONS),
                          label="perq GPTQ, rotations with the folded R1 (the default before 2026-12-04)"),
    "perq-gptq-online": dict(settings=dict(rounding="gptq", **ONLINE_R1),
                             label="**perq default: rotations (online R1) + GPTQ**"),
    "perq-gptq-asym-norot": dict(settings=dict(rounding="gptq", w_symmetric=False, **NO_ROTATION),
                                 label="perq GPTQ asymmetric, no rotations"),
    "perq-gptq-asym-rot": dict(settings=dict(rounding="gptq", w_symmetric=False, **ROTATIONS),
                               label="perq GPTQ asymmetric, rotations"),
}


def config_names() -> list[str]:
    """fp32, then every method at each granularity (per channel first; no per-channel peer:
    MatMulNBits is blockwise)."""
    names = [f"{m}@{g}" for g in RUN_ORDER for m, spec in METHODS.items()
             if not ("peer" in spec and GRANULARITIES[g][0] is None)]
    # stable: perq RTN rows at blocks after the GPTQ and peer rows (the first goal first), asymmetric perq last
    return ["fp32"] + sorted(names, key=lambda n: (n.startswith("perq-gptq-asym"), n.startswith("perq-rtn") and "@b" in n))


def select(only: str | None) -> list[str]:
    """--only: configuration names, method names or granularities, comma-separated."""
    names = config_names()
    if not only:
        return names
    keys = {k.strip() for k in only.split(",") if k.strip()}
    bad = keys - set(names) - set(METHODS) - set(GRANULARITIES)
    if bad:
        raise SystemExit(f"--only {','.join(sorted(bad))}: not a configuration, method or granularity "
                         f"({', '.join(names)})")
    return [n for n in names if n in keys or n.split("@")[0] in keys or n.split("@")[-1] in keys]


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PERQ_CACHE") or "~/.cache/perq-onnx").expanduser() / "weight_only"


def model_path(name: str) -> pathlib.Path:
    return resolve("smollm2") if name == "fp32" else cache_root() / name / "model.onnx"


def perq_commit() -> str:
    """The commit the perq_onnx in use comes from (a snapshot's COMMIT file, else this tree's HEAD,
    '+dirty' when the product's files differ from it)."""
    if (SRC / "COMMIT").is_file():
        return (SRC / "COMMIT").read_text().strip()
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "perq_onnx", "passes", "models"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def load() -> float:
    return os.getloadavg()[0]

# ----------------------------------------------------------------------------------- checks

def accuracy_level_check() -> dict:
    """A tiny DequantizeLinear(int4, block 32) -> MatMul model: which op onnxruntime fuses it to
    and the relative error against float64, with the session key at 0, at 4 and unset."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    k, n, block = 64, 32, 32
    q = rng.integers(-8, 8, size=(k, n))
    s = (rng.random((k // block, n)) * 0.1 + 0.01).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], axis=0, block_size=block),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, n])],
        [helper.make_tensor("wq", TensorProto.INT4, [k, n], q.flatten().tolist()), numpy_helper.from_array(s, "s")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = rng.standard_normal((1, 8, k)).astype(np.float32)
    ref = x.astype(np.float64) @ (q * np.repeat(s, block, axis=0))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in ("0", "4", None):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if level is not None:
                opts.add_session_config_entry(next(iter(ACC0)), level)
            opts.optimized_model_filepath = f"{tmp}/opt.onnx"
            y = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
                None, {"x": x})[0]
            nodes = onnx.load(f"{tmp}/opt.onnx").graph.node
            fused = [f"{nd.op_type}(accuracy_level={next((a.i for a in nd.attribute if a.name == 'accuracy_level'), 0)})"
                     if nd.op_type == "MatMulNBits" else nd.op_type for nd in nodes]
            out["unset" if level is None else level] = {"nodes": fused,
                                                        "rel_error": float(np.abs(y - ref).max() / np.abs(ref).max())}
    out["works"] = out["0"]["rel_error"] < 1e-5 < out["4"]["rel_error"] and "MatMulNBits" in out["0"]["nodes"][0]
    return out


def grid_check(path: pathlib.Path) -> dict:
    """Share of the decoder weights' blocks on a 16-level grid at 32, 64, 128 rows (and shifted by half)."""
    from perq_onnx.analysis import analyze
    from perq_onnx.graph import load_graph
    from perq_onnx.shapes import constant_value
    from perq_onnx.weight_grid import grid_report
    graph = load_graph(path)
    structure = analyze(graph)
    nodes = {nd.name: nd for nd in graph.nodes}
    names = [lin.name for layer in structure.layers for lin in layer.linears().values()]
    out = {}
    for block in (32, 64, 128):
        r = grid_report((w for w in (constant_value(nodes[n].inputs[1]) for n in names) if w is not None), block)
        out[str(block)] = {"aligned": r.aligned, "shifted": r.shifted, "shift_rows": block // 2, "weights": r.weights,
                           "from_low_bit_file": r.from_low_bit_file, "text": str(r)}
    return out


def graph_form(path: pathlib.Path) -> dict:
    """How many MatMuls read quantized weights (MatMulNBits, or DequantizeLinear of an int
    initializer), and the form of lm_head and the embedding (read from the graph)."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    producers = {o: nd for nd in m.graph.node for o in nd.output}
    low = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}

    def quantized(nd) -> str | None:
        if nd.op_type == "MatMulNBits":
            return "MatMulNBits"
        src = producers.get(nd.input[1]) if nd.op_type == "MatMul" else None
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits \
                and inits[src.input[0]].data_type in low:
            return f"{onnx.TensorProto.DataType.Name(inits[src.input[0]].data_type)} DQ+MatMul"
        return None

    forms = [quantized(nd) for nd in m.graph.node if nd.op_type in ("MatMul", "MatMulNBits")]
    head = producers.get("logits")
    emb = next((nd for nd in m.graph.node if nd.op_type in ("Gather", "GatherBlockQuantized") and nd.input
                and nd.input[0] in inits and len(inits[nd.input[0]].dims) == 2), None)
    return {"quantized_linears": sum(f is not None for f in forms),
            "weight_form": sorted({f for f in forms if f}),
            "lm_head": (quantized(head) or "float") if head is not None else "?",
            "embedding": "?" if emb is None else
            f"{onnx.TensorProto.DataType.Name(inits[emb.input[0]].data_type)} {emb.op_type}"}


# ----------------------------------------------------------------------------------- build

def lm_head_node(path: pathlib.Path) -> str:
    return next(nd.name for nd in onnx.load(str(path), load_external_data=False).graph.node if "logits" in nd.output)


def build(name: str, src: pathlib.Path, stats: dict, valid: np.ndarray) -> dict:
    """Write the model of one configuration (unless cached); what was done, as a record."""
    dst = model_path(name)
    info_file = dst.parent / "build.json"
    if dst.exists() and info_file.exists():
        return json.loads(info_file.read_text())
    method, gran = name.split("@")
    spec, group = METHODS[method], GRANULARITIES[gran][0]
    t0, load0 = time.perf_counter(), load()
    if "peer" in spec:
        peer_quantize(src, dst, group, acc=0, config=spec["peer"], exclude=(lm_head_node(src),))
        info = {"peer": spec["peer"], "block": group, "accuracy_level": 0, "excluded": [lm_head_node(src)]}
    else:
        extra = {} if group is None else {"w_group": group}
        settings = Settings.parse(**PERQ_COMMON, **spec["settings"], **extra)  # PerqError: not supported (yet)
        report = pipeline.optimize(src, dst, settings, stats=stats, batches=valid, progress=False)
        meta = {p.key: p.value for p in onnx.load(str(dst), load_external_data=False).metadata_props}
        info = {"options": json.loads(meta.get("perq.options", "{}")), "perq_commit": perq_commit(),
                "summaries": report.summaries}
    info.update(build_s=time.perf_counter() - t0, build_load_avg=load0)
    info_file.write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------------- report

def goals(res: dict) -> list[str]:
    """The issue's two goal lines per granularity, from the numbers."""
    ppl = {n: c["ppl"] for n, c in res["configs"].items() if c.get("ppl") is not None}
    out = []
    for g in GRANULARITIES:
        title = GRANULARITIES[g][1]
        d, norot = ppl.get(f"perq-gptq-online@{g}"), ppl.get(f"perq-gptq-norot@{g}")
        hqq = ppl.get(f"ort-hqq@{g}")
        rtn = min((ppl[k] for k in (f"ort-rtn-sym@{g}", f"ort-rtn-asym@{g}") if k in ppl), default=None)
        if d is not None and norot is not None:
            gain = 1 - d / norot
            parts = [f"{gain:+.1%} vs GPTQ without rotations ({d:.2f} vs {norot:.2f})"]
            ok = gain >= 0.03
            if GRANULARITIES[g][0] is None:
                parts.append("no onnxruntime peer per channel")
            elif hqq is None or rtn is None:
                parts.append("onnxruntime rows missing")
                ok = None
            else:
                ok = ok and d < hqq and d < rtn
                parts.append(f"HQQ {hqq:.2f}, best RTN {rtn:.2f}")
            verdict = "MET" if ok else "MISSED" if ok is not None else "INCOMPLETE"
            out.append(f"{title}: perq default (rotations + GPTQ) >= 3% below GPTQ without rotations and below "
                       f"onnxruntime's HQQ and RTN at the same block: **{verdict}** ({'; '.join(parts)})")
        n = ppl.get(f"perq-rtn-norot@{g}")
        for key, what in (("rot", "all rotations"), ("auto", "the rotations the planner keeps")):
            r = ppl.get(f"perq-rtn-{key}@{g}")
            if r is not None and n is not None:
                out.append(f"{title}: with RTN, {what} never worse than none: **{'MET' if r <= n else 'MISSED'}** "
                           f"({r:.2f} with vs {n:.2f} without, {r / n - 1:+.1%})")
    return out


def markdown(res: dict) -> str:
    c, fp = res["configs"], res["configs"].get("fp32", {}).get("ppl")
    m, w = res["machine"], res["windows"]
    loads = [v for r in c.values() for v in (r.get("eval_load_avg"), r.get("build", {}).get("build_load_avg")) if v]
    lines = ["# Weight-only INT4 on SmolLM2-135M at grid-neutral granularities", "",
             f"WikiText-2 {w.get('text', 'test.txt')}, {w['count']} x {SEQ_LEN} non-overlapping windows, indices {w['first']}-"
             f"{w['first'] + w['count'] - 1} (earlier benchmarks read 0-31); perq statistics and Hessians from "
             f"valid {CALIB_WINDOWS} x 512, shared by every perq row. Only the {DECODER_LINEARS} decoder linears are "
             "INT4; lm_head and embedding float in every row. Every model evaluated with "
             f"{THREADS} intra-op threads and session.qdq_matmulnbits_accuracy_level = 0 (fp32 compute).", "",
             f"| method (fp32 {fp:.2f}) | " + " | ".join(t for _, t in GRANULARITIES.values()) + " |"
             if fp else "| method | " + " | ".join(t for _, t in GRANULARITIES.values()) + " |",
             "|---|" + "---|" * len(GRANULARITIES)]
    for method, spec in METHODS.items():
        cells = []
        for g in GRANULARITIES:
            r = c.get(f"{method}@{g}", {})
            cells.append(f"{r['ppl']:.2f}" if r.get("ppl") is not None else
                         "n/a" if "peer" in spec and GRANULARITIES[g][0] is None else
                         "not run" if not r.get("skipped") else "refused")
        lines.append(f"| {spec['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Goals (computed from the table):", ""] + [f"* {g}" for g in goals(res)]
    grid = res.get("grid", {})
    lines += ["", "Why block 32 is excluded (perq_onnx/weight_grid.py, the 210 decoder weights):", ""]
    for b, r in grid.items():
        lines.append(f"* block {b}: {r['aligned']:.1%} of blocks on a 16-level grid, {r['shifted']:.1%} "
                     f"when shifted by {r['shift_rows']} rows")
    lines += ["", "Notes:", ""] + [f"* {n}" for n in notes(res)]
    lines += ["", f"Machine: {m['platform']}, {m['cpu']}, nproc {m['nproc']}, onnxruntime {m['onnxruntime']}, "
              f"onnx {m['onnx']}, python {m['python']}; shared with other agents: 1-min load average "
              f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f} at the rows' build/eval starts (per row in "
              "the json); started " + m["date"] + "."]
    return "\n".join(lines) + "\n"


def notes(res: dict) -> list[str]:
    c = res["configs"]
    out = []
    chk = res.get("accuracy_level_check", {})
    if chk:
        out.append("session.qdq_matmulnbits_accuracy_level checked on a tiny DQ(int4, block 32) + MatMul model: "
                   f"key 0 -> {chk['0']['nodes']} rel. error {chk['0']['rel_error']:.1e}; key 4 -> "
                   f"{chk['4']['rel_error']:.1e}; unset -> {chk['unset']['nodes']} {chk['unset']['rel_error']:.1e} "
                   f"({'works' if chk['works'] else 'DOES NOT WORK'} in onnxruntime {res['machine']['onnxruntime']}).")
    opts = next((r["build"]["options"] for n, r in c.items() if n.startswith("perq-gptq-rot@") and "build" in r), None)
    if opts:
        out.append(f"'Rotations' (as recorded in the model): residual {opts.get('residual_rotation')}, "
                   f"heads {opts.get('head_rotation')}, online block {opts.get('block')}, permutation "
                   f"{opts.get('permute')}: R1 and R2 asked for explicitly, the defaults up to 4699d2c (since "
                   "b564dd9 a weight-only RTN build left unset chooses R1/R2, and R3 since fffe03b, by a "
                   "rounding-error proxy, rotation_choice.py: what the planner row measures, its choices in the "
                   "row's build summaries). 'No rotations' = residual none, no head rotation, block none, permute none.")
    out.append("perq rows: `--target simulate --a-bits 16 --w-clip act` (INT4 DequantizeLinear -> MatMul). The simulate "
               "target's own defaults are RTN with the weight-MSE clip rule (the paper's tables); every perq row sets "
               "--w-clip act (the ort/tensorrt default), so RTN and GPTQ rows differ in rounding only.")
    out.append("onnxruntime rows: MatMulNBitsQuantizer, QOperator MatMulNBits, accuracy_level 0, lm_head excluded "
               "(nodes_to_exclude), embedding untouched; no per-channel mode (MatMulNBits is blockwise). "
               "K = 576 at block 128: onnxruntime pads the last block; perq's last block has 64 rows.")
    skipped = {n: r["skipped"] for n, r in c.items() if r.get("skipped") and r.get("ppl") is None}
    for n, why in skipped.items():
        out.append(f"{n} refused by the product at {c[n].get('perq_commit', '?')}: {why}")
    bad = [n for n, r in c.items() if n != "fp32" and r.get("form", {}).get("quantized_linears") not in
           (None, DECODER_LINEARS)]
    if bad:
        out.append(f"Rows whose graph does not have {DECODER_LINEARS} quantized decoder linears: {', '.join(bad)}")
    commits = sorted({r["build"].get("perq_commit") for r in c.values() if r.get("build", {}).get("perq_commit")})
    if commits:
        out.append(f"perq-onnx commit(s) the perq rows were built from: {', '.join(commits)}.")
    return out


def plot(res: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c, w = res["configs"], res["windows"]
    fig, ax = plt.subplots(figsize=(13, 5))
    width = 0.8 / len(METHODS)
    colors = plt.cm.tab10(np.arange(len(METHODS)))
    for i, (method, spec) in enumerate(METHODS.items()):
        xs, ys = [], []
        for j, g in enumerate(GRANULARITIES):
            p = c.get(f"{method}@{g}", {}).get("ppl")
            if p is not None:
                xs.append(j + (i - (len(METHODS) - 1) / 2) * width)
                ys.append(p)
        if not ys:
            continue
        bars = ax.bar(xs, ys, width, color=colors[i], label=spec["label"].strip("*"))
        ax.bar_label(bars, fmt="%.1f", fontsize=6, rotation=90, padding=2)
    fp = c.get("fp32", {}).get("ppl")
    if fp:
        ax.axhline(fp, color="black", lw=1, ls="--", label=f"fp32 {fp:.2f}")
        ax.set_ylim(fp * 0.9, None)
    ax.set_xticks(range(len(GRANULARITIES)), [t for _, t in GRANULARITIES.values()])
    ax.set_ylabel(f"WikiText-2 ppl (test windows {w['first']}-{w['first'] + w['count'] - 1})")
    ax.set_title("SmolLM2-135M weight-only INT4 (decoder linears; lm_head, embedding float)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"platform": platform.platform(), "cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "onnx": onnx.__version__, "perq_onnx": str(pathlib.Path(perq_onnx.__file__).parent),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_avg_at_start": load()}


# ----------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=32, help="test windows from index 32 (default 32)")
    ap.add_argument("--valid", action="store_true", help="evaluate on held-out valid.txt windows from index 32 "
                    "instead (calibration reads 0-31): the screen that chose defaults; stem results/weight_only_valid")
    ap.add_argument("--only", help="configurations, methods or granularities (pc, b64, b128), comma-separated")
    ap.add_argument("--out", help="output stem (default results/weight_only, with --valid results/weight_only_valid)")
    ap.add_argument("--report-only", action="store_true", help="re-render the .md and .png from the json")
    args = ap.parse_args(argv)
    text = "valid.txt" if args.valid else "test.txt"
    out = pathlib.Path(args.out or RESULTS / ("weight_only_valid" if args.valid else "weight_only"))
    out_json, out_md, out_png = (out.with_name(out.name + ext) for ext in (".json", ".md", ".png"))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(out_json.read_text()) if out_json.exists() else {}
    spec = {"first": FIRST_WINDOW, "count": args.windows, "seq_len": SEQ_LEN, **({"text": text} if args.valid else {})}

    def save():
        out_json.write_text(json.dumps(res, indent=1))
        out_md.write_text(markdown(res))
        if any(r.get("ppl") for r in res["configs"].values()):
            plot(res, out_png)

    if args.report_only:
        res = prev
        save()
        print(out_md.read_text())
        return 0
    names = select(args.only)
    start = time.perf_counter()

    def log(msg):
        tqdm.write(f"[{time.perf_counter() - start:6.0f} s, load {load():.1f}] {msg}")

    same = prev.get("windows") == spec
    res = {"machine": prev["machine"] if same else machine(), "windows": spec, "configs": prev.get("configs", {}) if same else {},
           **{k: prev[k] for k in ("accuracy_level_check", "grid") if same and k in prev}}
    res["machine"].setdefault("runs", []).append({"date": machine()["date"], "load_avg_at_start": load(),
                                                  "perq_commit": perq_commit(), "only": args.only})
    log(f"perq_onnx from {pathlib.Path(perq_onnx.__file__).parent} ({perq_commit()}), onnxruntime {ort.__version__}")

    if "accuracy_level_check" not in res:
        res["accuracy_level_check"] = accuracy_level_check()
    chk = res["accuracy_level_check"]
    log(f"accuracy-level key: 0 -> {chk['0']['nodes']} err {chk['0']['rel_error']:.1e}; 4 -> err "
        f"{chk['4']['rel_error']:.1e}; unset -> {chk['unset']['nodes']}: {'works' if chk['works'] else 'BROKEN'}")
    if not chk["works"]:  # the brief's fallback would be ORT_ENABLE_BASIC for every row
        raise SystemExit("session.qdq_matmulnbits_accuracy_level does not work in this onnxruntime")
    plain = resolve("smollm2")
    if "grid" not in res:
        log("grid check of the decoder weights ...")
        res["grid"] = grid_check(plain)
    for b, r in res["grid"].items():
        log(f"grid block {b}: {r['text']}")

    tok = calibration.load_tokenizer(plain.parent)
    test = calibration.windows(calibration.tokenize_file(DATA / text, tok), SEQ_LEN,
                               FIRST_WINDOW + args.windows, text)[FIRST_WINDOW:]
    if len(test) < args.windows:
        raise SystemExit(f"{text} has only {FIRST_WINDOW + len(test)} windows of {SEQ_LEN}")
    valid = calibration.windows(calibration.tokenize_file(DATA / "valid.txt", tok), 512, CALIB_WINDOWS, "valid.txt")
    todo = [n for n in names if res["configs"].get(n, {}).get("ppl") is None]
    stats = None
    if any("settings" in METHODS.get(n.split("@")[0], {}) for n in todo):
        stats_file = cache_root() / "stats.npz"
        if stats_file.exists():
            stats = dict(np.load(stats_file))
        else:
            log(f"calibrating (valid {CALIB_WINDOWS} x 512) ...")
            stats = pipeline.calibrate(plain, valid, threads=THREADS, progress=False)
            stats_file.parent.mkdir(parents=True, exist_ok=True)
            np.savez(stats_file, **stats)
    save()
    for name in tqdm(todo, desc="configurations", unit="cfg"):
        row = res["configs"].setdefault(name, {})
        if name != "fp32":
            log(f"{name}: building ...")
            try:
                row["build"] = build(name, plain, stats, valid)
            except PerqError as exc:
                row.update(skipped=str(exc), perq_commit=perq_commit())
                log(f"{name}: refused: {exc}")
                save()
                continue
            row.pop("skipped", None)
            log(f"{name}: built in {row['build']['build_s']:.0f} s")
        path = model_path(name)
        row["form"] = graph_form(path)
        if name != "fp32" and row["form"]["quantized_linears"] != DECODER_LINEARS:
            log(f"{name}: WARNING {row['form']}")
        load0 = load()
        sess = session(path, THREADS, config=ACC0)
        p = perplexity(path, test, sess=sess, progress=True)
        row.update(ppl=p.ppl, tokens=p.tokens, eval_s=p.seconds, eval_load_avg=load0)
        log(f"{name}: ppl {p.ppl:.3f} ({p.seconds:.0f} s) {row['form']}")
        save()
    res["machine"]["runs"][-1].update(seconds=time.perf_counter() - start, load_avg_at_end=load())
    save()
    print(out_md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
