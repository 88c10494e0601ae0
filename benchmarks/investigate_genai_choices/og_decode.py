import sys, time, statistics, numpy as np, onnxruntime_genai as og
folders = sys.argv[1:]
models = {f: og.Model(f) for f in folders}
ids = np.arange(100, 612, dtype=np.int32)
def run(m, steps=256):
    p = og.GeneratorParams(m); p.set_search_options(max_length=len(ids) + steps + 1, do_sample=False)
    g = og.Generator(m, p); g.append_tokens(ids); ts = []
    for _ in range(steps):
        t = time.perf_counter(); g.generate_next_token(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
for m in models.values(): run(m, 8)
res = {f: [] for f in folders}
import random
rng = random.Random(0)
for r in range(int(__import__("os").environ.get("ROUNDS", 5))):
    order = list(models); rng.shuffle(order)
    for f in order: res[f].append(run(models[f]) * 1e3)
for f, v in res.items(): print(f"{f:60s} median {statistics.median(v):6.2f} ms  ", " ".join(f"{x:.2f}" for x in v))
