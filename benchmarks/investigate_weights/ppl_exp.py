"""Weight-only INT4 fake quantization (numpy, quantizers.py) of the 210 decoder linears of a model
variant (lm_head, embeddings float), written back as float initializers, perplexity with
onnxruntime (1 thread) on the first N test windows x 512. Appends one JSON line per run to
results.jsonl beside this script.
Usage: python ppl_exp.py [--windows 32] VARIANT:RULE:GROUP [...]
   RULE: none | absmax7 | ort | mse | wmse | mse_wide | wmse_wide | gptq ; GROUP: pc | 32 | 128
   (wmse*/gptq need grams_<VARIANT>.npz from grams.py)
"""
import argparse
import json
import pathlib
import platform
import time

import numpy as np

import sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import evalkit as E
import grams as G
import quantizers as Q

OUT = pathlib.Path(__file__).resolve().parent / "results.jsonl"


def quantized_weights(m, variant, rule, group, only=None):
    if rule == "none":
        return {}
    gg = None if group == "pc" else int(group)
    st = G.load(variant) if rule.startswith("wmse") or rule.startswith("gptq") else None
    new = {}
    for key in m.linears:
        if only and key.split(".")[2] not in only:
            continue
        w = m.weight(key)
        d = None if st is None else st[f"gram/{G.role(key)}"].astype(np.float64)
        if rule.startswith("gptq"):
            import gptq
            new[key] = gptq.gptq(w, d, gg, rule)
        else:
            new[key] = Q.quantize(rule, w, gg, d=None if d is None else np.diag(d).copy())
    return new


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--only", default=None, help="comma list of kinds to quantize (default all 7)")
    ap.add_argument("configs", nargs="+")
    a = ap.parse_args()
    models = {}
    for cfg in a.configs:
        variant, rule, group = cfg.split(":")
        if variant not in models:
            models.clear()
            models[variant] = E.Model(G.model_path(variant))
        m = models[variant]
        t = time.time()
        only = a.only.split(",") if a.only else None
        new = quantized_weights(m, variant, rule, group, only)
        tq = time.time() - t
        p = m.ppl(new, n=a.windows)
        rec = {"script": "ppl_exp.py", "variant": variant, "rule": rule, "group": group, "only": a.only,
               "windows": a.windows, "ppl": p, "quant_s": round(tq, 1), "eval_s": round(time.time() - t - tq, 1),
               "machine": platform.machine(), "when": time.strftime("%H:%M:%S")}
        print(json.dumps(rec), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(rec) + "\n")
