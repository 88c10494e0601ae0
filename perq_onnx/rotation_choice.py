"""Whether the offline rotations pay for weight-only quantization: a calibration-time proxy.

With quantized activations the rotations are what makes 4-bit activations usable, so they stay.
With float activations they serve only the weights, and they can hurt them: R1 needs every RMSNorm
gamma folded into its readers' rows, and a model whose massive-activation channel has a tiny
gamma (SmolLM2) then rounds that row with a step set by the others while its error meets the full
activation (README, Findings). So when the user left R1 / R2 unset and only the weights are
quantized, the planner measures, per rotation, the expected output error of every linear it
touches, with and without it, and keeps the rotation only where it lowers the total.

The proxy of one linear is its output's relative error E||x dW||^2 / E||x W||^2 =
tr(dW^T H dW) / tr(W^T H W), H = X^T X of its input, dW = W - Q(W) under the target's own rounding
(round-to-nearest or GPTQ, its scale rule and format), summed over the linears, so that every
linear counts alike: absolute errors are dominated by the last layers' large activations, and a
writer's largest absolute error, on SmolLM2's massive-activation channel, is the one the next
norms ignore. On SmolLM2, per-channel INT4 (Hessians from 8 valid windows): absolute errors kept R1
for RTN (x0.77) where R1 alone costs 20% (test windows 32-39: 46.23 vs 38.62 without); relative
errors say RTN x1.36 (off) and GPTQ x0.92 (kept, and GPTQ with rotations measures 29.54 against
31.67 without, benchmarks/weight_only.py; the screens: git show
ccc87c6:benchmarks/investigate_rotation_choice/README.md). One set of
Hessians, collected on the unrotated graph, serves both sides: a rotation T of a linear's input
channels maps (W, H) to (T^T W, T^T H T), of its output channels W to W T (H unchanged; the
output error's norm is rotation invariant), and R1's gamma fold maps a reader's input x * g to x:
(W, H) to (diag(g) W, diag(1/g) H diag(1/g)). R1 touches every reader of the residual stream
(rows) and every writer (o_proj, down_proj columns); R2 the value columns and o_proj rows; R3
(the default online block rotation, when --block was not given) down_proj's rows, with the MLP
permutation P3 that comes with it (T = P3 then the block Hadamard; gate/up's columns move with P3,
which changes none of their per-column scales). Each rotation is judged with the others off, on 8
layers spread over the depth (SAMPLED_LAYERS: the cost is that of rounding those layers twice);
lm_head is not counted.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .passes.base import Context, gamma_input
from .passes.quantize_weights import HESSIAN_BUDGET, layer_groups
from .rounding import WeightQuant, gptq, rtn
from .settings import ResidualRotation, Rounding, Settings
from .plan import Plan
from .transforms import BlockDiagonal, Chain, Permutation, Transform

SAMPLED_LAYERS = 8  # layers the proxy measures, spread over the depth (the errors' ratio is what it needs)
# A rotation is kept only where the proxy promises at least 5% less error: near x1 the proxy's sign
# is not the loss's. SmolLM2 RTN on held-out valid windows 32-47 (calibration 0-31): at block 128
# R2 measured x0.97 yet cost 2.5% (27.88 vs 27.19 without; benchmarks/weight_only.py --valid).
KEEP_BELOW = 0.95


def rounding_error(w: np.ndarray, h: np.ndarray, form: WeightQuant, settings: Settings) -> float:
    """tr(dW^T H dW) / tr(W^T H W) of w rounded as the target rounds it: its output's relative
    error (the denominator is the same with and without a rotation, which preserves the output)."""
    w = np.asarray(w, np.float64)
    if settings.weights.rounding is Rounding.GPTQ:
        g = settings.weights.gptq
        q = gptq(w, h, form, act_order=g.act_order, damp=g.damp, block=g.block)
    else:
        q = rtn(w, form, h)
    d = w - q.dequantize().astype(np.float64)
    return float(np.sum(d * (h @ d)) / max(np.sum(w * (h @ w)), 1e-300))


def _rows(t: Transform, w: np.ndarray) -> np.ndarray:
    return t.apply(w.T).T  # T^T W


def _sandwich(t: Transform, h: np.ndarray) -> np.ndarray:
    return _rows(t, t.apply(h))  # T^T H T


def _gamma(ctx: Context, norm) -> np.ndarray | None:
    if norm.gamma is None:
        return None
    return np.asarray(ctx.constant(norm.gamma, gamma_input(ctx.node(norm.gamma))), np.float64)


def sampled_layers(layers, count: int = SAMPLED_LAYERS) -> list:
    """`count` layers spread evenly from the first to the last (all of them if there are fewer)."""
    if len(layers) <= count:
        return list(layers)
    return [layers[i] for i in np.unique(np.round(np.linspace(0, len(layers) - 1, count)).astype(int))]


def weight_errors(ctx: Context, settings: Settings, form: WeightQuant, residual: Transform | None,
                  heads: Transform | None, online=None, progress: bool = True) -> dict[str, tuple[float, float]]:
    """{"R1": (error without, error with), "R2": (...), "R3": (...)} over the linears each
    rotation touches (a rotation given as None is not measured; ``online(layer)`` is R3's
    transform of that layer's down_proj input)."""
    structure = ctx.structure
    layers = sampled_layers(structure.layers)
    errors = {name: [0.0, 0.0] for name, t in (("R1", residual), ("R2", heads), ("R3", online)) if t is not None}
    todo = len(layers) * (7 * (residual is not None) + 2 * (heads is not None) + (online is not None))
    bar = tqdm(total=todo, desc="rotation proxy", unit="linear", leave=False, disable=not progress)

    unrotated: dict[str, float] = {}  # a linear's error without any rotation (o_proj serves R1 and R2)

    def add(name, lin, hessians, rotate_weight, h_rotated):
        w, h = np.asarray(ctx.weight(lin), np.float64), hessians[lin.input]
        if lin.name not in unrotated:
            unrotated[lin.name] = rounding_error(w, h, form, settings)
        errors[name][0] += unrotated[lin.name]
        errors[name][1] += rounding_error(rotate_weight(w), h if h_rotated is None else h_rotated, form, settings)
        bar.update()

    for group in layer_groups(layers, HESSIAN_BUDGET):
        tensors = {lin.input for layer in group for lin in layer.linears().values()}
        hessians = ctx.collect({t: "xtx" for t in tensors})
        for layer in group:
            if residual is not None:
                for norm in (layer.input_norm, layer.mlp_norm):
                    readers = {r.fused or r for r in norm.readers}
                    h = hessians[next(iter(readers)).input]  # the readers share the norm's output
                    g = _gamma(ctx, norm)
                    if g is None:
                        g = np.ones(h.shape[0])
                    inverse = np.divide(1.0, g, out=np.zeros_like(g), where=g != 0)
                    h_rotated = _sandwich(residual, inverse[:, None] * h * inverse[None, :])  # once per norm
                    for reader in readers:
                        add("R1", reader, hessians, lambda w: _rows(residual, g[:, None] * w), h_rotated)
                for writer in (layer.o, layer.down):
                    add("R1", writer, hessians, residual.apply, None)
            if heads is not None:
                add("R2", layer.v, hessians, heads.apply, None)
                add("R2", layer.o, hessians, lambda w: _rows(heads, w), _sandwich(heads, hessians[layer.o.input]))
            if online is not None:
                t = online(layer)
                add("R3", layer.down, hessians, lambda w: _rows(t, w), _sandwich(t, hessians[layer.down.input]))
        del hessians
    bar.close()
    return {name: (off, on) for name, (off, on) in errors.items()}


def down_input_transform(plan: Plan, layer: int) -> Transform:
    """What P3 and R3 do to a layer's down_proj input: x -> x[..., p] then the online rotation."""
    perm = plan.mlp_permutations.get(layer)
    return plan.online if perm is None else Chain(Permutation(perm), plan.online)


def applies(asked: Settings, resolved: Settings) -> bool:
    """Whether the planner chooses rotations by the proxy: weights quantized by round-to-nearest,
    activations float, and at least one of R1 (where it is a full rotation), R2 and R3 left to
    the defaults. GPTQ keeps them: it compensates what the fold costs, and the proxy's GPTQ
    estimates sit near x1 (SmolLM2: x0.92 per channel, x0.98 at block 128, x1.05 at block 32,
    where turning R1 off cost 4.9%: 32.65 vs 31.12 on the first 8 test windows)."""
    if not resolved.weights_quantized or resolved.activations_quantized:
        return False
    if resolved.weights.rounding is not Rounding.RTN:
        return False
    return bool(_free(asked, resolved))


def _free(asked: Settings, resolved: Settings) -> set[str]:
    free = set()
    if asked.rotation.residual is None and resolved.rotation.residual is ResidualRotation.FULL:
        free.add("R1")
    if asked.rotation.heads is None and resolved.rotation.heads is not False:
        free.add("R2")
    if not asked.rotation.online.given and resolved.rotation.online.block is not None:
        free.add("R3")
    return free


OFF = {"R1": {"residual_rotation": ResidualRotation.NONE}, "R2": {"head_rotation": False}, "R3": {"block": "none"}}


def choose_rotations(ctx: Context, asked: Settings, resolved: Settings, form: WeightQuant, plan: Plan,
                     progress: bool = True) -> tuple[Settings, list[str]]:
    """The settings with each free rotation kept only where the proxy says it lowers the weights'
    output error by a clear margin (KEEP_BELOW), and one report line per decision. ``plan`` is the resolved settings' Plan (its
    transforms are what is measured)."""
    free = _free(asked, resolved)
    if any(layer.v.fused is not None for layer in ctx.structure.layers):
        free.discard("R2")  # value columns inside a fused weight (Phi-3, packed QKV): not measured, R2 stays
    errors = weight_errors(ctx, resolved, form, plan.residual if "R1" in free else None,
                           plan.heads if "R2" in free and isinstance(plan.heads, BlockDiagonal) else None,
                           (lambda layer: down_input_transform(plan, layer.index))
                           if "R3" in free and plan.online is not None else None, progress)
    changes, lines = {}, []
    for name, (off, on) in errors.items():
        keep = on <= KEEP_BELOW * off
        ratio = on / off if off > 0 else float("inf")
        what = "R3 (with P3)" if name == "R3" else name
        lines.append(f"weight-only: {what} {'kept' if keep else 'off'} (its linears' relative output error "
                     f"under {resolved.weights.rounding} x{ratio:.2f} with it; rotation_choice.py)")
        if not keep:
            changes.update(OFF[name])
    return (resolved.replace(**changes) if changes else resolved), lines
