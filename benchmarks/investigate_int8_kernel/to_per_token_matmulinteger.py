# prototype: like to_dq.py; nodes matching TOK get per-token int8 activations (MatMulInteger), others matching DQ get DynamicQuantizeMatMul
import re, onnx, numpy as np, sys, shutil, pathlib
from onnx import numpy_helper as nh, helper as h, TensorProto as TP
src, dst, dq_re, tok_re = sys.argv[1:5]
shutil.rmtree(dst, ignore_errors=True); shutil.copytree(src, dst)
m = onnx.load(src + "/model.onnx")
inits = {i.name: i for i in m.graph.initializer}
def attr(n, k): return [onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == k][0]
new_nodes = []; drop = set(); add = [nh.from_array(np.array(127, np.float32), "c127"), nh.from_array(np.array(128, np.float32), "c128"), nh.from_array(np.array(128, np.uint8), "zp128"), nh.from_array(np.array(1e-30, np.float32), "ceps"), nh.from_array(np.array([1], np.int64), "ax1")]
for n in m.graph.node:
    tok = bool(re.search(tok_re, n.name)); dq = bool(re.search(dq_re, n.name))
    if n.op_type != "MatMulNBits" or not (tok or dq):
        new_nodes.append(n); continue
    K, N, bs = attr(n, "K"), attr(n, "N"), attr(n, "block_size")
    B = nh.to_array(inits[n.input[1]]); S = nh.to_array(inits[n.input[2]]).reshape(N, -1)
    q = np.stack([(B & 15), (B >> 4)], -1).astype(np.int16).reshape(N, -1)[:, :K] - 8
    W = q * np.repeat(S, bs, axis=1)[:, :K]
    s = np.abs(W).max(1) / 127.0; s[s == 0] = 1
    q8 = np.clip(np.round(W / s[:, None]), -127, 127).astype(np.int8).T.copy()
    drop |= {n.input[1], n.input[2]}; p = n.name
    add += [nh.from_array(q8, p + ".q8"), nh.from_array(s.astype(np.float32), p + ".s8"), nh.from_array(np.array([-1, K], np.int64), p + ".rows"), nh.from_array(np.array([1, -1, N], np.int64), p + ".back")]
    if not tok:
        new_nodes.append(h.make_node("DynamicQuantizeMatMul", [n.input[0], p + ".q8", p + ".s8"], list(n.output), name=p + "_dq", domain="com.microsoft")); continue
    x = n.input[0]
    new_nodes += [
        h.make_node("Reshape", [x, p + ".rows"], [p + "/x2"]),
        h.make_node("Abs", [p + "/x2"], [p + "/abs"]),
        h.make_node("ReduceMax", [p + "/abs", "ax1"], [p + "/amax"], keepdims=1),
        h.make_node("Max", [p + "/amax", "ceps"], [p + "/amax2"]),
        h.make_node("Div", [p + "/amax2", "c127"], [p + "/sa"]),
        h.make_node("Div", [p + "/x2", p + "/sa"], [p + "/xs"]),
        h.make_node("Round", [p + "/xs"], [p + "/xr"]),
        h.make_node("Add", [p + "/xr", "c128"], [p + "/xr8"]),
        h.make_node("Cast", [p + "/xr8"], [p + "/xq"], to=TP.UINT8),
        h.make_node("MatMulInteger", [p + "/xq", p + ".q8", "zp128"], [p + "/y32"]),
        h.make_node("Cast", [p + "/y32"], [p + "/yf"], to=TP.FLOAT),
        h.make_node("Mul", [p + "/yf", p + "/sa"], [p + "/y1"]),
        h.make_node("Mul", [p + "/y1", p + ".s8"], [p + "/y2"]),
        h.make_node("Reshape", [p + "/y2", p + ".back"], list(n.output)),
    ]
keep = [i for i in m.graph.initializer if i.name not in drop]
del m.graph.initializer[:]; m.graph.initializer.extend(keep + add)
del m.graph.node[:]; m.graph.node.extend(new_nodes)
pathlib.Path(dst + "/model.onnx.data").unlink()
onnx.save(m, dst + "/model.onnx", save_as_external_data=True, location="model.onnx.data")
