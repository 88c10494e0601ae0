"""Calibration statistics per model variant: X^T X (float64) and per-channel max|x| of every
decoder linear's input, on the first N windows of valid.txt (default 8 x 512 = 4096 tokens; rot_r1 and rot_r1_rand are
derived exactly from fold_only by Q^T H Q).
Saved (float32) to $IW_WORK/grams_<variant>.npz keyed by input ("layers.i.{attn_in,o_in,mlp_in,down_in}").
Usage: python grams.py VARIANT [N]   (VARIANT: float | fold_only | rot_r1 | rot_r1_rand | rot_default | r2p3r3)
"""
import sys
import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E


ROLE = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
        "down": "down_in"}


def role(key):
    i, kind = key.split(".")[1:]
    return f"layers.{i}.{ROLE[kind]}"


def load(variant):
    z = np.load(E.WORK / f"grams_{variant}.npz")
    return {k: z[k] for k in z.files}


def model_path(variant):
    return E.FLOAT_MODEL if variant == "float" else E.WORK / f"{variant}.onnx"


def derive_rotated(src, dst, q, d=None):
    """Grams of a residual-rotated variant from the gamma-folded one: reader inputs become X Q, so
    X^T X -> Q^T (X^T X) Q; o_proj / down_proj inputs are unchanged by R1 alone."""
    st = load(src)
    out = {}
    for k, v in st.items():
        if k.startswith("gram/") and (k.endswith("attn_in") or k.endswith("mlp_in")):
            v = v.astype(np.float64)
            if d is not None:   # kept gamma on the activation side: X -> X diag(d)
                v = d[:, None] * v * d[None, :]
            v = (q.T @ v @ q).astype(np.float32)
        elif k.startswith("amax/") and (k.endswith("attn_in") or k.endswith("mlp_in")):
            v = np.full_like(v, np.nan)   # not derivable
        out[k] = v
    np.savez(E.WORK / f"grams_{dst}.npz", **out)


if __name__ == "__main__":
    variant = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    if variant.startswith("keep507_r1"):   # partial fold: the kept gamma stays on the inputs
        import make_keep
        from perq_onnx.analysis import analyze
        from perq_onnx.graph import import_graph, load_model
        s = analyze(import_graph(load_model(FLOAT_MODEL_PATH := E.FLOAT_MODEL)))
        gam = {}
        for layer in s.layers:
            for nm, norm in (("attn_in", layer.input_norm), ("mlp_in", layer.post_norm)):
                g = norm.gamma().astype(np.float64)
                d = np.ones_like(g)
                d[507] = g[507]
                gam[f"layers.{layer.index}.{nm}"] = d
        st = load("fold_only")
        q = make_keep.q_keep(576, [507])
        out = {}
        for k, v in st.items():
            r = k.split("/", 1)[-1]
            if k.startswith("gram/") and r in gam:
                v = v.astype(np.float64)
                v = (q.T @ (gam[r][:, None] * v * gam[r][None, :]) @ q).astype(np.float32)
            elif k.startswith("amax/") and r in gam:
                v = np.full_like(v, np.nan)
            out[k] = v
        np.savez(E.WORK / f"grams_{variant}.npz", **out)
        print(variant, "derived from fold_only")
        sys.exit(0)
    if variant in ("rot_r1", "rot_r1_rand"):   # derived exactly from fold_only's grams
        from perq_onnx.hadamard import hadamard, random_orthogonal
        derive_rotated("fold_only", variant, hadamard(576) if variant == "rot_r1" else random_orthogonal(576, 0))
        print(variant, "derived from fold_only")
        sys.exit(0)
    m = E.Model(model_path(variant))
    st = m.grams(E.windows("valid", n))
    out = {}
    for key, inp in m.inputs.items():   # one entry per distinct input (q/k/v share, gate/up share)
        r = role(key)
        out[f"gram/{r}"] = st["gram"][inp].astype(np.float32)
        out[f"amax/{r}"] = st["amax"][inp]
    out["tokens"] = np.array(st["tokens"])
    np.savez(E.WORK / f"grams_{variant}.npz", **out)
    print(variant, "tokens", st["tokens"])
