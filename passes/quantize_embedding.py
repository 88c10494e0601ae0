"""The token embedding quantized, in one of three forms (``Embedding``):

* ``int8``: one symmetric scale per row (per token), ``E[t] ~ codes[t] * scale[t]``; the graph
  gathers first and dequantizes only the gathered rows: Gather(codes, ids) -> Cast(float) ->
  Mul(Unsqueeze(Gather(scale, ids), -1)), so no run pays for dequantizing the whole table.
* ``int4``: the table's rows in INT4 blocks along the hidden axis, rounded like a weight of the
  target's form (round to nearest): Gather(Transpose(DequantizeLinear(codes [hidden, vocab]))),
  which the onnxruntime-genai writer turns into GatherBlockQuantized over the packed codes (a
  plain onnxruntime folds the DequantizeLinear into a float table at load).
* ``tied``: TieLmHead made lm_head read the table (``TIED_EMBEDDING``); the embedding gathers from
  lm_head's weight as the weight pass left it, Gather(Transpose(lm_head's dequantized weight)):
  one INT4 table for both.

The embedding's consumers read the new output instead.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from perq_onnx.errors import InternalError
from perq_onnx.rounding import WeightQuant, relative_error, rtn
from perq_onnx.settings import Embedding

from .base import EMBEDDING_FLOAT, EMBEDDING_QUANTIZED, QUANTIZED_WEIGHT, Context, Pass, PassResult
from .quantize_weights import int_dequantize
from .tie_lm_head import TIED_EMBEDDING


class QuantizeEmbedding(Pass):
    requires = (EMBEDDING_FLOAT,)
    ensures = (EMBEDDING_QUANTIZED,)

    def __init__(self, form: Embedding = Embedding.INT8, int4: WeightQuant | None = None):
        if form is Embedding.INT4 and (int4 is None or int4.format.bits != 4):
            raise InternalError("an INT4 embedding needs its INT4 weight form")
        self.form, self.int4 = form, int4

    def run(self, ctx: Context) -> PassResult:
        if self.form is Embedding.TIED:
            return self._tie(ctx)
        if self.form is Embedding.INT4:
            return self._int4(ctx)
        gather = ctx.node(ctx.structure.embedding)
        original = ctx.constant(gather.name, 0)
        dtype = np.dtype(original.dtype)
        table = np.asarray(original, dtype=np.float32)
        amax = np.abs(table).max(axis=1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(dtype)
        codes = np.clip(np.rint(table / scale[:, None].astype(np.float32)), -127, 127).astype(np.int8)
        err = float(((codes * scale[:, None].astype(np.float32) - table) ** 2).sum() / max((table ** 2).sum(), 1e-30))
        ids, out = gather.inputs[1], gather.outputs[0]
        name = gather.name
        q_rows = gs.Variable(f"{name}/rows_int8", dtype=np.int8)
        rows = gs.Variable(f"{name}/rows", dtype=dtype)
        s_rows = gs.Variable(f"{name}/row_scales", dtype=dtype)
        s_cols = gs.Variable(f"{name}/row_scales_unsqueezed", dtype=dtype)
        gather.inputs[0] = ctx.store.constant("embed_tokens.int8", codes)
        gather.outputs[0] = q_rows
        to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
        ctx.add(gs.Node("Cast", f"{name}/to_float", {"to": to}, [q_rows], [rows]))
        ctx.add(gs.Node("Gather", f"{name}/scales", {"axis": 0}, [ctx.store.constant("embed_tokens.scale", scale), ids],
                        [s_rows]))
        ctx.add(gs.Node("Unsqueeze", f"{name}/scales_unsqueeze", {},
                        [s_rows, gs.Constant(f"{name}/last_axis", np.array([-1], np.int64))], [s_cols]))
        ctx.add(gs.Node("Mul", f"{name}/dequantize", {}, [rows, s_cols], [out]))
        return PassResult(f"INT8 embedding (per-token scales, gathered before dequantization), "
                          f"relative error {err:.2e}", {"embedding_rel_error": err})

    def _int4(self, ctx: Context) -> PassResult:
        gather = ctx.node(ctx.structure.embedding)
        original = ctx.constant(gather.name, 0)
        w = np.asarray(original, dtype=np.float32).T  # [hidden, vocab]: blocks along the hidden axis
        q = rtn(w, self.int4)
        weight = int_dequantize(ctx, gather.name, q, np.dtype(original.dtype))
        ctx.record(QUANTIZED_WEIGHT, weight.name)
        _gather_from(ctx, gather, weight)
        err = relative_error(w, q)
        return PassResult(f"INT4 embedding (blocks of {self.int4.format.group} along the hidden axis), "
                          f"relative error {err:.2e}", {"embedding_rel_error": err})

    @staticmethod
    def _tie(ctx: Context) -> PassResult:
        if not ctx.recorded(TIED_EMBEDDING):
            raise InternalError("--embedding tied: TieLmHead did not run before the embedding's quantization")
        (head,) = ctx.recorded(TIED_EMBEDDING)
        weight = ctx.node(head).inputs[1]
        if weight.name not in ctx.recorded(QUANTIZED_WEIGHT):
            raise InternalError(f"the tied embedding gathers from '{head}', whose weight is not quantized yet")
        _gather_from(ctx, ctx.node(ctx.structure.embedding), weight)
        return PassResult(f"embedding gathered from {head}'s quantized weight (tied: one table)")


def _gather_from(ctx: Context, gather: gs.Node, weight: gs.Variable) -> None:
    """Let the embedding Gather read the rows of `weight` [hidden, vocab] (transposed)."""
    table = gs.Variable(f"{gather.name}/table", dtype=weight.dtype)
    ctx.add(gs.Node("Transpose", f"{gather.name}/transpose", {"perm": [1, 0]}, [weight], [table]))
    gather.inputs[0] = table
