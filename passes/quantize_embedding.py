"""The token embedding quantized: INT8 in gather-then-dequantize form, or tied to lm_head's weight.

The [vocab, hidden] table becomes int8 codes with one symmetric scale per row (per token):
``E[t] ~ codes[t] * scale[t]``. The graph gathers first and dequantizes only the gathered rows:
Gather(codes, ids) -> Cast(float) -> Mul(Unsqueeze(Gather(scale, ids), -1)), so no run pays for
dequantizing the whole table. The embedding's consumers read the Mul's output instead.

When TieLmHead made lm_head read the table (``TIED_EMBEDDING``), the embedding instead gathers
from lm_head's weight as the weight pass left it: Gather(Transpose(lm_head's dequantized weight)),
which the onnxruntime-genai writer turns into GatherBlockQuantized over the same INT4 codes.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from perq_onnx.errors import InternalError

from .base import EMBEDDING_FLOAT, EMBEDDING_QUANTIZED, QUANTIZED_WEIGHT, Context, Pass, PassResult
from .tie_lm_head import TIED_EMBEDDING


class QuantizeEmbedding(Pass):
    requires = (EMBEDDING_FLOAT,)
    ensures = (EMBEDDING_QUANTIZED,)

    def run(self, ctx: Context) -> PassResult:
        if ctx.recorded(TIED_EMBEDDING):
            return self._tie(ctx)
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

    @staticmethod
    def _tie(ctx: Context) -> PassResult:
        gather = ctx.node(ctx.structure.embedding)
        (head,) = ctx.recorded(TIED_EMBEDDING)
        weight = ctx.node(head).inputs[1]
        if weight.name not in ctx.recorded(QUANTIZED_WEIGHT):
            raise InternalError(f"the tied embedding gathers from '{head}', whose weight is not quantized yet")
        table = gs.Variable(f"{gather.name}/tied_table", dtype=weight.dtype)
        ctx.add(gs.Node("Transpose", f"{gather.name}/tied_transpose", {"perm": [1, 0]}, [weight], [table]))
        gather.inputs[0] = table
        return PassResult(f"embedding gathered from {head}'s quantized weight (tied: one table)")
