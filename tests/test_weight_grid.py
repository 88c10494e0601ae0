"""perq_onnx.weight_grid: telling weights dequantized from a 4-bit block file from trained ones."""
from __future__ import annotations

import numpy as np

from perq_onnx.weight_grid import grid_report, on_grid


def q4_1_dequantized(rows=256, cols=24, block=32, seed=0) -> np.ndarray:
    """What a Q4_1 GGUF dequantizes to: per block of 32 rows of a column, d * q + m, q in 0..15."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(rows, cols))
    d = np.repeat(rng.uniform(0.001, 0.02, size=(rows // block, cols)), block, axis=0)
    m = np.repeat(rng.uniform(-0.1, 0.0, size=(rows // block, cols)), block, axis=0)
    return (d * q + m).astype(np.float32)


def test_dequantized_file_blocks_are_on_the_grid_and_shifted_blocks_are_not():
    w = q4_1_dequantized()
    assert on_grid(w).all()
    assert on_grid(w, offset=16).mean() < 0.05
    report = grid_report([w, q4_1_dequantized(seed=1)])
    assert report.aligned == 1.0 and report.shifted < 0.05 and report.from_low_bit_file
    assert "grid recovery" in str(report)


def test_trained_weights_are_not_on_a_grid():
    w = np.random.default_rng(2).standard_normal((256, 24)).astype(np.float32)
    assert not on_grid(w).any()
    report = grid_report([w])
    assert report.aligned == 0.0 and not report.from_low_bit_file


def test_constant_and_few_level_blocks_count_and_more_levels_do_not():
    w = np.zeros((64, 3), np.float32)
    w[:, 1] = np.tile(np.arange(32) % 4, 2) * 0.25     # 4 levels
    w[:, 2] = np.tile(np.arange(32), 2) * 0.1          # 32 levels: not a 16-level grid
    grid = on_grid(w)
    assert grid[:, 0].all() and grid[:, 1].all() and not grid[:, 2].any()
    assert on_grid(w, levels=32)[:, 2].all()


def test_rotation_destroys_the_grid():
    w = q4_1_dequantized()
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((256, 256)))
    assert on_grid(q @ w).mean() < 0.05


def test_inspect_reports_the_grid(tmp_path):
    """`perq-onnx inspect --grid` on a decoder: random weights are on no grid."""
    import subprocess
    import sys

    from handmade import build_decoder
    path = build_decoder(tmp_path / "model.onnx")
    r = subprocess.run([sys.executable, "-m", "perq_onnx.cli", "inspect", str(path), "--grid"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "0.0% of 32-row blocks on a 16-level grid" in r.stdout and "no low-bit block grid" in r.stdout
