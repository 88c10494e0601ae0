"""The restructured pipeline against perq-onnx 0.1 (commit b20a58f) on SmolLM2.

    python benchmarks/old_vs_new.py [--windows 8] [--calib-samples 8]

Extracts 0.1 from git into a temporary folder (its package layout rebuilt so that it imports as
`perq_onnx`), runs both versions' `perq-onnx optimize` on the SmolLM2 recipe with the same
calibration text, and compares (1) the `--no-quant` outputs' logits with each other and with the
input, (2) the default W4A4 outputs' perplexity on the first WikiText-2 test windows.
Results: benchmarks/results/old_vs_new.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

from perq_onnx.evaluate import compare_logits
from perq_onnx.models import smollm2

ROOT = pathlib.Path(__file__).resolve().parent
REPO = ROOT.parent
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
OLD = "b20a58f"


def extract_old(dest: pathlib.Path) -> pathlib.Path:
    """0.1's sources laid out as an importable perq_onnx package under dest."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD, "perq_onnx", "passes", "models"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest / "src", filter="data")
    pkg = dest / "perq_onnx"
    (dest / "src" / "perq_onnx").rename(pkg)
    (dest / "src" / "passes").rename(pkg / "passes")
    (dest / "src" / "models").rename(pkg / "models")
    return dest


def cli(pythonpath: str | None, *args) -> str:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    r = subprocess.run([sys.executable, "-m", "perq_onnx.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=tempfile.gettempdir())
    if r.returncode:
        raise SystemExit(f"perq-onnx {' '.join(map(str, args))} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=8)
    args = ap.parse_args()
    model = smollm2.onnx_path()
    calib = ["--calib-data", DATA / "valid.txt", "--calib-samples", args.calib_samples]
    results = {"model": "SmolLM2-135M-Instruct (fp32 recipe)", "old": OLD, "windows": args.windows,
               "calibration": f"WikiText-2 valid, {args.calib_samples} x 512"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        old_path = str(extract_old(tmp / "old"))
        for name, path in (("old", old_path), ("new", None)):
            cli(path, "optimize", model, "-o", tmp / name / "float.onnx", "--no-quant", *calib)
            cli(path, "optimize", model, "-o", tmp / name / "w4a4.onnx", *calib)
        d = compare_logits(tmp / "old" / "float.onnx", tmp / "new" / "float.onnx", batch=2, seq_len=64)
        d_in = compare_logits(model, tmp / "new" / "float.onnx", batch=2, seq_len=64)
        results["no_quant"] = {"old_vs_new_relative": d.relative, "input_vs_new_relative": d_in.relative}
        for name in ("old", "new"):
            out = cli(None, "eval", tmp / name / "w4a4.onnx", DATA / "test.txt", "--max-windows", args.windows)
            results[f"w4a4_ppl_{name}"] = float(out.split()[1])
    (ROOT / "results" / "old_vs_new.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
