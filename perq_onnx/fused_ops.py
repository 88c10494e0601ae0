"""onnxruntime's own ops, as perq-onnx reads them: the op tables and predicates the front end
(shape-inference proxies) and the analysis (fused norms in residual.py, attention in heads.py) use.

Graphs that onnxruntime's own tooling produced: its EXTENDED-level optimized graph
(``SessionOptions.optimized_model_filepath``), ``onnxruntime.transformers.optimizer`` and
optimum's ``--optimize O1..O4`` (which calls it).

What they contain for a Llama-family decoder, and how perq-onnx reads it:

* ``SimplifiedLayerNormalization(x, scale)`` (onnxruntime registers it in the default domain, and in
  com.microsoft) is an RMSNorm: x / sqrt(mean(x^2) + eps) * scale over the last axis. Its gamma is
  folded into the readers and the scale input set to ones; the op stays (epsilon unchanged:
  rms(x Q) = rms(x) for orthogonal Q, so the normalization commutes with R1).
* ``SkipSimplifiedLayerNormalization(input, skip, gamma)`` (com.microsoft) is a residual Add and an
  RMSNorm of the sum: one of input/skip is the residual stream, the other a linear layer writing
  to it (o_proj, down_proj); output 0 is the normalized sum, output 3 the sum itself -- the residual
  stream continues there. Both operands are rotated by R1 (the stream and the writer's output
  columns), so the sum is too.
* ``QuickGelu`` / ``FastGelu`` (com.microsoft, fused SiLU x*sigmoid(alpha*x) and tanh-Gelu) are
  element-wise: the MLP permutation commutes with them.
* ``FusedMatMul(x, W, transB=1)`` and ``Gemm(x, W, C, transB)`` by a constant weight are linear
  layers: the front end (frontend.py) rewrites them to ``MatMul(x, Transpose(W))`` (+ ``Add(C)``)
  before the analysis, which reads the weight as [in, out] through the Transpose; a fold writes
  the folded [in, out] weight to the MatMul, so folds land on the right axis.
* ``RotaryEmbedding`` on q/k needs nothing: R2 rotates only the values, and q/k_proj outputs are
  unchanged by R1.
* ``GroupQueryAttention`` / ``MultiHeadAttention`` (com.microsoft) are attention blocks whose
  value input is the v_proj output (input 2) and whose output 0 reaches o_proj: softmax(q k^T) @ V
  mixes tokens, never channels, so R2 (v_proj columns, o_proj rows) commutes with them, and the
  present value output (the cache) is stored in the rotated basis like optimum's present.*.value.

Refused, one line naming the node (residual.py, and value_input here): a fused norm whose scale is not a constant vector, whose axis
is not the last one, whose inverse-RMS/mean outputs are read, or (Skip) with a bias input;
attention with packed QKV, an attention bias on the values, or no separate value input.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .records import AnalysisError
from .shapes import producer

DEFAULT_DOMAINS = ("", "ai.onnx")
CONTRIB = "com.microsoft"

# op -> index of its gamma (scale) input
FUSED_RMSNORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}
# element-wise contrib ops the MLP permutation commutes with (all nonlinear)
CONTRIB_ELEMENTWISE = {"QuickGelu", "FastGelu"}
# attention ops: index of the value input and of the present value output
FUSED_ATTENTION = {"GroupQueryAttention": (2, 2), "MultiHeadAttention": (2, 2)}
# contrib op -> {output index: (proxy op, input indices)} with the same output shape and type, for
# ONNX shape inference (frontend.py); attention proxies apply only with separate q/k/v inputs
SHAPE_PROXIES = {
    "SimplifiedLayerNormalization": {0: ("Identity", (0,))},
    "SkipSimplifiedLayerNormalization": {0: ("Add", (0, 1)), 3: ("Add", (0, 1))},
    "QuickGelu": {0: ("Identity", (0,))},
    "FastGelu": {0: ("Identity", (0,))},
    "RotaryEmbedding": {0: ("Identity", (0,))},
    "GroupQueryAttention": {0: ("Identity", (0,))},
    "MultiHeadAttention": {0: ("Identity", (0,))},
}


def named_output(node: gs.Node, index: int):
    """Output `index` of node when it exists and is named, else None."""
    return node.outputs[index] if len(node.outputs) > index and node.outputs[index].name else None


def named_input(node: gs.Node, index: int):
    """Input `index` of node when it exists and is named, else None."""
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def is_fused_rmsnorm(node: gs.Node) -> bool:
    return node.op in FUSED_RMSNORMS and node.domain in DEFAULT_DOMAINS + (CONTRIB,)


def fused_gamma_input(node: gs.Node) -> int | None:
    """The index of a fused RMSNorm's scale input (None for any other node)."""
    return FUSED_RMSNORMS[node.op] if is_fused_rmsnorm(node) else None


# ----------------------------------------------------------------------------- attention

def is_fused_attention(node: gs.Node) -> bool:
    return node.op in FUSED_ATTENTION and node.domain == CONTRIB


def value_input(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether tensor is the value input of a fused attention node (q/k inputs are not; they are
    left to R1 alone). Refuses the forms whose values R2 cannot follow."""
    index, _ = FUSED_ATTENTION[node.op]
    if named_input(node, index) is None or named_input(node, 1) is None:
        raise AnalysisError(node, f"{node.op} with packed QKV/KV (no separate value input); R2 needs one")
    if named_input(node, index) is not tensor:
        return False
    if node.op == "MultiHeadAttention" and named_input(node, 3) is not None:
        raise AnalysisError(node, "MultiHeadAttention with a bias input adds a bias to the values in their "
                                  "original basis; not supported")
    return True


def attention_head_dim(node: gs.Node, v_features: int) -> int | None:
    """The head size of a fused attention node, from its head-count attributes."""
    heads = node.attrs.get("kv_num_heads") if node.op == "GroupQueryAttention" else node.attrs.get("num_heads")
    if not heads or v_features % int(heads):
        return None
    return v_features // int(heads)


def present_value(node: gs.Node):
    """The present value output (the cache, stored in the rotated basis), if any."""
    _, index = FUSED_ATTENTION[node.op]
    return named_output(node, index)


def value_cache_tensor(tensor: gs.Tensor) -> bool:
    """Whether tensor is the present value output of a fused attention node."""
    node = producer(tensor)
    return node is not None and is_fused_attention(node) and present_value(node) is tensor
