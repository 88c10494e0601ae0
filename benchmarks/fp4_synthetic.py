"""Why a block rotation pays in MXFP4 but not in NVFP4: quantization error of i.i.d. data of three
tail weights, in each format's own blocks, with and without the aligned block Hadamard.

    python benchmarks/fp4_synthetic.py        # prints a markdown table (a few seconds)

Each cell is the relative squared error ||Q(v) - v||^2 / ||v||^2 of the numpy reference
(perq_onnx/formats.py; NVFP4's tensor scale from the data's amax, as calibration sets it) on 2^20
values, v = x (no rotation) or x with every block of 16 (NVFP4) / 32 (MXFP4) values multiplied by
H_b. A rotation turns every block towards a Gaussian: that helps a format whose one power-of-two
scale per 32 values wastes range on heavy tails (MXFP4), and hurts one whose fine E4M3 scale per
16 values already follows them, since E2M1's grid fits peaked blocks better than Gaussian ones
(NVFP4).
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from perq_onnx.formats import MXFP4, NVFP4  # noqa: E402
from perq_onnx.hadamard import hadamard  # noqa: E402

SAMPLES = 1 << 20
SOURCES = {
    "Gaussian": lambda rng, n: rng.standard_normal(n),
    "Laplace": lambda rng, n: rng.laplace(size=n),
    "Student t, 3 dof": lambda rng, n: rng.standard_t(3, size=n),
}


def relative_error(v: np.ndarray, name: str) -> float:
    fmt = NVFP4.from_amax(np.abs(v).max()) if name == "NVFP4" else MXFP4()
    q = fmt.qdq(v)
    return float(np.sum((q - v) ** 2) / np.sum(v.astype(np.float64) ** 2))


def main() -> None:
    rng = np.random.default_rng(0)
    print("| source | NVFP4 (b16) none | NVFP4 rotated | MXFP4 (b32) none | MXFP4 rotated |")
    print("|---|---|---|---|---|")
    for source, draw in SOURCES.items():
        x = draw(rng, SAMPLES).astype(np.float32).reshape(-1, 64)
        cells = []
        for name, block in (("NVFP4", 16), ("MXFP4", 32)):
            rotated = (x.reshape(-1, block) @ hadamard(block, np.float32)).reshape(x.shape)
            cells += [relative_error(x, name), relative_error(rotated, name)]
        print(f"| {source} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
