"""Experiment: the perq-genai folder with gate_up MatMulNBits + Split replaced by two MatMulNBits."""
import onnx, numpy as np, sys, os, shutil
from onnx import numpy_helper, helper
src, dst = sys.argv[1], sys.argv[2]
shutil.rmtree(dst, ignore_errors=True); os.makedirs(dst)
m = onnx.load(f"{src}/model.onnx")
inits = {i.name: i for i in m.graph.initializer}
nodes = list(m.graph.node); out = []
by_out = {o: n for n in nodes for o in n.output}
consumers = {}
for n in nodes:
    for i in n.input: consumers.setdefault(i, []).append(n)
skip = set()
for n in nodes:
    if n.op_type == "Split" and by_out[n.input[0]].op_type == "MatMulNBits":
        mm = by_out[n.input[0]]; skip.add(mm.name)
        attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}
        N = attrs["N"] // 2
        for part, (lo, hi) in enumerate(((0, N), (N, 2 * N))):
            new_in = [mm.input[0]]
            for idx in range(1, len(mm.input)):
                a = numpy_helper.to_array(inits[mm.input[idx]])
                name = f"{mm.input[idx]}_{part}"
                m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(a[lo:hi]), name))
                new_in.append(name)
            out.append(helper.make_node("MatMulNBits", new_in, [n.output[part]], name=f"{mm.name}_{part}", domain="com.microsoft", **{**attrs, "N": N}))
        skip.add(n.name)
for n in nodes:
    if n.name in skip:
        if n.op_type == "MatMulNBits": continue
        continue
    out.append(n)
del m.graph.node[:]; m.graph.node.extend(out)
used = {i for n in out for i in n.input}
keep = [i for i in m.graph.initializer if i.name in used]
del m.graph.initializer[:]; m.graph.initializer.extend(keep)
onnx.save_model(m, f"{dst}/model.onnx", save_as_external_data=True, location="model.onnx.data")
for f in os.listdir(src):
    if f not in ("model.onnx", "model.onnx.data"): shutil.copy(f"{src}/{f}", dst)
print("ok", sum(n.op_type == "MatMulNBits" for n in out))
