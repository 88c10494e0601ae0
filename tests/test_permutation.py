import numpy as np
import pytest

from perq_onnx import permutation
from perq_onnx.errors import PerqError
from perq_onnx.hadamard import hadamard, has_hadamard


def outlier_mass(n, seed, outliers=6):
    rng = np.random.default_rng(seed)
    mass = rng.exponential(1.0, n)
    mass[rng.choice(n, outliers, replace=False)] *= 50
    return mass


@pytest.mark.parametrize("method", permutation.METHODS)
@pytest.mark.parametrize("n,b", [(64, 16), (256, 32), (1536, 64), (96, 96)])
def test_every_method_returns_a_permutation_of_full_blocks(method, n, b):
    mass = outlier_mass(n, seed=n + b)
    p = permutation.permutation(method, mass, b, seed=3)
    assert sorted(p.tolist()) == list(range(n))
    assert permutation.block_masses(mass, p, b).shape == (n // b,)
    assert np.isclose(permutation.block_masses(mass, p, b).sum(), mass.sum())


@pytest.mark.parametrize("seed", range(20))
def test_massdiff_lowers_the_heaviest_block_on_outlier_channels(seed):
    mass = outlier_mass(512, seed)
    none = permutation.block_masses(mass, permutation.identity(mass, 32), 32).max()
    diffused = permutation.block_masses(mass, permutation.massdiff(mass, 32), 32).max()
    assert diffused < none


def test_massdiff_on_sorted_adversarial_input():
    mass = np.sort(np.random.default_rng(0).exponential(1.0, 256))[::-1].copy()
    for b in (8, 16, 64):
        none = permutation.block_masses(mass, permutation.identity(mass, b), b)
        diffused = permutation.block_masses(mass, permutation.massdiff(mass, b), b)
        assert diffused.max() < none.max()
        assert diffused.max() - diffused.min() < 0.1 * (none.max() - none.min())


def test_massdiff_greedy_by_hand():
    mass = np.array([1.0, 8.0, 2.0, 7.0, 3.0, 3.0])
    # descending: 1(8), 3(7), 4(3), 5(3), 2(2), 0(1); two blocks seeded with 1 and 3;
    # 4 -> block [3] (7 < 8), 5 -> block [1] (8 < 10), 2 -> block [3, 4] (10 < 11) which is then
    # full, 0 -> block [1, 5]
    p = permutation.massdiff(mass, 3)
    assert p.tolist() == [1, 5, 0, 3, 4, 2]


def test_massdiff_ties_break_to_lowest_index():
    mass = np.ones(8)
    # all equal: channels in index order; seeds 0,1; then 2 -> block 0 (tie, lowest), 3 -> block 1, ...
    assert permutation.massdiff(mass, 4).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_zigzag_by_hand():
    mass = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    assert permutation.zigzag(mass, 4).tolist() == [0, 3, 4, 7, 1, 2, 5, 6]


def test_random_is_seeded():
    mass = np.ones(64)
    assert np.array_equal(permutation.random(mass, 16, 5), permutation.random(mass, 16, 5))
    assert not np.array_equal(permutation.random(mass, 16, 5), permutation.random(mass, 16, 6))


def test_block_must_divide():
    with pytest.raises(PerqError, match="does not divide"):
        permutation.massdiff(np.ones(100), 16)


@pytest.mark.parametrize("n", [2, 16, 12, 20, 28, 36, 40, 576, 1536, 44, 60])
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert np.allclose(h @ h.T, np.eye(n), atol=1e-12)
    assert np.allclose(np.abs(h), 1 / np.sqrt(n))


def test_unknown_hadamard_size_is_a_clear_error():
    assert not has_hadamard(52)
    with pytest.raises(PerqError, match="--random-orthogonal"):
        hadamard(52)
