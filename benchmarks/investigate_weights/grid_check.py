"""The float weights are Q4_1-dequantized: count distinct values per 32-row block of each weight
column (the MatMulNBits / --w-group 32 grouping) for every decoder linear of a model variant."""
import sys
import numpy as np
sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E
import grams as G

for variant in sys.argv[1:] or ["float", "fold_only", "rot_r1"]:
    m = E.Model(G.model_path(variant))
    nd, nd_shift = [], []
    for key in m.linears:
        w = m.weight(key)
        rows, cols = w.shape
        b = np.sort(w.reshape(rows // 32, 32, cols), axis=1)
        nd.append(((np.diff(b, axis=1) != 0).sum(1) + 1).mean())
        bs = np.sort(np.roll(w, 16, axis=0).reshape(rows // 32, 32, cols), axis=1)
        nd_shift.append(((np.diff(bs, axis=1) != 0).sum(1) + 1).mean())
    print(f"{variant}: distinct values per 32-row block, mean over 210 linears: {np.mean(nd):.2f} "
          f"(max over linears {np.max(nd):.2f}); blocks offset by 16 rows: {np.mean(nd_shift):.2f}")
