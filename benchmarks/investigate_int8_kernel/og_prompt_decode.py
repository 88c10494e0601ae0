import sys, time, statistics, numpy as np, onnxruntime_genai as og, random, os
folders = sys.argv[1:]
models = {f: og.Model(f) for f in folders}
ids = np.arange(100, 612, dtype=np.int32)
def run(m, steps=128):
    p = og.GeneratorParams(m); p.set_search_options(max_length=len(ids) + steps + 1, do_sample=False)
    g = og.Generator(m, p); t = time.perf_counter(); g.append_tokens(ids); pre = time.perf_counter() - t; ts = []
    for _ in range(steps):
        t = time.perf_counter(); g.generate_next_token(); ts.append(time.perf_counter() - t)
    return pre, statistics.median(ts)
for m in models.values(): run(m, 8)
res = {f: [] for f in folders}
rng = random.Random(0)
for r in range(int(os.environ.get("ROUNDS", 5))):
    order = list(models); rng.shuffle(order)
    for f in order: res[f].append(run(models[f]))
base = statistics.median(p for p, _ in res[folders[0]])
for f, v in res.items():
    pre = statistics.median(p for p, _ in v); dec = statistics.median(d for _, d in v)
    print(f"{f:45s} prompt {pre*1e3:7.1f} ms ({base/pre:4.2f}x first)  decode {dec*1e3:6.2f} ms/token")
