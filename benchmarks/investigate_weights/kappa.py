"""Predicted output-error penalty of folding gamma and then rotating (vs quantizing W with gamma kept
on the activation side), per RMSNorm, from calibration second moments (fold_only grams = E[xh^2],
xh the gamma-free norm output, valid 8x512): with isotropic rounding noise after the rotation,
  kappa = mean_j(gamma_j^2) * sum_j E[xh_j^2] / sum_j E[xh_j^2] gamma_j^2
(= 1 when activation energy and gamma^2 are uncorrelated; > 1 when the high-energy channels have
small gammas). Also kappa without channel 507."""
import sys
import numpy as np
sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E
import grams as G
from perq_onnx.analysis import analyze
from perq_onnx.graph import import_graph, load_model

s = analyze(import_graph(load_model(E.FLOAT_MODEL)))
st = G.load("fold_only")
print("layer  kappa_attn kappa_mlp | without ch507: attn mlp | E[xh_507^2]/mean E[xh^2] attn mlp")
rows = []
for layer in s.layers:
    out = []
    for nm, norm in (("attn_in", layer.input_norm), ("mlp_in", layer.post_norm)):
        g2 = norm.gamma().astype(np.float64) ** 2
        e = np.diag(st[f"gram/layers.{layer.index}.{nm}"]).astype(np.float64)
        k = g2.mean() * e.sum() / (e * g2).sum()
        m = np.ones_like(e, bool)
        m[507] = False
        k2 = g2[m].mean() * e[m].sum() / (e[m] * g2[m]).sum()
        out.append((k, k2, e[507] / e.mean()))
    rows.append(out)
    print(f"{layer.index:5d}  {out[0][0]:8.2f}  {out[1][0]:8.2f} | {out[0][1]:8.2f} {out[1][1]:8.2f} | {out[0][2]:8.1f} {out[1][2]:8.1f}")
a = np.array([[o[0][0], o[1][0]] for o in rows])
print(f"mean kappa attn {a[:,0].mean():.2f}, mlp {a[:,1].mean():.2f}")
