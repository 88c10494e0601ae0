"""Tie lm_head to the token embedding again, so that one INT4 table serves both (genai target).

In a tied model lm_head reads the embedding table E transposed, but the rewrites break the tie:
R1 turns the table into E Q while lm_head, a reader of the final norm, also takes that norm's
gamma (and any permutation): W = Q^T diag(g) E^T. W still factors through the table the graph
now has, T = E Q, as W = M T^T with a hidden x hidden M (here Q^T diag(g) Q). The pass finds M by
least squares, M = W T (T^T T)^-1, and when the factorization is exact rewrites

    final norm -> lm_head(W)        into    final norm -> MatMul(M) -> lm_head(T^T)

and records lm_head's weight as the embedding's table (``TIED_EMBEDDING``): QuantizeEmbedding
later gathers the embedding from lm_head's weight in whatever form the weight pass gave it, and
the onnxruntime-genai writer emits ``GatherBlockQuantized`` over lm_head's MatMulNBits codes. The
file then holds the table once, as INT4; M costs hidden^2 multiply-adds per token. The function
is unchanged up to float rounding (M is solved in float64). An untied model leaves a residual:
the pass refuses it with the reason (``--embedding tied`` asked for what the model does not have).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from perq_onnx.errors import PerqError
from perq_onnx.shapes import constant_value

from .base import EMBEDDING_FLOAT, WEIGHTS_FLOAT, Context, Pass, PassResult

TIED_EMBEDDING = "lm_head weight that the embedding gathers from"
EXACT = 1e-4   # relative residual ||M T^T - W|| / ||W|| below which the factorization is the tie
ROWS = 4096    # table rows per float64 chunk (bounded memory for large vocabularies)


def factor_through_table(w: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, float]:
    """(M, relative residual) of the least-squares M with M @ table.T ~ w (w [K, V], table [V, K])."""
    k = table.shape[1]
    gram, cross = np.zeros((k, k)), np.zeros((k, k))
    for start in range(0, table.shape[0], ROWS):
        t = table[start:start + ROWS].astype(np.float64)
        gram += t.T @ t
        cross += w[:, start:start + ROWS].astype(np.float64) @ t
    m = np.linalg.solve(gram, cross.T).T  # gram is symmetric: M = cross gram^-1
    err = norm = 0.0
    for start in range(0, table.shape[0], ROWS):
        block = w[:, start:start + ROWS].astype(np.float64)
        err += float(((m @ table[start:start + ROWS].T.astype(np.float64) - block) ** 2).sum())
        norm += float((block ** 2).sum())
    return m, (err / max(norm, 1e-300)) ** 0.5


def is_tied(graph: gs.Graph, structure) -> bool:
    """Whether the source graph's lm_head weight is exactly its embedding table transposed (the
    genai target then ties them by default)."""
    nodes = {n.name: n for n in graph.nodes}
    gather, lm = nodes.get(structure.embedding), nodes.get(structure.lm_head.name)
    if gather is None or lm is None or lm.op != "MatMul":
        return False
    table, w = constant_value(gather.inputs[0]), constant_value(lm.inputs[1])
    return table is not None and w is not None and w.shape == table.shape[::-1] and np.array_equal(w, table.T)


class TieLmHead(Pass):
    requires = (WEIGHTS_FLOAT, EMBEDDING_FLOAT)
    ensures = (WEIGHTS_FLOAT, EMBEDDING_FLOAT)

    def run(self, ctx: Context) -> PassResult:
        lm = ctx.structure.lm_head
        gather = ctx.node(ctx.structure.embedding)
        table = np.asarray(ctx.constant(gather.name, 0))
        w = np.asarray(ctx.weight(lm))
        refuse = f"node '{lm.name}': --embedding tied: lm_head is not the embedding table transposed"
        if w.shape != table.shape[::-1]:
            raise PerqError(f"{refuse} ({list(w.shape)} vs {list(table.shape)})")
        try:
            m, residual = factor_through_table(w, table)
        except np.linalg.LinAlgError:  # a table of dependent columns
            raise PerqError(f"{refuse} (its columns are dependent)") from None
        if residual > EXACT:
            raise PerqError(f"{refuse} up to a {table.shape[1]}x{table.shape[1]} map (relative residual "
                            f"{residual:.1e}): the model's embeddings are untied; use --embedding int4 or int8")
        node = ctx.node(lm.name)
        dtype = np.dtype(w.dtype)
        mapped = gs.Variable(f"{lm.name}/tied_input", dtype=dtype)
        ctx.add(gs.Node("MatMul", f"{lm.name}/tie_map", {},
                        [node.inputs[0], ctx.store.constant("lm_head.tie_map", m.astype(dtype))], [mapped]))
        node.inputs[0] = mapped
        ctx.set_constant(lm.name, 1, np.ascontiguousarray(table.T), f"{lm.name}.weight")
        ctx.record(TIED_EMBEDDING, lm.name)
        return PassResult(f"lm_head reads the embedding table through a {m.shape[0]}x{m.shape[1]} map "
                          f"(relative residual {residual:.1e}): one table for both")
