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
* ``GroupQueryAttention`` with *packed* QKV (onnxruntime-genai's model builder: input 0 is one
  ``qkv_proj`` output, inputs 1 and 2 empty) reads its query, key and value as the column ranges
  [0, H d), [H d, (H + K) d), [(H + K) d, (H + 2K) d) of input 0 (H = num_heads, K = kv_num_heads,
  d the head size; ``packed_qkv_columns``); rotary (do_rotary) touches only q and k, so R2 folds
  into the V range of the packed weight (fused_slices.split_packed_qkv).

Nodes the builder leaves without a domain field (onnx-graphsurgeon reads None) are in the default
domain (``in_domain``).

Refused, one line naming the node (residual.py, and value_input here): a fused norm whose scale is not a constant vector, whose axis
is not the last one, whose inverse-RMS/mean outputs are read, or (Skip) with a bias input;
MultiHeadAttention with packed QKV/KV or an attention bias on the values, GroupQueryAttention with
packed KV only, packed QKV whose width is not (H + 2K) d.
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


def in_domain(node: gs.Node, domains: tuple[str, ...]) -> bool:
    """Whether node's domain is one of `domains` (no domain field, None here, is the default one)."""
    return (node.domain or "") in domains


def is_fused_rmsnorm(node: gs.Node) -> bool:
    return node.op in FUSED_RMSNORMS and in_domain(node, DEFAULT_DOMAINS + (CONTRIB,))


def fused_gamma_input(node: gs.Node) -> int | None:
    """The index of a fused RMSNorm's scale input (None for any other node)."""
    return FUSED_RMSNORMS[node.op] if is_fused_rmsnorm(node) else None


# ----------------------------------------------------------------------------- attention

def is_fused_attention(node: gs.Node) -> bool:
    return node.op in FUSED_ATTENTION and node.domain == CONTRIB


def is_packed_qkv(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether tensor is the packed QKV input of a GroupQueryAttention (input 0, key and value
    inputs empty: onnxruntime-genai's model builder)."""
    return is_fused_attention(node) and node.op == "GroupQueryAttention" and node.inputs[0] is tensor \
        and named_input(node, 1) is None and named_input(node, 2) is None


def packed_qkv_columns(node: gs.Node, width: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(head size, column ranges of q, k, v) of packed GroupQueryAttention `node` whose packed
    input has `width` columns; refuses a width that is not (num_heads + 2 kv_num_heads) x head size."""
    heads, kv_heads = int(node.attrs.get("num_heads", 0)), int(node.attrs.get("kv_num_heads", 0))
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads or width % (heads + 2 * kv_heads):
        raise AnalysisError(node, f"packed QKV of {width} columns does not split into num_heads {heads} + 2 x "
                                  f"kv_num_heads {kv_heads} heads of one size")
    d = width // (heads + 2 * kv_heads)
    bounds = (0, heads * d, (heads + kv_heads) * d, width)
    return d, tuple(zip(bounds[:-1], bounds[1:]))


def value_input(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether tensor is the value input of a fused attention node (q/k inputs are not; they are
    left to R1 alone). Refuses the forms whose values R2 cannot follow (packed QKV is read by
    heads.py before it gets here)."""
    index, _ = FUSED_ATTENTION[node.op]
    if named_input(node, index) is None or named_input(node, 1) is None:
        raise AnalysisError(node, f"{node.op} with packed QKV/KV (no separate value input) read other than as "
                                  "GroupQueryAttention's packed input of one qkv_proj; R2 needs the value columns")
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
