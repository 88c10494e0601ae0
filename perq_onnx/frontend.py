"""The front end: what load_graph does to a model before anything reads it, so that the analysis
sees one canonical form.

In order, on the ModelProto (weights are never read):

1. opset: older exports are converted to opset TARGET_OPSET (21) with onnx's version converter on
   a weightless skeleton (``upgrade_opset``); onnxruntime's schemaless default-domain ops are
   stashed in a placeholder domain meanwhile (``stash_schemaless``, also used to check files);
2. linears: ``FusedMatMul(x, W, transB)`` / ``Gemm(x, W, C, transB)`` by a constant 2-D float
   weight become ``MatMul(x, W or Transpose(W))`` (+ ``Add(C)``), the same function in the form the
   analysis reads as a Linear (``canonicalize_linears``);
3. shapes: ONNX shape inference with data propagation, onnxruntime's contrib ops (which it cannot
   infer) replaced meanwhile by standard ops giving their outputs the same shape and type, then
   put back: the inferred value_info stays, the nodes are exactly the original ones
   (``infer_shapes``; value_info the exporter declared for constants is dropped first,
   ``drop_constant_value_info``); the past/present KV head dimension that onnxruntime-genai's model builder
   leaves symbolic (``kv_cache_dim``; its genai_config.json gives it) is set from each
   GroupQueryAttention's head size, so that onnxruntime can be fed an empty cache during
   calibration and every output declares it (``fill_cache_head_size``);

and on the imported onnx-graphsurgeon graph:

4. names: every node gets a unique name (``name_nodes``): the analysis' records and the passes
   refer to nodes by name. Generated names never collide with existing ones.

onnxruntime's fused norms and attention blocks are kept as they are (the outputs keep them, with
folded weights); the analysis reads them through the op tables of fused_ops.py.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .errors import PerqError
from .fused_ops import CONTRIB, DEFAULT_DOMAINS, FUSED_ATTENTION, SHAPE_PROXIES


def canonicalize(model: onnx.ModelProto, path) -> onnx.ModelProto:
    """Steps 1-3 of the module docstring; returns the (possibly new) ModelProto."""
    model = upgrade_opset(model, path)
    canonicalize_linears(model)
    drop_constant_value_info(model)
    model = infer_shapes(model)
    fill_cache_head_size(model)
    return model


def drop_constant_value_info(model: onnx.ModelProto) -> int:
    """Remove value_info declared for initializers and Constant outputs: the constant gives its
    own shape, and a declaration that contradicts it fails onnx's full check of every output
    (onnxruntime-genai's model builder declares its [1]-shaped Constants as scalars). Returns how
    many were removed."""
    g = model.graph
    constants = {i.name for i in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    kept = [v for v in g.value_info if v.name not in constants]
    removed = len(g.value_info) - len(kept)
    if removed:
        g.ClearField("value_info")
        g.value_info.extend(kept)
    return removed


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value_info (with constant propagation: lets the analysis check head
    layouts), its nodes unchanged; the model as it was when inference fails."""
    originals = _proxy_for_shape_inference(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a help, not a requirement
        pass
    _restore_nodes(model, originals)
    return model


def fill_cache_head_size(model: onnx.ModelProto) -> int:
    """Give the symbolic last dimension of the past/present key and value of each
    GroupQueryAttention that are graph inputs/outputs its head size: the packed QKV width /
    (num_heads + 2 kv_num_heads), or the key width / kv_num_heads (widths from the inferred
    shapes or the producing MatMul's weight; a width not known is left alone). Returns how many
    dimensions were set."""
    g = model.graph
    io = {v.name: v for v in (*g.input, *g.output)}
    shapes = {v.name: v.type.tensor_type.shape.dim for v in (*g.value_info, *g.input, *g.output)}
    weights = {i.name: i.dims for i in g.initializer}
    for node in g.node:  # shape inference stops at the attention (no proxy for packed QKV)
        if node.op_type == "MatMul" and len(weights.get(node.input[1], ())) == 2:
            shapes[node.output[0]] = [onnx.TensorShapeProto.Dimension(dim_value=weights[node.input[1]][1])]
    filled = 0
    for node in g.node:
        if node.op_type != "GroupQueryAttention" or node.domain != CONTRIB or len(node.input) < 5:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        heads, kv_heads = int(attrs.get("num_heads", 0)), int(attrs.get("kv_num_heads", 0))
        packed = not node.input[1]
        dims = shapes.get(node.input[0] if packed else node.input[1])
        parts = heads + 2 * kv_heads if packed else kv_heads
        if not dims or not dims[-1].HasField("dim_value") or parts <= 0 or dims[-1].dim_value % parts:
            continue
        for name in (*node.input[3:5], *node.output[1:3]):
            cache = io[name].type.tensor_type.shape.dim if name in io else ()
            if len(cache) == 4 and not cache[3].HasField("dim_value"):
                cache[3].dim_value = dims[-1].dim_value // parts  # clears the dim_param (a oneof)
                filled += 1
    return filled


def name_nodes(graph: gs.Graph) -> int:
    """Give every unnamed node, and every node whose name an earlier node already has, a unique
    name ``<op>_<index>`` (``_<k>`` added while that is taken); returns how many were named."""
    taken = {node.name for node in graph.nodes if node.name}
    seen, renamed = set(), 0
    for i, node in enumerate(graph.nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        node.name = _fresh(f"{node.op}_{i}", taken)
        seen.add(node.name)
        renamed += 1
    return renamed


TARGET_OPSET = 21  # what perq-onnx rewrites in: int4 Q/DQ types and the function bodies need 21
_STUB = "perq-onnx:weightless-stub"


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def upgrade_opset(model: onnx.ModelProto, path) -> onnx.ModelProto:
    """The model converted to opset TARGET_OPSET with onnx's version converter when it is older
    (optimum exports opset 14..18; Reduce* take axes as an input from 18, int4 Q/DQ need 21).

    The converter is given a weightless skeleton (initializers replaced by stubs with their name,
    type and shape, marked as external data), so neither external nor embedded weights are read
    or copied; the converted nodes, value infos and opset imports are moved back into `model`,
    whose initializers stay as they were. A conversion that fails, or that would need a weight's
    bytes, is refused naming the opset. Newer opsets are kept (the function bodies perq-onnx adds
    are written at the model's opset, see export_structure)."""
    version = default_opset(model)
    if version is None:
        raise PerqError(f"{path}: the model imports no version of the default ONNX domain")
    if version >= TARGET_OPSET:
        return model
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g = skeleton.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    stashed = stash_schemaless(skeleton)  # onnxruntime's own default-domain ops (SimplifiedLayerNormalization)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    g.sparse_initializer.extend(model.graph.sparse_initializer)
    names = set()
    for t in model.graph.initializer:
        stub = g.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", _STUB
        names.add(t.name)
    refusal = f"{path}: cannot convert the model from opset {version} to opset {TARGET_OPSET} (perq-onnx rewrites in {TARGET_OPSET}):"
    try:
        converted = onnx.version_converter.convert_version(skeleton, TARGET_OPSET)
    except Exception as exc:  # noqa: BLE001 - the converter raises several types
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise PerqError(f"{refusal} {reason}; re-export it with --opset {TARGET_OPSET}") from None
    del skeleton
    added = []
    for t in converted.graph.initializer:
        is_stub = any(e.key == "location" and e.value == _STUB for e in t.external_data)
        if t.name in names:
            if not is_stub:
                raise PerqError(f"{refusal} the converter rewrote weight '{t.name}'; re-export it "
                                f"with --opset {TARGET_OPSET}")
        elif is_stub:
            raise PerqError(f"{refusal} the converter made '{t.name}' from a weight; re-export it "
                            f"with --opset {TARGET_OPSET}")
        else:
            added.append(t)
    if default_opset(converted) != TARGET_OPSET:
        raise PerqError(f"{refusal} the converter returned opset {default_opset(converted)}")
    unstash(converted, stashed)
    model.graph.ClearField("node")
    model.graph.ClearField("value_info")
    model.ClearField("opset_import")
    model.graph.node.extend(converted.graph.node)
    model.graph.value_info.extend(converted.graph.value_info)
    model.opset_import.extend(converted.opset_import)
    model.graph.initializer.extend(added)
    model.ir_version = max(model.ir_version, 10)  # opset 21 is IR version 10
    return model


_STASH_DOMAIN = "perq-onnx.stash"


def stash_schemaless(model: onnx.ModelProto) -> bool:
    """Move default-domain nodes that ONNX has no schema for (onnxruntime registers some of its
    own ops there: SimplifiedLayerNormalization) to a placeholder domain, which the version
    converter leaves alone as it leaves com.microsoft ops; whether any were moved."""
    moved = False
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, ""):
            node.domain = _STASH_DOMAIN
            moved = True
    if moved:
        model.opset_import.append(onnx.helper.make_opsetid(_STASH_DOMAIN, 1))
    return moved


def unstash(model: onnx.ModelProto, stashed: bool) -> None:
    """Put the nodes stash_schemaless moved back into the default domain."""
    if not stashed:
        return
    for node in model.graph.node:
        if node.domain == _STASH_DOMAIN:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != _STASH_DOMAIN]
    model.ClearField("opset_import")
    model.opset_import.extend(kept)


def canonicalize_linears(model) -> int:
    """Rewrite, in place in the ModelProto (before shape inference, so shapes propagate),
    FusedMatMul(x, W, transB) / Gemm(x, W, C, transB) by a constant 2-D float initializer W to
    MatMul(x, W or Transpose(W)) (+ Add(C)): the same function (only alpha = beta = 1, no transA,
    no batch transposes), in the form the analysis reads as a Linear. Returns how many. The nodes
    and tensors it adds get names no node or tensor of the model has."""
    inits = {i.name: i for i in model.graph.initializer}
    g = model.graph
    taken = {n.name for n in g.node} | {t for n in g.node for t in (*n.input, *n.output)} | set(inits) \
        | {v.name for v in (*g.input, *g.output, *g.value_info)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        fused = node.op_type == "FusedMatMul" and node.domain == CONTRIB
        gemm = node.op_type == "Gemm" and node.domain in DEFAULT_DOMAINS
        w = inits.get(node.input[1]) if (fused or gemm) and len(node.input) > 1 else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if w is None or len(w.dims) != 2 or w.data_type not in floats \
                or float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0 \
                or attrs.get("transA", 0) or attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            weight = _fresh(f"{node.name or w.name}/weight_transposed", taken)
            nodes.append(onnx.helper.make_node("Transpose", [node.input[1]], [weight], perm=[1, 0],
                                               name=_fresh(f"{node.name or w.name}/WeightTranspose", taken)))
        bias = node.input[2] if gemm and len(node.input) > 2 and node.input[2] else None
        out = node.output[0]
        matmul = onnx.helper.make_node("MatMul", [node.input[0], weight],
                                       [_fresh(f"{out}/matmul_output", taken) if bias else out], name=node.name)
        nodes.append(matmul)
        if bias:
            nodes.append(onnx.helper.make_node("Add", [matmul.output[0], bias], [out],
                                               name=_fresh(f"{node.name}/BiasAdd", taken)))
        rewritten += 1
    if rewritten:
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
    return rewritten


def _fresh(name: str, taken: set[str]) -> str:
    """name, or name_<k> for the first k that no node or tensor has; recorded as taken."""
    fresh, k = name, 0
    while fresh in taken:
        k += 1
        fresh = f"{name}_{k}"
    taken.add(fresh)
    return fresh


def _proxy_for_shape_inference(model):
    """Replace, in place, the onnxruntime ops ONNX shape inference does not know (its fused norms,
    activations, rotary and attention ops) by standard ops that give their outputs the same shape
    and type, so that shapes propagate past them; returns the original node list for
    _restore_nodes (None when nothing was replaced). Attention proxies apply only with separate
    q/k/v inputs, where output 0 has the query's shape."""
    originals = [onnx.NodeProto() for _ in model.graph.node]
    replaced, nodes = False, []
    for original, node in zip(originals, model.graph.node):
        original.CopyFrom(node)
        proxies = SHAPE_PROXIES.get(node.op_type)
        known = node.domain in DEFAULT_DOMAINS + (CONTRIB,) and not onnx.defs.has(node.op_type, node.domain or "")
        packed = node.op_type in FUSED_ATTENTION and (len(node.input) < 3 or not node.input[1] or not node.input[2])
        if proxies is None or not known or packed:
            nodes.append(original)
            continue
        for index, (op, inputs) in proxies.items():
            if index < len(node.output) and node.output[index] and all(i < len(node.input) and node.input[i]
                                                                        for i in inputs):
                nodes.append(onnx.helper.make_node(op, [node.input[i] for i in inputs], [node.output[index]],
                                                   name=f"{node.name}/shape_proxy_{index}"))
                replaced = True
    if not replaced:
        return None
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return originals


def _restore_nodes(model, originals) -> None:
    """Undo _proxy_for_shape_inference (the inferred value_info stays)."""
    if originals is None:
        return
    model.graph.ClearField("node")
    model.graph.node.extend(originals)
