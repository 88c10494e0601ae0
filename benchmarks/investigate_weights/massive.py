"""Massive activations vs RMSNorm gammas, and where the readers' output error goes per token.

On the float model, 2 windows of valid.txt (1024 tokens): the gamma-free norm output
xh = x / rms(x) at every attention/MLP norm. Prints per norm: the channel with the largest |xh|,
its max |xh|, the positions where it is > 8, gamma there, and the share of the energy
sum(xh^2) vs sum((xh*gamma)^2) that channel carries.
Then, for the readers (q/k/v/gate/up) of a few layers, the per-token relative output error
||x_t dW||^2 / mean_t ||x_t W||^2 at position 0 (the sink) and elsewhere, for:
  float (gamma in the graph, W quantized), fold_only (gamma folded), rot_r1 (folded + H576),
with INT4 RTN (ort rule, group 32) and perq-onnx MSE (per channel).
Writes massive.json beside this script.
"""
import json
import pathlib
import sys

import numpy as np
import onnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import evalkit as E
import quantizers as Q
from perq_onnx.analysis import analyze
from perq_onnx.graph import import_graph, load_model
from perq_onnx.hadamard import hadamard

wins = E.windows("valid", 2)
g = import_graph(load_model(E.FLOAT_MODEL))
s = analyze(g)
norms = [(f"layers.{l.index}.{w}", n) for l in s.layers for w, n in (("attn", l.input_norm), ("mlp", l.post_norm))]
names = [n.normalized.name for _, n in norms]
gammas = {k: n.gamma().astype(np.float64) for k, n in norms}
del g, s
probe = onnx.load(str(E.FLOAT_MODEL))
for nm in names:
    probe.graph.output.append(onnx.helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None))
sess = E.session(probe)
del probe
xs = {k: [] for k, _ in norms}
for w in wins:
    outs = sess.run(names, E.feeds(sess, w[None, :]))
    for (k, _), x in zip(norms, outs):
        xs[k].append(x.reshape(-1, x.shape[-1]).astype(np.float64))
del sess
xs = {k: np.concatenate(v) for k, v in xs.items()}
pos = np.tile(np.arange(512), len(wins))
report = {"norms": {}, "tokens": len(pos)}
print("norm            ch  max|xh| positions(>8)        gamma_ch   share(xh^2)  share((xh*g)^2)")
for k, _ in norms:
    x, gm = xs[k], gammas[k]
    ch = int(np.abs(x).max(axis=0).argmax())
    mx = float(np.abs(x[:, ch]).max())
    big = sorted(set(pos[np.abs(x[:, ch]) > 8].tolist()))
    e = (x**2).sum(0)
    eg = ((x * gm) ** 2).sum(0)
    r = dict(channel=ch, max=mx, positions=big[:8], n_big=int((np.abs(x[:, ch]) > 8).sum()),
             gamma=float(gm[ch]), share=float(e[ch] / e.sum()), share_gamma=float(eg[ch] / eg.sum()))
    report["norms"][k] = r
    print(f"{k:<15} {ch:3d} {mx:7.1f}  {str(big[:5]):<22} {gm[ch]:9.5f}   {r['share']:.3f}        {r['share_gamma']:.4f}")

# per-token output error of the readers
H = hadamard(576)
variants = {v: E.Model(E.FLOAT_MODEL if v == "float" else E.WORK / f"{v}.onnx") for v in ("float", "fold_only", "rot_r1")}
layers = [0, 1, 2, 3, 5, 10, 15, 20, 25, 29]
report["token_error"] = {}
print("\nrelative output error per token (||x_t dW||^2 / mean_t ||x_t W||^2): sink (pos 0) / other tokens")
print("layer kind  rule   |  float sink / other | fold_only sink / other | rot_r1 sink / other")
for li in layers:
    for kind, nk in (("q", "attn"), ("k", "attn"), ("v", "attn"), ("gate", "mlp"), ("up", "mlp")):
        key = f"layers.{li}.{kind}"
        xh = xs[f"layers.{li}.{nk}"]
        row = {}
        for rule, grp in (("ort", 32), ("mse", None)):
            cells = []
            for v, m in variants.items():
                w = m.weight(key).astype(np.float64)
                x = xh * gammas[f"layers.{li}.{nk}"] if v == "float" else (xh if v == "fold_only" else xh @ H)
                dq = Q.quantize(rule, w.astype(np.float32), grp).astype(np.float64) - w
                y = ((x @ w) ** 2).sum(1).mean()
                e = ((x @ dq) ** 2).sum(1) / y
                cells += [float(e[pos == 0].mean()), float(e[pos != 0].mean())]
            row[f"{rule}_{grp}"] = cells
            print(f"{li:5d} {kind:<5} {rule}{grp or 'pc':<4}| " + " | ".join(
                f"{cells[2*i]:8.4f} / {cells[2*i+1]:7.4f}" for i in range(3)), flush=True)
        report["token_error"][key] = row
(pathlib.Path(__file__).resolve().parent / "massive.json").write_text(json.dumps(report, indent=1))
