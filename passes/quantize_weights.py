"""Weight quantization: each decoder linear's weight rounded to the target's number format and
put back in the graph in the target's weight form.

The form (format: INT-n per output channel or per group of g input rows, NVFP4, MXFP4; clip rule)
is the target's; the rounding is round-to-nearest or GPTQ (perq_onnx/rounding.py). How the codes
appear is the ``WeightForm`` the target picks:

* ``int_dequantize``: int4/int8 initializer -> DequantizeLinear -> MatMul (what TensorRT and
  MatMulNBits want): per channel, scale [out] with axis 1; per group, scale [ceil(in/g), out] with
  axis 0 and block_size g (a ragged last group is shorter, as DequantizeLinear-21 allows).
  Symmetric forms have no zero point; asymmetric ones have uint4/uint8 codes and a zero point of
  the scale's shape.
* ``fp4_lookup``: FP4 codes as UINT4 E2M1 bit patterns decoded with standard ops that onnxruntime
  runs (formats.emit_fp4_weight: table Gather times the block scale), bit-exact to the reference.
(TensorRT's NVFP4 form is made from ``fp4_lookup`` by passes/tensorrt_fp4_weights.py, once the
graph no longer needs to run in onnxruntime for calibration.)

GPTQ and activation-aware clipping need the Hessian
X^T X of each linear's input: it is collected on the graph *as rotated and permuted so far*, a
few layers per calibration run so that the Hessians held at once stay under HESSIAN_BUDGET.
With ``float_target`` (run after the activations' quantize-dequantize: the simulate target orders
it so), each linear's input is the quantized X~; the pass also collects X~^T X against the float X
that the activation quantizer reads, refits each weight toward the float output
(rounding.float_target) and rounds the refitted weight (RTN or GPTQ against X~^T X~).
lm_head is quantized when the target asks (``lm_head``: its form): its input's Hessian comes with
the last calibration run and it is rounded like the decoder's linears (RTN without Hessians).
The embedding is not this pass's. ``metrics`` reports each weight's relative error
||W - Q(W)||^2 / ||W||^2.
"""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from perq_onnx.errors import InternalError
from perq_onnx.formats import FP4Format, Quantized, emit_fp4_weight
from perq_onnx.rounding import WeightQuant, float_target, gptq, relative_error, rtn
from perq_onnx.settings import GPTQConfig, Rounding

from .base import QUANTIZED_WEIGHT, WEIGHTS_FLOAT, WEIGHTS_QUANTIZED, Context, Pass, PassResult
from .quantize_activations import GraphEmitter

WEIGHT_TYPES = {(4, True): ml_dtypes.int4, (8, True): np.int8, (4, False): ml_dtypes.uint4, (8, False): np.uint8}
HESSIAN_BUDGET = 1 << 30  # bytes of float64 Hessians collected per calibration run


