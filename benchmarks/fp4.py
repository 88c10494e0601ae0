"""Microscaling FP4 (NVFP4, MXFP4) W4A4 on SmolLM2-135M (or Gemma 3 270M), against INT4 W4A4 and fp32.

    python benchmarks/fp4.py                      # 16 x 512 test windows, 16 x 512 valid for calibration
    python benchmarks/fp4.py --model gemma3-270m --windows 8

For each format F (NVFP4: E2M1 with an E4M3 scale per 16 values and an fp32 tensor scale; MXFP4:
E2M1 with an E8M0 scale per 32) and the INT4 W4A4 research form (per-channel weights, per-token
activations), the same rotations at F's block size b: no rotation; R1 + R2 + an online block
rotation of size b without permutation; PeRQ (the same with the massdiff permutation); PeRQ with
GPTQ rounding. Weights and activations of every decoder linear are quantized (simulate target,
standard ops in onnxruntime); embedding and lm_head stay float. Statistics, Hessians and NVFP4's
static activation tensor scales come from WikiText-2 valid; perplexity from WikiText-2 test
windows, read only here. Also plots the l1 mass per block of the heaviest down_proj input before
and after the permutation at b = 16 and 32 (the blocks of the two formats).

Writes benchmarks/results/fp4.{json,md,png} and fp4_block_mass.png (prefix -gemma3-270m for Gemma).
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
import onnxruntime
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.quality import DATA, MODELS  # noqa: E402
from perq_onnx import calibration, permutation  # noqa: E402
from perq_onnx.evaluate import perplexity  # noqa: E402
from perq_onnx.pipeline import calibrate, optimize  # noqa: E402
from perq_onnx.settings import NumberFormat, Settings  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
FORMATS = {"NVFP4": dict(format="nvfp4", a_bits=4), "MXFP4": dict(format="mxfp4", a_bits=4),
           "INT4": dict(format="int", w_bits=4, a_bits=4)}
BLOCK_OF = {"NVFP4": NumberFormat.NVFP4.block, "MXFP4": NumberFormat.MXFP4.block}


def configurations(block: int):
    """(name, options) of the four rotation configurations at one block size."""
    yield "no rotation", dict(residual_rotation="none", head_rotation=False, block="none", permute="none")
    yield f"b{block} no permutation", dict(block=str(block), permute="none")
    yield f"b{block} PeRQ", dict(block=str(block), permute="massdiff")
    yield f"b{block} PeRQ + GPTQ", dict(block=str(block), permute="massdiff", rounding="gptq", w_clip="act")


def rows():
    """(format row, configuration, options): each FP4 format with INT4 at the same block."""
    seen = set()
    for fmt, block in BLOCK_OF.items():
        for row in (fmt, "INT4"):
            for name, cfg in configurations(block):
                if (row, name) not in seen:
                    seen.add((row, name))
                    yield row, name, {**cfg, **FORMATS[row]}


def run(args, model, prefix):
    out_json = RESULTS / f"{prefix}.json"
    done = json.loads(out_json.read_text()) if args.resume and out_json.exists() else {"runs": []}
    finished = {(r["format"], r["config"]) for r in done["runs"]}
    model_path = model["recipe"].onnx_path()
    tok = calibration.load_tokenizer(model_path.parent)

    def windows(name, count):
        tokens = calibration.tokenize_file(DATA / name, tok)
        if not model["bos"]:
            return calibration.windows(tokens, 512, count, name)
        w = calibration.windows(tokens, 511, count, name)
        return np.concatenate([np.full((len(w), 1), tok.bos_token_id, w.dtype), w], axis=1)

    test, valid = windows("test.txt", args.windows), windows("valid.txt", args.calib_samples)
    print(f"calibrating on {len(valid)} x 512 valid tokens ...")
    stats = calibrate(model_path, valid)
    done.update(model=model["desc"], machine=f"{platform.machine()}, onnxruntime {onnxruntime.__version__} CPU EP",
                eval=f"WikiText-2 test, {len(test)} x 512", calibration=f"WikiText-2 valid, {len(valid)} x 512")

    def record(entry):
        done["runs"].append(entry)
        out_json.write_text(json.dumps(done, indent=1))

    if ("fp32", "float") not in finished:
        p = perplexity(model_path, test, progress=False)
        record({"format": "fp32", "config": "float", "ppl": p.ppl, "seconds": p.seconds})
        print(f"fp32: ppl {p.ppl:.2f}")
    todo = [r for r in rows() if (r[0], r[1]) not in finished]
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "model.onnx"
        for fmt, name, cfg in tqdm(todo, desc="configurations", unit="cfg"):
            t0 = time.perf_counter()
            optimize(model_path, out, Settings.parse(**cfg), stats=stats, batches=valid, progress=False)
            p = perplexity(out, test, progress=False)
            record({"format": fmt, "config": name, "ppl": p.ppl, "seconds": time.perf_counter() - t0, **cfg})
            tqdm.write(f"{fmt} {name}: ppl {p.ppl:.2f}")
    return done, stats


def table(done) -> str:
    ppl = {(r["format"], r["config"]): r["ppl"] for r in done["runs"]}
    fp = ppl.get(("fp32", "float"), float("nan"))
    lines = [f"Model: {done['model']}. Eval: {done['eval']}. Calibration: {done['calibration']}. "
             f"Machine: {done['machine']}; one run per configuration. fp32 ppl {fp:.2f}.", ""]
    for fmt, block in BLOCK_OF.items():
        names = [n for n, _ in configurations(block)]
        lines += [f"### {fmt} (block {block}) against INT4 W4A4 with the same rotations", "",
                  "| format | " + " | ".join(names) + " | best / fp32 |", "|---|" + "---|" * (len(names) + 1)]
        for row in (fmt, "INT4"):
            vals = [ppl.get((row, n), float("nan")) for n in names]
            lines.append(f"| {row} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {np.nanmin(vals) / fp:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def plot(done, stats, prefix):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = {(r["format"], r["config"]): r["ppl"] for r in done["runs"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (fmt, block) in zip(axes, BLOCK_OF.items()):
        names = [n for n, _ in configurations(block)]
        x = np.arange(len(names))
        for i, row in enumerate((fmt, "INT4")):
            ax.bar(x + (i - 0.5) * 0.4, [ppl.get((row, n), np.nan) for n in names], 0.4, label=row)
        if ("fp32", "float") in ppl:
            ax.axhline(ppl[("fp32", "float")], color="black", lw=0.8, label="fp32")
        ax.set_xticks(x, [n.replace(f"b{block} ", f"b{block}\n") for n in names], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("WikiText-2 test ppl")
        ax.set_title(f"W4A4 {fmt} vs INT4, block {block}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{prefix}.png", dpi=120)

    mlp = {k: v for k, v in stats.items() if k.endswith(".mlp")}
    layer = max(mlp, key=lambda k: mlp[k].reshape(-1, 16).sum(1).max() / mlp[k].reshape(-1, 16).sum(1).mean())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, block in zip(axes, (16, 32)):
        for method in ("none", "massdiff"):
            p = permutation.permutation(method, mlp[layer], block, 0)
            label = "before (identity)" if method == "none" else "after massdiff"
            ax.plot(permutation.block_masses(mlp[layer], p, block), label=label, lw=1)
        ax.set_xlabel(f"block index (b = {block}: {'NVFP4' if block == 16 else 'MXFP4'} scale blocks)")
        ax.set_ylabel("block l1 mass (sum of mean |x|)")
        ax.set_title(f"{layer} down_proj input")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{prefix}_block_mass.png", dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=list(MODELS))
    ap.add_argument("--windows", type=int, default=16, help="test windows of 512 tokens")
    ap.add_argument("--calib-samples", type=int, default=16, help="valid windows of 512 tokens")
    ap.add_argument("--resume", action="store_true", help="keep finished configurations of the results json")
    args = ap.parse_args()
    model = MODELS[args.model]
    prefix = "fp4" if args.model == "smollm2" else f"fp4-{args.model}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    done, stats = run(args, model, prefix)
    md = table(done)
    (RESULTS / f"{prefix}.md").write_text(md + "\n")
    plot(done, stats, prefix)
    print(md)


if __name__ == "__main__":
    main()
