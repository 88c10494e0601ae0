# prototype: MatMulNBits (4-bit, block, symmetric zp 8) -> DynamicQuantizeMatMul with per-column int8 weights
import re, onnx, numpy as np, sys, shutil, pathlib
from onnx import numpy_helper as nh, helper as h
src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[3]   # mode: all | nolm
shutil.rmtree(dst, ignore_errors=True); shutil.copytree(src, dst)
m = onnx.load(src + "/model.onnx")
inits = {i.name: i for i in m.graph.initializer}
def attr(n, k): return [onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == k][0]
new_nodes = []; drop = set(); add = []
for n in m.graph.node:
    if n.op_type != "MatMulNBits" or not re.search(mode, n.name):
        new_nodes.append(n); continue
    K, N, bs = attr(n, "K"), attr(n, "N"), attr(n, "block_size")
    assert len(n.input) == 3, n.name
    B = nh.to_array(inits[n.input[1]]); S = nh.to_array(inits[n.input[2]]).reshape(N, -1)
    lo = (B & 15).astype(np.int16); hi = (B >> 4).astype(np.int16)
    q = np.stack([lo, hi], -1).reshape(N, -1)[:, :K] - 8          # [N, K]
    W = q * np.repeat(S, bs, axis=1)[:, :K]                          # [N, K]
    s = np.abs(W).max(1) / 127.0; s[s == 0] = 1
    q8 = np.clip(np.round(W / s[:, None]), -127, 127).astype(np.int8).T.copy()   # [K, N]
    drop |= {n.input[1], n.input[2]}
    add += [nh.from_array(q8, n.name + ".q8"), nh.from_array(s.astype(np.float32), n.name + ".s8")]
    new_nodes.append(h.make_node("DynamicQuantizeMatMul", [n.input[0], n.name + ".q8", n.name + ".s8"], list(n.output), name=n.name + "_dq", domain="com.microsoft"))
keep = [i for i in m.graph.initializer if i.name not in drop]
del m.graph.initializer[:]; m.graph.initializer.extend(keep + add)
del m.graph.node[:]; m.graph.node.extend(new_nodes)
pathlib.Path(dst + "/model.onnx.data").unlink()
onnx.save(m, dst + "/model.onnx", save_as_external_data=True, location="model.onnx.data")
