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
           "INT4": dict(format="int", w_bits=4, a_bits=4, float_target=False)}  # as the FP4 rows: no refit unless named
BLOCK_OF = {"NVFP4": NumberFormat.NVFP4.block, "MXFP4": NumberFormat.MXFP4.block}


R1 = {"residual_rotation": "full"}  # main() sets "online" for a post-norm model (Gemma 3): the R1 it takes


def configurations(block: int, residual: bool = True):
    """(name, options) of the rotation configurations at one block size: with R1 (full residual
    Hadamard; online block Hadamards at the residual's readers on a post-norm model) and R2
    (per-head), the paper's setting, or (residual=False) the online block rotation alone, aligned
    with the format's scale blocks."""
    if residual:
        none = dict(residual_rotation="none", head_rotation=False, block="none", permute="none")
        yield "no rotation", none
        yield "no rotation + GPTQ", dict(none, rounding="gptq", w_clip="act")
    family, extra = (("R1+R2+R3", dict(R1, head_rotation=True)) if residual
                     else ("R3", dict(residual_rotation="none", head_rotation=False)))
    yield f"{family} b{block}", dict(block=str(block), permute="none", **extra)
    yield f"{family} b{block} PeRQ", dict(block=str(block), permute="massdiff", **extra)
    yield f"{family} b{block} PeRQ + GPTQ", dict(block=str(block), permute="massdiff", rounding="gptq", w_clip="act",
                                                 **extra)
    # GPTQ of the weights refitted toward the float output from the quantized activations (--float-target)
    yield f"{family} b{block} PeRQ + GPTQ float target", dict(block=str(block), permute="massdiff", rounding="gptq",
                                                              w_clip="act", float_target=True, **extra)


def row_names(block: int, residual: bool) -> list[str]:
    """The table's columns: no rotation, block rotation, PeRQ, PeRQ + GPTQ, and with the float target."""
    return ["no rotation"] + [n for n, _ in configurations(block, residual) if not n.startswith("no rotation")]


def rows():
    """(format row, configuration, options): each FP4 format with both rotation families, and INT4
    W4A4 with the paper's family at the same block."""
    seen = set()
    for fmt, block in BLOCK_OF.items():
        for row, residual in ((fmt, True), (fmt, False), ("INT4", True)):
            for name, cfg in configurations(block, residual):
                if (row, name) not in seen and (row, name) != ("INT4", "no rotation + GPTQ"):
                    seen.add((row, name))
                    yield row, name, {**FORMATS[row], **cfg}  # a row's own float_target wins
    if R1["residual_rotation"] == "full":  # MXFP4's default R1 on a pre-norm model is the online one
        online = dict(FORMATS["MXFP4"], block="32", residual_rotation="online", head_rotation=True)
        yield "MXFP4", "R1 online+R2+R3 b32", dict(online, permute="none")
        yield "MXFP4", "R1 online+R2+R3 b32 PeRQ", dict(online, permute="massdiff")
        yield "MXFP4", "R1 online+R2+R3 b32 PeRQ + GPTQ", dict(online, permute="massdiff", rounding="gptq",
                                                                w_clip="act")


