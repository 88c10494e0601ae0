"""perq-onnx's per-channel MSE rule vs Brevitas 0.13.4's (quantizers.brevitas, from its source)
vs onnxruntime RTN on the default rotated model (rot_default): mean weight and output error over
layers 2, 8, 15, 22, 28 per kind. Grams: grams.py rot_default (valid 8x512)."""
import sys
import numpy as np
sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E
import grams as G
import quantizers as Q

layers = [2, 8, 15, 22, 28]
m, st = E.Model(G.model_path("rot_default")), G.load("rot_default")
for rule in ("mse", "brevitas", "ort"):
    row, wrow = [], []
    for kind in E.KINDS:
        errs, werrs = [], []
        for i in layers:
            key = f"layers.{i}.{kind}"
            w = m.weight(key)
            q = Q.quantize(rule, w, None)
            errs.append(Q.output_error(w, q, st[f"gram/{G.role(key)}"].astype(np.float64)))
            werrs.append(Q.weight_error(w, q))
        row.append(np.mean(errs))
        wrow.append(np.mean(werrs))
    print(f"{rule:9s} output " + " ".join(f"{k} {x:.4f}" for k, x in zip(E.KINDS, row)), flush=True)
    print(f"{rule:9s} weight " + " ".join(f"{k} {x:.4f}" for k, x in zip(E.KINDS, wrow)), flush=True)
