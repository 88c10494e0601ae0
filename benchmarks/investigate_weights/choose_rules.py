"""Which weight-rounding rules to make the deployment targets' defaults, chosen on calibration
data only (WikiText-2 *valid*: statistics and Hessians from windows 0..C-1, perplexity on the
held-out valid windows C..C+N-1; the test split is not read).

    python benchmarks/investigate_weights/choose_rules.py [--calib 16] [--eval 16] [--group 32]

Weight-only INT4 in the ort target's form (symmetric, blocks of --group input rows), decoder
linears only (--float-embeddings: lm_head and embedding float, as in FINDINGS.md), each rule with
and without the default rotations (R1+R2+P3+R3 b16). Rules: rounding (rtn/gptq) x clip
(absmax/mse/act) x code range (narrow: max|w|/7; full: signed extreme/-8, onnxruntime's rule).
Results: choose_rules.json beside this file (appended per configuration; rerun resumes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time

from perq_onnx import calibration
from perq_onnx.evaluate import perplexity
from perq_onnx.models import smollm2
from perq_onnx.pipeline import calibrate, optimize
from perq_onnx.settings import Settings
from perq_onnx import targets

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data" / "wikitext-2"
ROTATIONS = {"no rotation": dict(residual_rotation="none", head_rotation=False, block="none", permute="none"),
             "default rotations": dict(block="16", permute="massdiff")}
RULES = [("rtn", "absmax", False), ("rtn", "absmax", True), ("rtn", "mse", False), ("rtn", "mse", True),
         ("rtn", "act", True), ("gptq", "mse", False), ("gptq", "mse", True), ("gptq", "act", True)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--rotations", nargs="+", default=list(ROTATIONS))
    ap.add_argument("--rules", nargs="+", help="rounding:clip:range, e.g. gptq:act:full (default: all)")
    args = ap.parse_args()
    out_json = HERE / "choose_rules.json"
    done = json.loads(out_json.read_text()) if out_json.exists() else []
    model = smollm2.onnx_path()
    tok = calibration.load_tokenizer(model.parent)
    valid = calibration.windows(calibration.tokenize_file(DATA / "valid.txt", tok), 512, args.calib + args.eval, "valid.txt")
    calib, held = valid[:args.calib], valid[args.calib:]
    stats = calibrate(model, calib)
    key = lambda r: tuple(r.get(k) for k in ("rotation", "rounding", "clip", "full_range", "group", "calib", "eval"))  # noqa: E731
    finished = {key(r) for r in done}
    if not any(r["rotation"] == "float" and r["eval"] == args.eval for r in done):
        p = perplexity(model, held, progress=False)
        done.append({"rotation": "float", "ppl": p.ppl, "eval": args.eval})
        out_json.write_text(json.dumps(done, indent=1))
    print(f"float: {next(r['ppl'] for r in done if r['rotation'] == 'float' and r['eval'] == args.eval):.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "model.onnx"
        for rot in args.rotations:
            rules = RULES if not args.rules else [(r, c, f == "full") for r, c, f in (x.split(":") for x in args.rules)]
            for rounding, clip, full in rules:
                entry = dict(rotation=rot, rounding=rounding, clip=clip, full_range=full, group=args.group,
                             calib=args.calib, eval=args.eval)
                if key(entry) in finished:
                    continue
                t0 = time.perf_counter()
                tgt = dataclasses.replace(targets.TARGETS[targets.TargetName.ORT], full_range=full)
                targets.TARGETS[targets.TargetName.ORT] = tgt
                settings = Settings.parse(target="ort", rounding=rounding, w_clip=clip, w_group=args.group,
                                          float_embeddings=True, **ROTATIONS[rot])
                optimize(model, out, settings, stats=stats, batches=calib, progress=False)
                p = perplexity(out, held, progress=False)
                entry.update(ppl=p.ppl, seconds=time.perf_counter() - t0)
                done.append(entry)
                out_json.write_text(json.dumps(done, indent=1))
                print(f"{rot:18s} {rounding:4s} {clip:6s} {'full' if full else 'narrow':6s} g{args.group}: "
                      f"ppl {p.ppl:.3f}  ({entry['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