def choose(args, model):
    """The FP4 default rotations, chosen on held-out *valid* windows (32.. of valid.txt; statistics
    from 0..calib-1), activations only (W16A4): fp32, no rotation, R1+R2+R3 and R3 alone."""
    model_path = model["recipe"].onnx_path()
    tok = calibration.load_tokenizer(model_path.parent)
    tokens = calibration.tokenize_file(DATA / "valid.txt", tok)
    held_out = calibration.windows(tokens, 512, 32 + args.choose_windows, "valid.txt")[32:]
    valid = calibration.windows(tokens, 512, args.calib_samples, "valid.txt")
    stats = calibrate(model_path, valid)
    results = {"eval": f"WikiText-2 valid windows 32..{31 + len(held_out)} (x 512), W16A4",
               "fp32": perplexity(model_path, held_out, progress=False).ppl}
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "model.onnx"
        for fmt, block in BLOCK_OF.items():
            for residual in (True, False):
                for name, cfg in [c for c in configurations(block, residual) if "GPTQ" not in c[0]][:3 if residual else 2]:
                    options = {**cfg, "format": FORMATS[fmt]["format"], "w_bits": 16}
                    optimize(model_path, out, Settings.parse(**options), stats=stats, batches=valid, progress=False)
                    results[f"{fmt} {name}"] = perplexity(out, held_out, progress=False).ppl
                    print(f"{fmt} {name}: {results[f'{fmt} {name}']:.2f}", flush=True)
    (RESULTS / "fp4_choice.json").write_text(json.dumps(results, indent=1))


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
    todo = [r for r in rows() if (r[0], r[1]) not in finished and (not args.only or f"{r[0]}:{r[1]}" in args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "model.onnx"
        for fmt, name, cfg in tqdm(todo, desc="configurations", unit="cfg"):
            t0 = time.perf_counter()
            optimize(model_path, out, Settings.parse(**cfg), stats=stats, batches=valid, progress=False)
            p = perplexity(out, test, progress=False)
            record({**cfg, "format": fmt, "config": name, "ppl": p.ppl, "seconds": time.perf_counter() - t0})
            tqdm.write(f"{fmt} {name}: ppl {p.ppl:.2f}")
    return done, stats


def table(done) -> str:
    ppl = {(r["format"], r["config"]): r["ppl"] for r in done["runs"]}
    fp = ppl.get(("fp32", "float"), float("nan"))
    lines = [f"Model: {done['model']}. Eval: {done['eval']}. Calibration: {done['calibration']}. "
             f"Machine: {done['machine']}; one run per configuration. fp32 ppl {fp:.2f}.", ""]
    for fmt, block in BLOCK_OF.items():
        lines += [f"### {fmt} (block {block}) against INT4 W4A4 with the same rotations", "",
                  "| format | rotations | no rotation | block rotation | PeRQ (massdiff) | PeRQ + GPTQ "
                  "| PeRQ + GPTQ float target | best / fp32 |",
                  "|---|---|---|---|---|---|---|---|"]
        gptq = ppl.get((fmt, "no rotation + GPTQ"), float("nan"))
        online = R1["residual_rotation"] == "online"
        rows_shown = [(fmt, True, None), (fmt, False, None), ("INT4", True, None)]
        if not online and any(f == fmt and c.startswith("R1 online") for f, c in ppl):  # rows() adds these
            rows_shown.insert(1, (fmt, True, "R1 online+R2+R3"))
        for row, residual, renamed in rows_shown:
            names = [n.replace("R1+R2+R3", renamed) if renamed else n for n in row_names(block, residual)]
            vals = [ppl.get((row, n), float("nan")) for n in names]
            if not residual:
                family = f"R3 only (b{block})"
            else:
                family = renamed or ("R1 online+R2+R3" if online else "R1+R2+R3")
            best = "-" if np.isnan(vals).all() else f"{np.nanmin(vals) / fp:.2f}x"
            lines.append(f"| {row} | {family} | " + " | ".join("-" if np.isnan(v) else f"{v:.2f}" for v in vals)
                         + f" | {best} |")
        lines += ["", f"{fmt} with GPTQ and no rotation (GPTQ alone): {gptq:.2f} ({gptq / fp:.2f}x fp32).", ""]
    return "\n".join(lines)


def plot(done, stats, prefix):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = {(r["format"], r["config"]): r["ppl"] for r in done["runs"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (fmt, block) in zip(axes, BLOCK_OF.items()):
        names = ["no rotation", "block rotation", "PeRQ", "PeRQ + GPTQ", "+ float target"]
        x = np.arange(len(names))
        series = [(f"{fmt}, R1+R2+R3", fmt, True), (f"{fmt}, R3 only", fmt, False), ("INT4, R1+R2+R3", "INT4", True)]
        for i, (label, row, residual) in enumerate(series):
            keys = row_names(block, residual)
            ax.bar(x + (i - 1) * 0.27, [ppl.get((row, k), np.nan) for k in keys], 0.27, label=label)
        if ("fp32", "float") in ppl:
            ax.axhline(ppl[("fp32", "float")], color="black", lw=0.8, label="fp32")
        ax.set_xticks(x, names, fontsize=8)
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
    ap.add_argument("--only", nargs="+", help='only these rows, as FORMAT:CONFIG (e.g. "MXFP4:R1+R2+R3 b32 PeRQ + GPTQ")')
    ap.add_argument("--choose", action="store_true", help="only the W16A4 comparison on held-out valid windows "
                                                          "that chose the FP4 default rotations (fp4_choice.json)")
    ap.add_argument("--choose-windows", type=int, default=4, help="held-out valid windows for --choose")
    args = ap.parse_args()
    model = MODELS[args.model]
    if model.get("online"):
        R1["residual_rotation"] = "online"
    if args.choose:
        RESULTS.mkdir(parents=True, exist_ok=True)
        return choose(args, model)
    prefix = "fp4" if args.model == "smollm2" else f"fp4-{args.model}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    done, stats = run(args, model, prefix)
    md = table(done)
    (RESULTS / f"{prefix}.md").write_text(md + "\n")
    plot(done, stats, prefix)
    print(md)


if __name__ == "__main__":
    main()