def layer_groups(layers, budget: int):
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
                 gptq: GPTQConfig = GPTQConfig(), emit=None, float_target: bool = False):
        self.form, self.rounding, self.lm_head, self.gptq = form, rounding, lm_head, gptq
        self.float_target = float_target
        self.emit = emit or int_dequantize  # the weight form (functions below)

    @property
    def needs_hessians(self) -> bool:
        return self.rounding is Rounding.GPTQ or self.form.clip == "act" or self.float_target

    def _float_inputs(self, ctx: Context) -> dict[str, str]:
        """Quantized input -> the float tensor its quantizer reads (float_target only)."""
        if not self.float_target:
            return {}
        records = json.loads(ctx.metadata.get("perq.activation_qdq", "[]"))
        if not records:
            raise InternalError("the float target is fitted after the activations' quantize-dequantize")
        return {r["output"]: r["input"] for r in records if not r.get("fused")}

    def run(self, ctx: Context) -> PassResult:
        errors = {}
        layers = ctx.structure.layers
        floats = self._float_inputs(ctx)
        budget = HESSIAN_BUDGET // 2 if floats else HESSIAN_BUDGET  # the cross terms are as large
        groups = list(layer_groups(layers, budget)) if self.needs_hessians else [layers]
        head = ctx.structure.lm_head
        head_input = ctx.node(head.name).inputs[0].name if self.lm_head is not None and self.needs_hessians else None
        head_hessian = None
        for index, group in enumerate(groups):
            linears = [(layer, kind, lin) for layer in group for kind, lin in layer.linears().items()]
            inputs = {lin.name: ctx.node(lin.name).inputs[0].name for _, _, lin in linears}  # as rewritten
            requests = {t: "xtx" for t in inputs.values()} if self.needs_hessians else {}
            requests.update({(t, floats[t]): "xty" for t in inputs.values() if t in floats})
            if head_input is not None and index == len(groups) - 1:  # lm_head's, in the last run
                requests[head_input] = "xtx"
            stats = ctx.collect(requests) if requests else {}
            head_hessian = stats.get(head_input, head_hessian)
            for layer, kind, lin in tqdm(linears, desc="weights", unit="linear", leave=False,
                                         disable=len(linears) < 50):
                t = inputs[lin.name]
                errors[f"layers.{layer.index}.{kind}"] = self._quantize(ctx, lin, stats.get(t), cross=stats.get((t, floats.get(t))))
        if self.lm_head is not None:  # rounded like the decoder's linears when its Hessian is collected
            errors["lm_head"] = self._quantize(ctx, head, head_hessian, self.lm_head,
                                               self.rounding if head_hessian is not None else Rounding.RTN)
        ctx.min_opset = max(ctx.min_opset or 0, 21)
        fmt = self.form.format
        gran = "per output channel" if fmt.group is None else f"per group of {fmt.group}"
        name = fmt.name.upper() if isinstance(fmt, FP4Format) else f"INT{fmt.bits}"
        if not fmt.symmetric:
            name += " asymmetric"
        toward = " toward the float output" if floats else ""
        return PassResult(f"{name} weights ({gran}, {self.rounding}{toward}, {self.form.clip} scales) "
                          f"on {len(errors)} linears", {"weight_rel_error": errors})

    def _quantize(self, ctx: Context, lin, hessian, form: WeightQuant | None = None, rounding=None,
                  cross=None) -> float:
        form, rounding = form or self.form, rounding or self.rounding
        original = ctx.weight(lin)
        dtype = np.dtype(original.dtype)  # scales and the dequantized weight keep the graph's type
        w = np.asarray(original, dtype=np.float32)
        target = w if cross is None else float_target(w, hessian, cross, self.gptq.damp)
        if rounding is Rounding.GPTQ:
            q = gptq(target, hessian, form, act_order=self.gptq.act_order, damp=self.gptq.damp, block=self.gptq.block)
        else:
            q = rtn(target, form, hessian)
        weight = self.emit(ctx, lin.name, q, dtype)
        ctx.record(QUANTIZED_WEIGHT, weight.name)
        ctx.node(lin.name).inputs[1] = weight
        return relative_error(w, q)


# --------------------------------------------------------------------------- weight forms
# (ctx, linear name, quantized weight, the graph's float type) -> the tensor the MatMul reads

def int_dequantize(ctx: Context, name: str, q: Quantized, dtype: np.dtype) -> gs.Variable:
    form = q.format
    kind = WEIGHT_TYPES[form.bits, form.symmetric]
    inputs = [ctx.store.constant(f"{name}.weight.quantized", q.codes.astype(kind)),
              ctx.store.constant(f"{name}.weight.scale", q.scale.astype(dtype))]
    if q.zero_point is not None:
        inputs.append(ctx.store.constant(f"{name}.weight.zero_point", q.zero_point.astype(kind)))
    attrs = {"axis": 1} if form.group is None else {"axis": 0, "block_size": form.group}
    deq = gs.Variable(f"{name}.weight.dequantized", dtype=dtype)
    ctx.add(gs.Node("DequantizeLinear", f"{name}/weight_dq", attrs, inputs, [deq]))
    return deq


def fp4_lookup(ctx: Context, name: str, q: Quantized, dtype: np.dtype) -> gs.Variable:
    codes, scale = q.format.storage(q)
    e = GraphEmitter(ctx, f"{name}/weight_fp4")
    w = emit_fp4_weight(e, ctx.store.constant(f"{name}.weight.e2m1", codes),
                        ctx.store.constant(f"{name}.weight.block_scale", scale), q.format, q.codes.shape)
    if dtype != np.float32:
        w = e.op("Cast", [w], "to_graph_type", to=onnx.helper.np_dtype_to_tensor_dtype(dtype))
    return w
