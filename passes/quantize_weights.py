"""INT-n weight quantization as standard QDQ: int4/int8 initializer -> DequantizeLinear -> MatMul.

The form (bits, per output channel or per group of g input rows, clip rule) is the target's;
the rounding is round-to-nearest or GPTQ (perq_onnx/rounding.py). Symmetric and zero-point free
(what TensorRT and MatMulNBits want): per channel, scale [out] with axis 1; per group, scale
[in/g, out] with axis 0 and block_size g. GPTQ and activation-aware clipping need the Hessian
X^T X of each linear's input: it is collected on the graph *as rotated and permuted so far*, a
few layers per calibration run so that the Hessians held at once stay under HESSIAN_BUDGET.
lm_head and embeddings stay float. ``metrics`` reports each weight's relative error
||W - Q(W)||^2 / ||W||^2.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from perq_onnx.rounding import WeightQuant, gptq, relative_error, rtn
from perq_onnx.settings import GPTQConfig, Rounding

from .base import WEIGHTS_FLOAT, WEIGHTS_QUANTIZED, Context, Pass, PassResult

WEIGHT_TYPES = {4: ml_dtypes.int4, 8: np.int8}
HESSIAN_BUDGET = 1 << 30  # bytes of float64 Hessians collected per calibration run


def _layer_groups(layers, budget: int):
    """Consecutive layers whose input Hessians together fit the budget (at least one layer)."""
    group, used = [], 0
    for layer in layers:
        dims = {lin.name: lin.in_features for lin in layer.linears().values()}
        size = sum(8 * d * d for d in dims.values())
        if group and used + size > budget:
            yield group
            group, used = [], 0
        group.append(layer)
        used += size
    if group:
        yield group


class QuantizeWeights(Pass):
    requires = (WEIGHTS_FLOAT,)
    ensures = (WEIGHTS_QUANTIZED,)

    def __init__(self, form: WeightQuant, rounding: Rounding = Rounding.RTN, lm_head: WeightQuant | None = None,
                 gptq: GPTQConfig = GPTQConfig()):
        self.form, self.rounding, self.lm_head, self.gptq = form, rounding, lm_head, gptq

    @property
    def needs_hessians(self) -> bool:
        return self.rounding is Rounding.GPTQ or self.form.clip == "act"

    def run(self, ctx: Context) -> PassResult:
        errors = {}
        layers = ctx.structure.layers
        groups = list(_layer_groups(layers, HESSIAN_BUDGET)) if self.needs_hessians else [layers]
        for group in groups:
            linears = [(layer, kind, lin) for layer in group for kind, lin in layer.linears().items()]
            inputs = {lin.name: ctx.node(lin.name).inputs[0].name for _, _, lin in linears}  # as rewritten
            hessians = ctx.collect({t: "xtx" for t in inputs.values()}) if self.needs_hessians else {}
            for layer, kind, lin in tqdm(linears, desc="weights", unit="linear", leave=False,
                                         disable=len(linears) < 50):
                errors[f"layers.{layer.index}.{kind}"] = self._quantize(ctx, lin, hessians.get(inputs[lin.name]))
        if self.lm_head is not None:  # round to nearest: its input statistics are not collected
            errors["lm_head"] = self._quantize(ctx, ctx.structure.lm_head, None, self.lm_head, Rounding.RTN)
        ctx.min_opset = max(ctx.min_opset or 0, 21)
        gran = "per output channel" if self.form.group is None else f"per group of {self.form.group}"
        return PassResult(f"INT{self.form.bits} weights ({gran}, {self.rounding}, {self.form.clip} scales) "
                          f"on {len(errors)} linears", {"weight_rel_error": errors})

    def _quantize(self, ctx: Context, lin, hessian, form: WeightQuant | None = None, rounding=None) -> float:
        form, rounding = form or self.form, rounding or self.rounding
        original = ctx.weight(lin)
        dtype = np.dtype(original.dtype)  # scales and the dequantized weight keep the graph's type
        w = np.asarray(original, dtype=np.float32)
        if rounding is Rounding.GPTQ:
            q = gptq(w, hessian, form, act_order=self.gptq.act_order, damp=self.gptq.damp, block=self.gptq.block)
        else:
            q = rtn(w, form, hessian)
        name = lin.name + ".weight"
        codes = ctx.store.constant(name + ".quantized", q.codes.astype(WEIGHT_TYPES[form.bits]))
        scale = ctx.store.constant(name + ".scale", q.scale.astype(dtype))
        attrs = {"axis": 1} if form.group is None else {"axis": 0, "block_size": form.group}
        deq = gs.Variable(name + ".dequantized", dtype=dtype)
        ctx.add(gs.Node("DequantizeLinear", lin.name + "/weight_dq", attrs, [codes, scale], [deq]))
        ctx.node(lin.name).inputs[1] = deq
        return relative_error(w, q)
