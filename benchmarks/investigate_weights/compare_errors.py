"""Per-layer OUTPUT-error ratio between two variants (from errors_<variant>.json in $IW_WORK),
for one rule/group: python compare_errors.py A B RULE GROUP"""
import json
import sys
import numpy as np
sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E

a, b, rule, group = sys.argv[1:5]
ea = json.loads((E.WORK / f"errors_{a}.json").read_text())
eb = json.loads((E.WORK / f"errors_{b}.json").read_text())
print(f"output error {b} / {a} ({rule}, {group}); columns: " + " ".join(E.KINDS))
for i in range(30):
    r = [eb[f"layers.{i}.{k}|{rule}|{group}"][1] / ea[f"layers.{i}.{k}|{rule}|{group}"][1] for k in E.KINDS]
    va = [ea[f"layers.{i}.{k}|{rule}|{group}"][1] for k in E.KINDS]
    print(f"layer {i:2d}: " + " ".join(f"{x:6.2f}" for x in r) + "   | " + a + ": " + " ".join(f"{x:.4f}" for x in va))
