"""Experiment: a genai folder whose own INT4 embedding table GatherBlockQuantized reads straight
from an initializer, rewritten to read it through a Reshape of a [V, blocks, 16] initializer
(the builder's form). Usage: embedding_via_reshape.py SRC DST (SRC: a fresh copy, no hard links)."""
import os
import shutil
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
m = onnx.load(f"{src}/model.onnx")
init = {i.name: i for i in m.graph.initializer}
t = numpy_helper.to_array(init["embed_tokens.weight_Q4"])
v, width = t.shape
m.graph.initializer.remove(init["embed_tokens.weight_Q4"])
m.graph.initializer.append(numpy_helper.from_array(t.reshape(v, width // 16, 16).copy(), "embed_tokens.weight_Q4"))
m.graph.initializer.append(numpy_helper.from_array(np.array([v, width], np.int64), "embed_rows"))
nodes = [helper.make_node("Reshape", ["embed_tokens.weight_Q4", "embed_rows"], ["embed_rows_out"], name="embed_tokens/Reshape")]
for n in m.graph.node:
    if n.op_type == "GatherBlockQuantized":
        n.input[0] = "embed_rows_out"
    nodes.append(n)
del m.graph.node[:]
m.graph.node.extend(nodes)
onnx.save_model(m, f"{dst}/model.onnx", save_as_external_data=True, location="model.onnx.data")
for f in os.listdir(src):
    if not f.startswith("model.onnx"):
        shutil.copy(f"{src}/{f}", f"{dst}/{f}")
