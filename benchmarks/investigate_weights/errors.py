"""Per-linear weight error ||W-Q||^2/||W||^2 and OUTPUT error ||XW-XQ||^2/||XW||^2 (X: that
linear's calibration inputs, valid.txt 16x512, via grams.py) for quantization rules x groups on a
model variant. Writes $IW_WORK/errors_<variant>.json and prints per-kind means (over 30 layers).
Usage: python errors.py VARIANT [rules=absmax7,ort,mse,wmse] [groups=pc,32,128]
"""
import json
import sys

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E
import grams as G
import quantizers as Q


def run(variant, rules, groups):
    m = E.Model(G.model_path(variant))
    st = G.load(variant)
    res = {}
    for key in m.linears:
        w = m.weight(key)
        gram = st[f"gram/{G.role(key)}"].astype(np.float64)
        d = np.diag(gram).copy()
        for g in groups:
            gg = None if g == "pc" else int(g)
            for r in rules:
                q = Q.quantize(r, w, gg, d=d)
                res[f"{key}|{r}|{g}"] = (Q.weight_error(w, q), Q.output_error(w, q, gram))
    return res


def summary(res, rules, groups):
    lines = []
    for g in groups:
        for r in rules:
            row = []
            for kind in E.KINDS:
                v = [res[k][1] for k in res if k.split("|")[1:] == [r, g] and k.split("|")[0].endswith("." + kind)]
                row.append(np.mean(v))
            lines.append((g, r, row))
    return lines


if __name__ == "__main__":
    variant = sys.argv[1]
    rules = sys.argv[2].split(",") if len(sys.argv) > 2 else ["absmax7", "ort", "mse", "wmse"]
    groups = sys.argv[3].split(",") if len(sys.argv) > 3 else ["pc", "32", "128"]
    res = run(variant, rules, groups)
    path = E.WORK / f"errors_{variant}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(res)
    path.write_text(json.dumps(old))
    print(f"{variant}: mean OUTPUT error ||XdW||^2/||XW||^2 over 30 layers")
    print("group rule      " + " ".join(f"{k:>8}" for k in E.KINDS))
    for g, r, row in summary(res, rules, groups):
        print(f"{g:>5} {r:<9} " + " ".join(f"{v:8.5f}" for v in row))
