"""Write the float (unquantized) variants the weight experiments start from, into $IW_WORK
(default /tmp/iw): every one has the same logits as the float model (checked in check_models).

  rot_default : perq-onnx default rotations, --no-quant (R1 full Hadamard 576 with gammas folded,
                R2, P3 massdiff, R3 b=16), calibration valid.txt 32x512
  rot_r1      : R1 only (gammas folded + full Hadamard 576)
  fold_only   : gammas folded into the readers, no rotation
  rot_r1_rand : gammas folded + seeded random orthogonal 576 (instead of the Paley-based Hadamard)
  r2p3r3      : --residual-rotation none (R2 + P3 massdiff + R3 b=16), no gamma fold
"""
import sys
import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__file__))
import evalkit as E
from perq_onnx.pipeline import Options, optimize
from perq_onnx.graph import load_model, import_graph, export_model, save_model
from perq_onnx.analysis import analyze
from perq_onnx.passes.base import Context
from perq_onnx.passes.fold_norm_gammas import FoldNormGammas
from perq_onnx.passes.rotate_residual import RotateResidual
from perq_onnx.hadamard import random_orthogonal

E.WORK.mkdir(parents=True, exist_ok=True)
VALID = str(E.DATA / "valid.txt")
which = sys.argv[1:] or ["rot_r1", "fold_only", "rot_r1_rand", "rot_default", "r2p3r3"]


def custom(out, passes):
    g = import_graph(load_model(E.FLOAT_MODEL))
    s = analyze(g)
    ctx = Context(g, s)
    for p in passes:
        print(" ", p(ctx).summary)
    save_model(export_model(g, [], None), out)


for name in which:
    out = E.WORK / f"{name}.onnx"
    print(name, "->", out, flush=True)
    if name == "rot_default":
        optimize(E.FLOAT_MODEL, out, Options(quantize=False, calib_data=VALID, threads=1), progress=False)
    elif name == "rot_r1":
        optimize(E.FLOAT_MODEL, out, Options(quantize=False, block="none", permute="none",
                                             head_rotation=False, threads=1), progress=False)
    elif name == "r2p3r3":
        optimize(E.FLOAT_MODEL, out, Options(quantize=False, residual_rotation="none",
                                             calib_data=VALID, threads=1), progress=False)
    elif name == "fold_only":
        custom(out, [FoldNormGammas()])
    elif name == "rot_r1_rand":
        custom(out, [FoldNormGammas(), RotateResidual(random_orthogonal(576, 0), "random orthogonal 576")])
