"""Every float variant must have the float model's logits: perq_onnx.evaluate.compare_logits
(2 x 16 random tokens, onnxruntime 1 thread)."""
import sys
sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E
from perq_onnx.evaluate import compare_logits

for v in sys.argv[1:] or ["fold_only", "rot_r1", "rot_r1_rand", "rot_default", "keep507_r1"]:
    d = compare_logits(E.FLOAT_MODEL, E.WORK / f"{v}.onnx", threads=1)
    print(f"{v}: max |dlogit| {d.max_abs:.2e}, relative {d.relative:.2e}", flush=True)
