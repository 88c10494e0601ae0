"""Baselines on the first 32 test windows: float, and onnxruntime's MatMulNBitsQuantizer
(DefaultWeightOnlyQuantConfig = RTN, symmetric, block 32 / 128, QOperator MatMulNBits,
accuracy_level 0 i.e. float activations). lm_head is excluded (nodes_to_exclude=['/lm_head/MatMul'])
so that only the 210 decoder linears are INT4, as in perq-onnx; embeddings are Gather (not
quantized: op_types_to_quantize = MatMul only). Also checks that quantizers.ort reproduces ORT's
dequantized weights bit for bit (decoding MatMulNBits' packed B / scales).
Usage: python ort_baseline.py [float] [32] [128]
"""
import json
import logging
import sys

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E
import quantizers as Q
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, DefaultWeightOnlyQuantConfig

logging.disable(logging.INFO)   # the quantizer logs one line per node
out = {}
args = sys.argv[1:] or ["float", "32", "128"]
if "float" in args:
    out["float"] = E.ppl(E.FLOAT_MODEL)
    print("float", out["float"], flush=True)
for b in [int(a) for a in args if a.isdigit()]:
    model = onnx.load(str(E.FLOAT_MODEL))
    cfg = DefaultWeightOnlyQuantConfig(block_size=b, is_symmetric=True, accuracy_level=0)
    qz = MatMulNBitsQuantizer(model, nodes_to_exclude=["/lm_head/MatMul"], algo_config=cfg)
    qz.process()
    qm = qz.model.model
    nodes = [n for n in qm.graph.node if n.op_type == "MatMulNBits"]
    inits = {t.name: t for t in qm.graph.initializer}
    # decode one weight and compare with quantizers.ort
    ref = E.Model(E.FLOAT_MODEL)
    maxdiff = 0.0
    for n in nodes:
        if "layers.3/mlp/down_proj" not in n.name and "layers.0/self_attn/q_proj" not in n.name:
            continue
        K = [a.i for a in n.attribute if a.name == "K"][0]
        N = [a.i for a in n.attribute if a.name == "N"][0]
        kb = -(-K // b)   # ORT zero-pads K up to a multiple of the block (576 = 4.5 x 128)
        packed = numpy_helper.to_array(inits[n.input[1]]).reshape(N, kb, b // 2)
        sc = numpy_helper.to_array(inits[n.input[2]]).reshape(N, kb)
        lo, hi = packed & 0xF, packed >> 4
        codes = np.stack([lo, hi], -1).reshape(N, kb, b).astype(np.int32) - 8
        deq = (codes * sc[:, :, None]).reshape(N, kb * b)[:, :K].T
        key = "layers.3.down" if "down_proj" in n.name else "layers.0.q"
        w = ref.weight(key)
        pad = (-w.shape[0]) % b
        mine = Q.quantize("ort", np.pad(w, ((0, pad), (0, 0))), b)[: w.shape[0]]
        maxdiff = max(maxdiff, float(np.abs(deq - mine).max()))
    print(f"ORT block {b}: {len(nodes)} MatMulNBits; max |ORT dequant - quantizers.ort| = {maxdiff:.3g}", flush=True)
    out[f"ort_rtn_sym_b{b}"] = E.ppl(qm)
    print(f"ort_rtn_sym_b{b}", out[f"ort_rtn_sym_b{b}"], flush=True)
print(json.dumps(out))
