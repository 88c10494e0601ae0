"""Scaffolding: scale every per-token activation quantizer's range by c (lo*c, hi*c) and eval."""
import sys, numpy as np, onnx, pathlib, json
from onnx import helper, numpy_helper
from perq_onnx import calibration
from perq_onnx.models import resolve
from perq_onnx.evaluate import perplexity
src, split, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
clips = [float(c) for c in sys.argv[5].split(",")]
tok = calibration.load_tokenizer(pathlib.Path(resolve("smollm2")).parent)
ids = calibration.tokenize_file(f"../shared/data/wikitext-2/{split}.txt", tok)
wins = calibration.windows(ids, 512, first + count, split)[first:first + count]
m0 = onnx.load(src)
for c in clips:
    m = onnx.ModelProto(); m.CopyFrom(m0)
    nodes = list(m.graph.node); new = []
    n_edit = 0
    for n in nodes:
        if n.op_type in ("Min", "Max") and (n.name.endswith("/lo") or n.name.endswith("/hi")) and c != 1.0:
            out = n.output[0]; n.output[0] = out + "_unclipped"
            new.append(n)
            cname = n.name + "_clipc"
            m.graph.initializer.append(numpy_helper.from_array(np.array(c, np.float32), cname))
            new.append(helper.make_node("Mul", [out + "_unclipped", cname], [out], name=n.name + "_clip"))
            n_edit += 1
        else:
            new.append(n)
    del m.graph.node[:]; m.graph.node.extend(new)
    path = pathlib.Path(src).with_name(f"clip{c}.onnx")
    onnx.save(m, str(path), save_as_external_data=False) if False else None
    # keep external data location: save next to src referencing same data file
    onnx.save_model(m, str(path))
    r = perplexity(str(path), wins, threads=2, progress=False)
    print(json.dumps(dict(clip=c, split=split, first=first, count=count, ppl=r.ppl, edits=n_edit)), flush=True)
