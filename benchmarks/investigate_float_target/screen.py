"""Screen for --float-target on held-out *valid* windows 32-47 (calibration: valid windows 0-31),
W4A4 simulate, b16 massdiff, --w-clip act; argv[1]: a cache folder, argv[2]: a JSON object
{name: extra settings}, e.g.

    python benchmarks/investigate_float_target/screen.py ROOT '{"gptq": {"rounding": "gptq", "a_clip": 0.8},
        "gptq-ft": {"rounding": "gptq", "a_clip": 0.8, "float_target": true}}'

Models and statistics are cached under ROOT."""
import sys, json, pathlib, time
import numpy as np
from perq_onnx import calibration
from perq_onnx.pipeline import optimize, calibrate
from perq_onnx.evaluate import perplexity
from perq_onnx.models import resolve
from perq_onnx.settings import Settings
plain = resolve("smollm2")
tok = calibration.load_tokenizer(plain.parent)
valid = calibration.windows(calibration.tokenize_file((pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2" / "valid.txt"), tok), 512, 48, "valid.txt")
calib, held = valid[:32], valid[32:48]
root = pathlib.Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
stats_file = root / "stats.npz"
if stats_file.exists():
    stats = dict(np.load(stats_file))
else:
    stats = calibrate(plain, calib, threads=2, progress=False); np.savez(stats_file, **stats)
res = {}
for name, extra in json.loads(sys.argv[2]).items():
    s = Settings.parse(target="simulate", w_bits=4, a_bits=4, w_clip="act", block="16", permute="massdiff",
                       threads=2, **extra)
    out = root / name / "model.onnx"
    t = time.time()
    if not out.exists():
        optimize(plain, out, s, stats=stats, batches=calib, progress=False)
    p = perplexity(out, held, threads=2, progress=False)
    res[name] = p.ppl
    print(name, extra, f"valid 32-47 ppl {p.ppl:.3f}", f"{time.time() - t:.0f} s", flush=True)
