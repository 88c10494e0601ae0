"""make_plan and the channel transforms, without ONNX.

The plan is built from a ModelShape and channel statistics only: its rotations must be
orthogonal, its permutations valid and calibrated (the permutation module's result on the given
statistics), its errors must name the option and the node. The transforms' folds must cancel
between producer and consumer for every orthogonal kind, also when a fold is processed in
chunks, and match the matrix they claim to be.
"""
from __future__ import annotations

import numpy as np
import pytest

from perq_onnx import permutation, transforms
from perq_onnx.errors import PerqError
from perq_onnx.hadamard import hadamard, random_orthogonal
from perq_onnx.plan import ModelShape, make_plan
from perq_onnx.settings import (OPTIONS, ActivationConfig, CalibrationConfig, RotationConfig, Settings,
                                WeightConfig)
from perq_onnx.transforms import (BlockDiagonal, Chain, Dense, Diagonal, Kron, Permutation, fold_consumed,
                                  fold_produced)

NAMES = {"hidden": "model/lm_head/MatMul", "intermediate": "model/layers.0/mlp/down_proj/MatMul",
         "head_dim": "model/layers.0/attn/v_proj/MatMul"}
SHAPE = ModelShape(hidden=64, intermediate=128, head_dim=16, layers=2, names=NAMES)


