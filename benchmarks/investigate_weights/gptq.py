"""GPTQ (Frantar et al. 2022) for a [in, out] MatMul weight with H = X^T X [in, in], symmetric
INT4, scales per output column (group None) or per group of g input rows computed from the
error-updated weights when the group starts. Rule names: 'gptq' (absmax/7 scales) or 'gptq_mse'
(perq-onnx MSE-searched scales) or 'gptq_ort' (m/-8 scales). Reference point for what an
output-aware quantizer buys; not a proposal for the first fix (it needs the Hessians at compile time).
"""
import numpy as np
import torch

import quantizers as Q


def _scales(wt, rule):
    # wt: [rows, cols] torch -> scale [1, cols] via the chosen rule (computed on these rows)
    w = wt.numpy().astype(np.float32)
    if rule == "gptq_ort":
        idx = np.abs(w).argmax(axis=0)
        m = w[idx, np.arange(w.shape[1])]
        s = m / -8.0
        s[s == 0] = 1.0
        return torch.from_numpy(s[None, :].astype(np.float64))
    if rule == "gptq_mse":
        q = Q.mse(w, None)
        # recover alpha*amax/7 from the fake-quantized column: max|q| / max code
        amax = np.abs(w).max(axis=0).clip(1e-12)
        # rerun the search to get the scale directly
        import quantizers
        wt2 = torch.from_numpy(w)[None]
        a = torch.from_numpy(amax)[None, None]
        alpha = quantizers._search(wt2, a, 7, torch.linspace(1.0, 0.2, 17), torch.ones(1, w.shape[0], 1))
        fine = [torch.clamp(alpha + 0.05 * k / 5, 0.05, 1.0) for k in range(-5, 6)]
        alpha = quantizers._search(wt2, a, 7, fine, torch.ones(1, w.shape[0], 1))
        return (alpha * a / 7).reshape(1, -1).double()
    return torch.from_numpy((np.abs(w).max(axis=0).clip(1e-12) / 7)[None, :].astype(np.float64))


def gptq(w, H, group=None, rule="gptq", percdamp=0.01, block=128):
    W = torch.from_numpy(np.asarray(w, np.float64)).clone()   # [in, out]
    rows, cols = W.shape
    H = torch.from_numpy(np.asarray(H, np.float64)).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[dead, :] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(rows, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Qw = torch.zeros_like(W)
    scale = None if group else _scales(W, rule)
    for i1 in range(0, rows, block):
        i2 = min(i1 + block, rows)
        W1 = W[i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            r = i1 + i
            if group and r % group == 0:
                scale = _scales(torch.cat([W1[i:], W[i2:]], 0)[:group], rule)
            wrow = W1[i]
            q = torch.clamp(torch.round(wrow / scale[0]), -8, 7) * scale[0]
            Q1[i] = q
            d = Hinv1[i, i]
            err = (wrow - q) / d
            W1[i:] -= Hinv1[i, i:, None] * err[None, :]
            Err1[i] = err
        Qw[i1:i2] = Q1
        W[i2:] -= Hinv[i1:i2, i2:].T @ Err1
    return Qw.numpy().astype(np.float32)
