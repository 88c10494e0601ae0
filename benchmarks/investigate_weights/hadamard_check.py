"""Does the Hadamard construction matter? Output error (mean over layers 2, 8, 15, 22, 28) of the
readers/writers after R1 = Paley-36 x Sylvester-16 Hadamard (rot_r1) vs a seeded random orthogonal
576 (rot_r1_rand), for onnxruntime RTN g32 and perq mse per channel. Grams derived from fold_only."""
import sys
import numpy as np
sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E
import grams as G
import quantizers as Q

layers = [2, 8, 15, 22, 28]
for v in ("rot_r1", "rot_r1_rand"):
    m, st = E.Model(G.model_path(v)), G.load(v)
    for rule, g in (("ort", 32), ("mse", None)):
        row = []
        for kind in E.KINDS:
            errs = []
            for i in layers:
                key = f"layers.{i}.{kind}"
                w = m.weight(key)
                errs.append(Q.output_error(w, Q.quantize(rule, w, g), st[f"gram/{G.role(key)}"].astype(np.float64)))
            row.append(np.mean(errs))
        print(f"{v:12s} {rule}{g or 'pc':<4} " + " ".join(f"{k} {x:.4f}" for k, x in zip(E.KINDS, row)), flush=True)
