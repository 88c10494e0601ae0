"""The float passes preserve the function: original and rewritten models give the same logits in
onnxruntime on random tokens, for every architecture, cache layout, tying, permutation method,
block size and residual rotation."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from perq_onnx.calibration import generate
from perq_onnx.pipeline import calibrate, optimize
from perq_onnx.settings import Settings

from conftest import MODELS, model_id, random_ids, relative_difference

TOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS, ids=model_id)
def test_no_quant_output_equals_input(tiny_models, tmp_path, model):
    path = tiny_models(*model)
    stats = calibrate(path, generate(path, 2, 32, seed=0), progress=False)
    ids = random_ids()
    worst = 0.0
    for permute in ("massdiff", "zigzag", "random", "none"):
        for block in (16, 32, 64):
            for residual in ("full", "block"):
                out = tmp_path / f"{permute}-{block}-{residual}.onnx"
                optimize(path, out, Settings.parse(block=str(block), permute=permute, residual_rotation=residual,
                                            quantize=False), stats=stats, progress=False)
                diff = relative_difference(path, out, ids)
                assert diff < TOL, (permute, block, residual, diff)
                worst = max(worst, diff)
                out.unlink()
    assert worst > 0.0  # the rewrite did change the weights


@pytest.mark.slow
@pytest.mark.parametrize("block", ["full", "none"])
def test_full_and_no_online_rotation_exact(tiny_models, tmp_path, block):
    path = tiny_models("llama", past=True, tied=True)
    out = tmp_path / "out.onnx"
    optimize(path, out, Settings.parse(block=block, quantize=False), progress=False)
    assert relative_difference(path, out, random_ids()) < TOL


@pytest.mark.slow
def test_rewrite_really_permutes_and_rotates(tiny_models, tmp_path):
    """The exactness above is not vacuous: weights change, one BlockHadamard per layer appears,
    and the down_proj input seen by the online rotation is the calibrated permutation."""
    path = tiny_models("llama")
    out = tmp_path / "out.onnx"
    report = optimize(path, out, Settings.parse(block="16", quantize=False), progress=False)
    model = onnx.load(out)
    bh = [n for n in model.graph.node if n.op_type == "BlockHadamard"]
    assert len(bh) == 2 and all(n.domain == "perq" for n in bh)
    assert [f.name for f in model.functions] == ["BlockHadamard"]
    p = report.permutations["layers.0.mlp"]
    assert sorted(p) == list(range(256)) and not np.array_equal(p, np.arange(256))
    w_in = {i.name: i for i in onnx.load(path).graph.initializer}
    w_out = {i.name: i for i in model.graph.initializer}
    assert not set(w_in) & {n for n in w_out if "MatMul" in n}  # every linear weight was rewritten


@pytest.mark.slow
def test_input_model_is_never_modified(tiny_models, tmp_path):
    path = tiny_models("qwen2", past=True)
    before = path.read_bytes()
    optimize(path, tmp_path / "out.onnx", Settings.parse(block="32"), progress=False)
    assert path.read_bytes() == before