def stats(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    heavy = lambda n: np.abs(rng.standard_normal(n)) * np.where(rng.random(n) < 0.1, 30.0, 1.0)  # noqa: E731
    return {"residual": heavy(64), "layers.0.mlp": heavy(128), "layers.1.mlp": heavy(128)}


def assert_orthogonal(m: np.ndarray) -> None:
    np.testing.assert_allclose(m @ m.T, np.eye(m.shape[0]), atol=1e-12)


def is_permutation(p, n) -> bool:
    return np.array_equal(np.sort(p), np.arange(n))


# ------------------------------------------------------------------------------------- plans

def test_full_residual_rotation_is_orthogonal():
    plan = make_plan(Settings.parse(block="16", residual_rotation="full"), SHAPE, stats())
    assert isinstance(plan.residual, Kron)  # the full Hadamard as two small factors
    m = plan.residual.matrix(64)
    assert_orthogonal(m)
    assert not np.allclose(m, np.eye(64))
    assert "residual" not in plan.permutations


def test_block_residual_rotation_uses_the_calibrated_permutation():
    s = stats()
    plan = make_plan(Settings.parse(block="16", residual_rotation="block", residual_block=8), SHAPE, s)
    assert isinstance(plan.residual, Chain)
    expected = permutation.massdiff(s["residual"], 8)
    np.testing.assert_array_equal(plan.residual.first.perm, expected)
    np.testing.assert_array_equal(plan.permutations["residual"], expected)
    assert not np.array_equal(expected, np.arange(64))
    np.testing.assert_array_equal(plan.residual.second.block, hadamard(8))
    m = plan.residual.matrix(64)
    assert_orthogonal(m)
    np.testing.assert_allclose(m, np.eye(64)[:, expected] @ np.kron(np.eye(8), hadamard(8)), atol=1e-12)


def test_mlp_permutations_are_valid_and_calibrated():
    a, b = stats(0), stats(1)
    plan_a = make_plan(Settings.parse(block="16"), SHAPE, a)
    plan_b = make_plan(Settings.parse(block="16"), SHAPE, b)
    assert set(plan_a.mlp_permutations) == {0, 1}
    for i in (0, 1):
        p = plan_a.mlp_permutations[i]
        assert is_permutation(p, 128)
        np.testing.assert_array_equal(p, permutation.massdiff(a[f"layers.{i}.mlp"], 16))
        assert not np.array_equal(p, plan_b.mlp_permutations[i])  # they follow the statistics
    assert not np.array_equal(plan_a.mlp_permutations[0], plan_a.mlp_permutations[1])


def test_permute_none_gives_no_permutations():
    plan = make_plan(Settings.parse(block="16", permute="none", residual_rotation="block"), SHAPE, None)
    assert plan.mlp_permutations == {}
    assert plan.online is not None
    # the block residual rotation keeps the channel order
    np.testing.assert_array_equal(plan.residual.first.perm, np.arange(64))


@pytest.mark.parametrize("b", [2, 8, 16, 64])
def test_online_block_rotation(b):
    plan = make_plan(Settings.parse(block=str(b), permute="random"), SHAPE)
    assert isinstance(plan.online, BlockDiagonal) and plan.online_block == b
    np.testing.assert_array_equal(plan.online.block, hadamard(b))
    m = plan.online.matrix(128)
    assert_orthogonal(m)
    mask = np.kron(np.eye(128 // b), np.ones((b, b))).astype(bool)
    assert np.all(m[~mask] == 0) and np.all(np.abs(m[mask]) == pytest.approx(1 / np.sqrt(b)))


def test_full_online_rotation_is_the_hadamard_of_the_intermediate_size():
    plan = make_plan(Settings.parse(block="full"), SHAPE)
    assert isinstance(plan.online, Kron) and plan.online_block is None
    assert plan.online.size == 128
    assert np.allclose(plan.online.matrix(128), hadamard(128))
    assert plan.mlp_permutations == {}


def test_no_online_rotation():
    plan = make_plan(Settings.parse(block="none"), SHAPE)
    assert plan.online is None and plan.online_block is None and plan.mlp_permutations == {}


def test_heads_rotation_is_block_diagonal_of_head_dim():
    plan = make_plan(Settings.parse(block="16", permute="random"), SHAPE)
    assert isinstance(plan.heads, BlockDiagonal) and plan.heads.block.shape == (16, 16)
    assert make_plan(Settings.parse(block="16", permute="random", head_rotation=False), SHAPE).heads is None


# ------------------------------------------------------------------------------------ errors

def test_online_residual_rotation_plan():
    """--residual-rotation online: blockdiag(H_b) at the readers, after PeRQ's permutation of the
    stream from what the readers read ('residual_readers'); none with --permute none; the full
    Hadamard with --block full (no permutation: it would change nothing)."""
    s = {**stats(), "residual_readers": stats(1)["residual"]}
    plan = make_plan(Settings.parse(block="16", residual_rotation="online"), SHAPE, s)
    assert plan.residual is None and plan.residual_online_block == 16
    np.testing.assert_array_equal(plan.residual_online.block, hadamard(16))
    expected = permutation.massdiff(s["residual_readers"], 16)
    np.testing.assert_array_equal(plan.residual_permutation, expected)
    np.testing.assert_array_equal(plan.permutations["residual"], expected)
    assert plan.residual_description == "massdiff + online block 16"
    plain = make_plan(Settings.parse(block="16", residual_rotation="online", permute="none"), SHAPE, None)
    assert plain.residual_permutation is None and "residual" not in plain.permutations
    full = make_plan(Settings.parse(block="full", residual_rotation="online", permute="none"), SHAPE, None)
    assert full.residual_online_block is None and full.residual_permutation is None
    assert_orthogonal(full.residual_online.matrix(64))
    with pytest.raises(PerqError, match="--residual-rotation online needs a block size"):
        make_plan(Settings.parse(block="none", residual_rotation="online"), SHAPE, None)
    with pytest.raises(PerqError, match="--residual-block 32 with --residual-rotation online and --block 16"):
        make_plan(Settings.parse(block="16", residual_rotation="online", residual_block=32), SHAPE, s)
    # with --block none, --residual-block alone asks for the calibrated permutation
    assert Settings.parse(block="none", residual_rotation="online", residual_block=16).needs_statistics


def test_block_not_dividing_intermediate_names_the_node():
    shape = ModelShape(hidden=64, intermediate=96, head_dim=16, layers=2, names=NAMES)
    with pytest.raises(PerqError, match=r"--block 64 does not divide .* 96 .*" + NAMES["intermediate"]):
        make_plan(Settings.parse(block="64"), shape, stats())


def test_residual_block_not_dividing_hidden_names_the_node():
    shape = ModelShape(hidden=48, intermediate=128, head_dim=16, layers=2, names=NAMES)
    with pytest.raises(PerqError, match=r"residual block size 32 does not divide the hidden size 48 .*"
                                        + NAMES["hidden"]):
        make_plan(Settings.parse(block="16", residual_rotation="block", residual_block=32, permute="random"),
                  shape)


def test_block_errors_come_before_calibration(tiny_models, tmp_path, monkeypatch):
    """A block size that cannot work (here the online R1's against R3's) is refused before the
    pipeline calibrates, not after: the same PerqError make_plan raises."""
    from perq_onnx import pipeline

    def calibrate(*args, **kwargs):
        raise AssertionError("calibrated before refusing the settings")
    monkeypatch.setattr(pipeline, "calibration_batches", calibrate)
    settings = Settings.parse(target="ort", residual_rotation="online", residual_block=32, block="16")
    with pytest.raises(PerqError, match=r"--residual-block 32 with --residual-rotation online and --block 16"):
        pipeline.optimize(tiny_models("llama"), tmp_path / "out.onnx", settings, progress=False)
    with pytest.raises(PerqError, match=r"--residual-block 32 with --residual-rotation online and --block 16"):
        make_plan(settings, ModelShape(hidden=64, intermediate=128, head_dim=16, layers=2, names=NAMES), stats())


@pytest.mark.parametrize("permute", ["massdiff", "zigzag"])
def test_statistics_required(permute):
    with pytest.raises(PerqError, match=f"--permute {permute} needs calibration statistics"):
        make_plan(Settings.parse(block="16", permute=permute), SHAPE, None)
    assert make_plan(Settings.parse(block="16", permute=permute), SHAPE, stats()).mlp_permutations


@pytest.mark.parametrize("values, message", [
    ({"w_group": 0}, "--w-group 0"),
    ({"seq_len": 1}, "--seq-len 1"),
    ({"seed": -1}, "--seed -1"),
    ({"block": "none", "fused_ops": True, "a_bits": 4}, "--fused-ops"),
    ({"block": "full", "fused_ops": True, "a_bits": 4}, "--fused-ops"),
    ({"block": "12"}, "--block 12"),
    ({"residual_block": 3}, "--residual-block 3"),
    ({"permute": "sorted"}, "--permute sorted"),
])
def test_settings_validation(values, message):
    with pytest.raises(PerqError, match=message):
        Settings.parse(**values)
    if "block" not in values and "permute" not in values:  # a directly built configuration is checked too
        with pytest.raises(PerqError, match=message):
            built_directly(values)


def built_directly(values: dict) -> Settings:
    """Settings built from its concern objects (not through parse): each checks itself."""
    kinds = {"rotation": RotationConfig, "calibration": CalibrationConfig, "weights": WeightConfig,
             "activations": ActivationConfig}
    parts: dict = {}
    for key, value in values.items():
        if key in OPTIONS:
            concern, name = OPTIONS[key]
            parts.setdefault(concern, {})[name] = value
    top = {k: v for k, v in values.items() if k not in OPTIONS}
    return Settings(**{c: kinds[c](**kw) for c, kw in parts.items()}, **top)


def test_valid_edge_settings_are_accepted():
    Settings.parse(w_group=1, seq_len=2, seed=0, block="16", fused_ops=True, a_bits=4)


# -------------------------------------------------------------------------------- transforms

def orthogonal_kinds(n: int) -> dict[str, transforms.Transform]:
    rng = np.random.default_rng(11)
    return {
        "dense": Dense(random_orthogonal(n, 2)),
        "permutation": Permutation(rng.permutation(n)),
        "block-diagonal": BlockDiagonal(hadamard(8)),
        "block-diagonal-random": BlockDiagonal(random_orthogonal(4, 3)),
        "chain-perm-block": Chain(Permutation(rng.permutation(n)), BlockDiagonal(hadamard(8))),
        "chain-dense-perm": Chain(Dense(random_orthogonal(n, 4)), Permutation(rng.permutation(n))),
    }


KINDS = list(orthogonal_kinds(16))


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("kind", KINDS)
def test_folds_cancel(monkeypatch, kind, chunked):
    """A fused producer [a, 48] and consumer [48, c] whose channels 16:32 are transformed."""
    if chunked:
        monkeypatch.setattr(transforms, "CHUNK_BYTES", 8 * 16 * 3)  # 3 rows / columns per chunk
    n, start, stop = 16, 16, 32
    t = orthogonal_kinds(n)[kind]
    rng = np.random.default_rng(12)
    w1 = rng.standard_normal((20, 48)).astype(np.float32)
    w2 = rng.standard_normal((48, 10)).astype(np.float32)
    p, c = fold_produced(w1, t, start, stop), fold_consumed(w2, t, start, stop)
    assert p.dtype == w1.dtype and c.dtype == w2.dtype and p.shape == w1.shape and c.shape == w2.shape
    m = t.matrix(n)
    assert_orthogonal(m)
    assert not np.allclose(m, np.eye(n))
    # each fold is what it claims; only the slice changes
    np.testing.assert_allclose(p[:, start:stop], w1[:, start:stop] @ m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c[start:stop], m.T @ w2[start:stop], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.delete(p, np.s_[start:stop], axis=1), np.delete(w1, np.s_[start:stop], axis=1))
    np.testing.assert_array_equal(np.delete(c, np.s_[start:stop], axis=0), np.delete(w2, np.s_[start:stop], axis=0))
    # and they cancel
    np.testing.assert_allclose(p.astype(np.float64) @ c, w1.astype(np.float64) @ w2, rtol=1e-5, atol=1e-4)
    assert not np.allclose(p, w1)


@pytest.mark.parametrize("kind", KINDS + ["diagonal"])
def test_chunked_folds_equal_whole_folds(monkeypatch, kind):
    t = orthogonal_kinds(32).get(kind) or Diagonal(np.linspace(0.5, 2.0, 32))
    rng = np.random.default_rng(13)
    w = rng.standard_normal((40, 40)).astype(np.float32)
    whole = fold_produced(w, t, 4, 36), fold_consumed(w, t, 8, 40)
    monkeypatch.setattr(transforms, "CHUNK_BYTES", 1)  # one row / column per chunk
    assert len(list(transforms._chunks(40, 8 * 32))) == 40
    chunked = fold_produced(w, t, 4, 36), fold_consumed(w, t, 8, 40)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)


def test_diagonal_folds_scale_rows_and_columns(monkeypatch):
    """Diagonal is not orthogonal (an RMSNorm gamma): consumed rows are scaled by d, produced
    columns too, and a produced fold is undone by a consumed fold with 1/d."""
    monkeypatch.setattr(transforms, "CHUNK_BYTES", 8 * 12 * 2)
    d = np.linspace(0.5, 2.0, 12)
    rng = np.random.default_rng(14)
    w1, w2 = rng.standard_normal((7, 12)), rng.standard_normal((12, 5))
    np.testing.assert_allclose(fold_consumed(w2, Diagonal(d), 0, 12), d[:, None] * w2)
    np.testing.assert_allclose(fold_produced(w1, Diagonal(d), 0, 12), w1 * d[None, :])
    np.testing.assert_allclose(fold_produced(w1, Diagonal(d), 0, 12) @ fold_consumed(w2, Diagonal(1 / d), 0, 12),
                               w1 @ w2)


def test_block_diagonal_applies_to_any_multiple():
    t = BlockDiagonal(hadamard(4))
    for n in (4, 8, 32):
        np.testing.assert_allclose(t.matrix(n), np.kron(np.eye(n // 4), hadamard(4)))
