"""Valid-window ppl (windows 32-47; calibration 0-31, deploy.py's stats) of genai folders built
with the current perq-onnx: a name picks the options (containing "tied" / "int8": --embedding;
"noR3": --block none); "cache:NAME" evaluates deploy.py's cached folder NAME instead."""
import pathlib
import sys

import numpy as np

from perq_onnx import pipeline, calibration
from perq_onnx.evaluate import perplexity
from perq_onnx.models import resolve
from perq_onnx.settings import Settings
DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2"
plain = resolve("smollm2"); tok = calibration.load_tokenizer(plain.parent)
valid_all = calibration.windows(calibration.tokenize_file(DATA / "valid.txt", tok), 512, 48, "valid.txt")
calib, held = valid_all[:32], valid_all[32:48]
stats = dict(np.load(pathlib.Path("~/.cache/perq-onnx/deploy/stats.npz").expanduser()))
for name in sys.argv[1:]:
    folder = pathlib.Path(f"/tmp/genai-choices/{name}")
    if name.startswith("/"):
        folder = pathlib.Path(name)
    elif name.startswith("cache:"):
        folder = pathlib.Path("~/.cache/perq-onnx/deploy").expanduser() / name[6:]
    else:
        opts = dict(target="genai")
        if "noR3" in name:
            opts["block"] = "none"
        for form in ("tied", "int8"):
            if form in name:
                opts["embedding"] = form
        if not (folder / "genai_config.json").is_file():
            pipeline.optimize(plain, folder / "model.onnx", Settings.parse(**opts), stats=stats, progress=False, batches=calib)
    p = perplexity(folder / "model.onnx", held, threads=2, progress=False)
    print(name, f"valid 32-47 ppl {p.ppl:.3f}", flush=True)
