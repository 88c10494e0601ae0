"""Plan: every matrix and permutation of a PeRQ rewrite, decided before any pass runs.

``make_plan(settings, shape, stats)`` validates the settings against the model's sizes once and
builds the transforms:

* R1 (residual): a full Hadamard of the hidden size, or P * blockdiag(H_rb) with a calibrated
  permutation P of the residual channels; or, where R1 is not exact (post-norm models), the
  online residual rotation: blockdiag(H_rb) (or the full Hadamard with ``--block full``) applied
  online at the residual readers' inputs, after a calibrated permutation of the whole stream
  (folded offline; its mass is what the readers read, ``residual_readers``);
* R2 (heads): blockdiag(H_head_dim) on the value heads;
* P3 (per layer): a permutation of the MLP intermediate from its calibrated channel mass;
* R3 (online, at down_proj): blockdiag(H_b), or the full Hadamard of the intermediate size.

It needs no ONNX: a ``ModelShape`` and the statistics (mean |x| per channel, keyed by region
name) are all it reads, so it is tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import permutation
from .analysis import DecoderStructure
from .errors import PerqError
from .hadamard import hadamard, hadamard_factors, has_hadamard, orthogonal
from .settings import Permute, ResidualRotation, Settings
from .transforms import BlockDiagonal, Chain, Dense, Kron, Permutation, Transform


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    head_dim: int
    layers: int
    names: dict = field(default_factory=dict)  # size -> a node to name in errors

    @classmethod
    def of(cls, s: DecoderStructure) -> "ModelShape":
        names = {"hidden": s.lm_head.name, "intermediate": s.layers[0].down.name, "head_dim": s.layers[0].v.name}
        return cls(s.hidden_size, s.intermediate_size, s.head_dim, len(s.layers), names)


@dataclass(frozen=True)
class Plan:
    settings: Settings
    residual: Transform | None
    residual_description: str
    heads: Transform | None
    mlp_permutations: dict[int, np.ndarray]     # layer -> permutation (absent: none)
    online: Transform | None                    # what R3 applies online (None: no R3)
    online_block: int | None                    # b of a block R3 (None: full-vector or none)
    residual_online: Transform | None = None    # the online residual rotation (None: none)
    residual_online_block: int | None = None    # its block size (None: full-vector)
    residual_permutation: np.ndarray | None = None  # the stream's permutation before it (None: none)

    @property
    def permutations(self) -> dict[str, np.ndarray]:
        out = {f"layers.{i}.mlp": p for i, p in self.mlp_permutations.items()}
        if isinstance(self.residual, Chain) and isinstance(self.residual.first, Permutation):
            out["residual"] = self.residual.first.perm
        if self.residual_permutation is not None:
            out["residual"] = self.residual_permutation
        return out


def _full_rotation(n: int, settings: Settings, what: str, node: str) -> Transform:
    """The full orthonormal Hadamard of size n as two small Kronecker factors (or a seeded random
    orthogonal Dense matrix where no Hadamard exists and --random-orthogonal is given)."""
    if has_hadamard(n):
        return Kron(*hadamard_factors(n))
    return Dense(_orthogonal(n, settings, what, node))


def _orthogonal(n: int, settings: Settings, what: str, node: str) -> np.ndarray:
    seed = settings.seed if settings.rotation.random_orthogonal else None
    try:
        return orthogonal(n, seed)
    except PerqError as exc:
        raise PerqError(f"{what} of size {n} (node '{node}'): {exc}") from None


def _mass(stats: dict | None, key: str, n: int) -> np.ndarray:
    if stats is None or key not in stats:
        return np.zeros(n)
    return np.asarray(stats[key], dtype=np.float64)


def check_blocks(settings: Settings, shape: ModelShape) -> None:
    """The PerqErrors of make_plan that need no statistics (block sizes against the model's sizes
    and each other), so that the pipeline can raise them before calibrating."""
    r, b = settings.rotation, settings.rotation.online.block
    if b is not None and shape.intermediate % b:
        raise PerqError(f"--block {b} does not divide the MLP intermediate size {shape.intermediate} "
                        f"(node '{shape.names.get('intermediate', 'down_proj')}')")
    rb = r.residual_block_size
    if r.residual_or_full in (ResidualRotation.BLOCK, ResidualRotation.ONLINE) and rb is not None and shape.hidden % rb:
        raise PerqError(f"residual block size {rb} does not divide the hidden size {shape.hidden} "
                        f"(node '{shape.names.get('hidden', 'lm_head')}')")
    if r.residual_or_full is ResidualRotation.ONLINE and rb is not None and b is not None and b != rb:
        raise PerqError(f"--residual-block {rb} with --residual-rotation online and --block {b}: "
                        "the online rotations share one perq.BlockHadamard function body per model; give "
                        "one block size")


def make_plan(settings: Settings, shape: ModelShape, stats: dict | None = None) -> Plan:
    s, r, b = settings, settings.rotation, settings.rotation.online.block
    check_blocks(settings, shape)
    if s.needs_statistics and stats is None:
        raise PerqError(f"--permute {r.permute} needs calibration statistics")

    residual, described = None, "none"
    if r.residual_or_full is ResidualRotation.FULL:
        residual = _full_rotation(shape.hidden, s, "the residual rotation", shape.names.get("hidden", ""))
        described = f"full {shape.hidden}"
    elif r.residual_or_full is ResidualRotation.BLOCK:
        rb = r.residual_block_size
        p = permutation.permutation(str(r.permute), _mass(stats, "residual", shape.hidden), rb, s.seed)
        residual = Chain(Permutation(p), BlockDiagonal(hadamard(rb)))
        described = f"{r.permute} + block {rb}"
    residual_online, residual_online_block, residual_permutation = None, None, None
    if r.residual_or_full is ResidualRotation.ONLINE:
        residual_online_block = r.residual_block_size
        if residual_online_block is not None:
            residual_online = BlockDiagonal(hadamard(residual_online_block))
            described = f"online block {residual_online_block}"
            if r.permute is not Permute.NONE:  # the readers' inputs (gamma applied) where calibrated
                key = "residual_readers" if stats is not None and "residual_readers" in stats else "residual"
                residual_permutation = permutation.permutation(str(r.permute), _mass(stats, key, shape.hidden),
                                                               residual_online_block, s.seed)
                described = f"{r.permute} + {described}"
        elif r.online.full:
            residual_online = _full_rotation(shape.hidden, s, "the online residual rotation",
                                             shape.names.get("hidden", ""))
            described = f"online full {shape.hidden}"
        else:
            raise PerqError("--residual-rotation online needs a block size: give --block N (or full) or "
                            "--residual-block N")

    heads = None
    if r.rotate_heads:
        heads = BlockDiagonal(_orthogonal(shape.head_dim, s, "the per-head rotation", shape.names.get("head_dim", "")))

    perms = {}
    if b is not None and r.permute is not Permute.NONE:
        for i in range(shape.layers):
            mass = _mass(stats, f"layers.{i}.mlp", shape.intermediate)
            perms[i] = permutation.permutation(str(r.permute), mass, b, s.seed + i)

    online = None
    if b is not None:
        online = BlockDiagonal(hadamard(b))
    elif r.online.full:
        online = _full_rotation(shape.intermediate, s, "the full online rotation",
                                shape.names.get("intermediate", ""))
    return Plan(s, residual, described, heads, perms, online, b, residual_online, residual_online_block,
                residual_permutation)
