"""Collect results.jsonl into a markdown table (latest run of each config); used for FINDINGS.md."""
import json, pathlib
rows = {}
for line in (pathlib.Path(__file__).resolve().parent / "results.jsonl").read_text().splitlines():
    r = json.loads(line)
    rows[(r["variant"], r["rule"], r["group"], r["windows"])] = r
print("| variant | rule | group | windows | ppl |\n|---|---|---|---|---|")
order = ["float", "fold_only", "rot_r1", "rot_r1_rand", "keep507_r1", "rot_default"]
for k in sorted(rows, key=lambda k: (k[3], order.index(k[0]) if k[0] in order else 99, k[2], k[1])):
    r = rows[k]
    print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {r['ppl']:.2f} |")
