"""Scaffolding: rotation_choice.weight_errors on SmolLM2 (relative errors) for a rounding/group."""
import sys, numpy as np, pathlib, tempfile, json, time
from perq_onnx import calibration, rotation_choice
from perq_onnx.analysis import analyze
from perq_onnx.calibration import Calibrator
from perq_onnx.graph import load_graph
from perq_onnx.models import resolve
from perq_onnx.passes.base import Context
from perq_onnx.plan import ModelShape, make_plan
from perq_onnx.rounding import WeightQuant
from perq_onnx.settings import Settings
from perq_onnx.weights import WeightStore
rounding, group = sys.argv[1], (None if sys.argv[2] == "pc" else int(sys.argv[2]))
src = resolve("smollm2")
tok = calibration.load_tokenizer(pathlib.Path(src).parent)
ids = calibration.tokenize_file("../shared/data/wikitext-2/valid.txt", tok)
graph = load_graph(src); tmp = pathlib.Path(tempfile.mkdtemp())
ctx = Context(graph, analyze(graph), WeightStore(tmp)); ctx.calibrator = Calibrator(calibration.windows(ids, 512, 8, "valid"), 2, False)
s = Settings.parse(target="simulate", a_bits=16, w_clip="act", rounding=rounding, block="none", permute="none")
plan = make_plan(s.replace(residual_rotation="full"), ModelShape.of(ctx.structure))
t = time.time()
e = rotation_choice.weight_errors(ctx, s, WeightQuant(4, group, True, "act", True), plan.residual, plan.heads, progress=False)
print(json.dumps(dict(rounding=rounding, group=group, errors=e, ratios={k: b / a for k, (a, b) in e.items()}, seconds=time.time() - t)), flush=True)
