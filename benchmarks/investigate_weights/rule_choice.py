"""Which rule has the lower OUTPUT error per linear (errors_<variant>.json): ort (max/8, no clip)
vs mse (perq-onnx); and how often perq's weight-error ranking disagrees with the output-error one."""
import json, sys
import numpy as np
sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E

for v in sys.argv[1:] or ["float", "fold_only", "rot_r1"]:
    e = json.loads((E.WORK / f"errors_{v}.json").read_text())
    for g in ("pc", "32"):
        wins, disagree, n = {k: 0 for k in E.KINDS}, 0, 0
        for key in sorted({k.split("|")[0] for k in e}):
            kind = key.split(".")[2]
            wo, oo = e[f"{key}|ort|{g}"]
            wm, om = e[f"{key}|mse|{g}"]
            wins[kind] += om < oo
            disagree += (wm < wo) != (om < oo)
            n += 1
        print(f"{v:10s} {g:>3}: mse beats ort on output error in " +
              ", ".join(f"{k} {wins[k]}/30" for k in E.KINDS) +
              f"; weight-error and output-error rankings disagree on {disagree}/{n} linears")
