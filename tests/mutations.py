"""One-place edits of an optimum-exported tiny decoder (see models/tiny.py) that change its meaning.

Each mutation takes the exported ModelProto (Llama, or Qwen2 where it says so), edits it in place
and returns it. The edited model is still a valid, runnable ONNX model; its docstring says what it
now computes differently. tests/test_mutations.py checks that `perq-onnx optimize` either rewrites
each one exactly or refuses it.

Node names are those optimum gives the export ("/model/layers.0/mlp/down_proj/MatMul", ...).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

L0 = "/model/layers.0"
L1 = "/model/layers.1"
FLOAT = TensorProto.FLOAT


# --------------------------------------------------------------------------------------- helpers

def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(f"no node named {name!r}")


def out(name: str) -> str:
    """The (first) output tensor optimum gives node `name`."""
    return f"{name}_output_0"


def initializer(model, name) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def add_initializer(model, name: str, value) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def add_output(model, tensor: str) -> None:
    """Make tensor a graph output too, typed (rank and dims) as ONNX shape inference infers it."""
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    model.graph.output.append(next(vi for vi in inferred if vi.name == tensor))


def insert_after(model, anchor: str, *nodes: onnx.NodeProto) -> None:
    """Insert nodes right after node `anchor` (keeps the node list topologically sorted)."""
    i = next(k for k, n in enumerate(model.graph.node) if n.name == anchor)
    for k, n in enumerate(nodes):
        model.graph.node.insert(i + 1 + k, n)


def reroute(model, old: str, new: str) -> None:
    """Every node that reads tensor `old` reads `new` instead."""
    for n in model.graph.node:
        for i, t in enumerate(n.input):
            if t == old:
                n.input[i] = new


def splice(model, producer: str, *nodes: onnx.NodeProto) -> None:
    """Put a chain of nodes on the output of node `producer`: the first reads it, and every former
    reader of it reads the last node's output instead."""
    tensor = node(model, producer).output[0]
    reroute(model, tensor, nodes[-1].output[0])
    insert_after(model, producer, *nodes)


def weight_of(model, matmul: str) -> str:
    return node(model, matmul).input[1]


def set_reduce_axes(model, reduce: str, axes, keepdims=None) -> None:
    n = node(model, reduce)
    if axes is None:
        del n.input[1:]
    else:
        n.input[1] = add_initializer(model, f"{reduce}/mutated_axes", np.array(axes, dtype=np.int64))
    if keepdims is not None:
        for a in n.attribute:
            if a.name == "keepdims":
                a.i = keepdims


# ------------------------------------------------------------------------------------ baseline

def unmutated(model):
    """No edit: the export itself, the baseline every mutation starts from."""
    return model


# ---------------------------------------------------------------------------------- RMSNorm

def norm_mean_over_sequence(model):
    """Layer 0's input RMSNorm averages x^2 over the sequence axis (ReduceMean axes [1]) instead
    of the hidden axis: a per-channel statistic that a rotation of the hidden axis does not keep."""
    set_reduce_axes(model, f"{L0}/input_layernorm/ReduceMean", [1])
    return model


def norm_mean_over_batch_keepdims0(model):
    """Layer 0's input RMSNorm averages x^2 over the batch axis with keepdims=0 ([seq, hidden],
    broadcast back against [batch, seq, hidden]): again a per-channel statistic."""
    set_reduce_axes(model, f"{L0}/input_layernorm/ReduceMean", [0], keepdims=0)
    return model


def norm_mean_over_everything_keepdims0(model):
    """Layer 0's input RMSNorm averages x^2 over all axes (no axes input, keepdims=0): one scalar
    RMS for the whole batch. Rotation-invariant, so an exact rewrite exists."""
    set_reduce_axes(model, f"{L0}/input_layernorm/ReduceMean", None, keepdims=0)
    return model


def norm_epsilon_changed(model):
    """Layer 1's post-attention RMSNorm uses epsilon 0.25 instead of 1e-6 (rotation-invariant)."""
    add = node(model, f"{L1}/post_attention_layernorm/Add")
    add.input[1] = add_initializer(model, "mutated_epsilon", np.array(0.25, dtype=np.float32))
    return model


def norm_epsilon_per_channel(model):
    """Layer 0's input RMSNorm adds a per-channel epsilon vector [hidden] to mean(x^2), so the
    RMS becomes a per-channel vector (not rotation-invariant)."""
    add = node(model, f"{L0}/input_layernorm/Add")
    eps = np.linspace(1e-6, 0.5, 128, dtype=np.float32)
    add.input[1] = add_initializer(model, "mutated_epsilon_vector", eps)
    return model


def norm_square_is_abs(model):
    """Layer 0's input RMSNorm takes mean(|x|) instead of mean(x^2) (Abs replaces Pow)."""
    pow_ = node(model, f"{L0}/input_layernorm/Pow")
    pow_.op_type = "Abs"
    del pow_.input[1:]
    return model


def norm_square_times_other_tensor(model):
    """Layer 0's post-attention RMSNorm squares as x1 * x0 (x0: the stream before attention)
    instead of x1 * x1."""
    pow_ = node(model, f"{L0}/post_attention_layernorm/Pow")
    pow_.op_type = "Mul"
    pow_.input[1] = out(f"{L0}/input_layernorm/Cast")
    return model


def norm_pow_exponent_4(model):
    """Layer 0's input RMSNorm uses mean(x^4) instead of mean(x^2)."""
    pow_ = node(model, f"{L0}/input_layernorm/Pow")
    pow_.input[1] = add_initializer(model, "mutated_exponent", np.array(4.0, dtype=np.float32))
    return model


def norm_gamma_2d(model):
    """Layer 0's input RMSNorm gamma has shape [1, hidden] instead of [hidden] (same values,
    same broadcast result; the gamma Mul is no longer the 1-D per-channel scale the fold expects)."""
    gamma = initializer(model, "model.layers.0.input_layernorm.weight")
    gamma.dims[:] = [1, 128]
    return model


def norm_gamma_scalar(model):
    """Layer 0's input RMSNorm gamma is one scalar 1.7 (shape [1]) instead of a per-channel vector."""
    mul = node(model, f"{L0}/input_layernorm/Mul_1")
    mul.input[0] = add_initializer(model, "mutated_gamma", np.array([1.7], dtype=np.float32))
    return model


# ---------------------------------------------------------------- internal tensors as outputs

def output_v_proj(model):
    """Layer 0's v_proj output (value heads, rotated by R2) is also a graph output."""
    add_output(model, out(f"{L0}/self_attn/v_proj/MatMul"))
    return model


def output_mlp_intermediate(model):
    """Layer 0's MLP intermediate act(gate) * up (the down_proj input, permuted by P3) is also a
    graph output."""
    add_output(model, out(f"{L0}/mlp/Mul"))
    return model


def output_norm_before_gamma(model):
    """Layer 0's input RMSNorm x / rms(x), before gamma (in the rotated basis after R1), is also
    a graph output."""
    add_output(model, out(f"{L0}/input_layernorm/Cast_1"))
    return model


def output_norm_after_gamma(model):
    """Layer 0's input RMSNorm output gamma * x / rms(x) (the gamma Mul the fold removes) is also
    a graph output."""
    add_output(model, out(f"{L0}/input_layernorm/Mul_1"))
    return model


def output_o_proj(model):
    """Layer 0's o_proj output (a residual writer, rotated by R1) is also a graph output."""
    add_output(model, out(f"{L0}/self_attn/o_proj/MatMul"))
    return model


def output_residual_stream(model):
    """The residual stream after layer 0's attention is also a graph output."""
    add_output(model, out(f"{L0}/Add"))
    return model


# ------------------------------------------------------------------ extra readers of a tensor

def _sum_output(model, producer: str, name: str):
    s = helper.make_node("ReduceSum", [out(producer), add_initializer(model, f"{name}/axes", np.array([-1]))],
                         [name], name=name, keepdims=1)
    insert_after(model, producer, s)
    add_output(model, name)


def consumer_o_proj_sum(model):
    """A new node reads layer 0's o_proj output: ReduceSum over the hidden axis, a graph output
    (a sum over channels is not rotation-invariant)."""
    _sum_output(model, f"{L0}/self_attn/o_proj/MatMul", "o_proj_sum")
    return model


def consumer_v_proj_sum(model):
    """A new node reads layer 0's v_proj output: ReduceSum over its channels, a graph output."""
    _sum_output(model, f"{L0}/self_attn/v_proj/MatMul", "v_proj_sum")
    return model


def consumer_gate_proj_slice(model):
    """A new node reads layer 0's gate_proj output: its first 8 channels (Slice), a graph output."""
    gate = f"{L0}/mlp/gate_proj/MatMul"
    s = helper.make_node("Slice", [out(gate), add_initializer(model, "gate_slice/starts", np.array([0])),
                                   add_initializer(model, "gate_slice/ends", np.array([8])),
                                   add_initializer(model, "gate_slice/axes", np.array([-1]))],
                         ["gate_slice"], name="gate_slice")
    insert_after(model, gate, s)
    add_output(model, "gate_slice")
    return model


# -------------------------------------------------------------------------------- weights

def weight_graph_input(model):
    """Layer 0's gate_proj weight is a graph input [128, 256] fed at run time, not a constant."""
    name = weight_of(model, f"{L0}/mlp/gate_proj/MatMul")
    model.graph.initializer.remove(initializer(model, name))
    model.graph.input.append(helper.make_tensor_value_info(name, FLOAT, [128, 256]))
    return model


def weight_overridable_initializer(model):
    """Layer 0's up_proj weight is also listed as a graph input: an initializer that is only a
    default, which a caller may override at run time."""
    name = weight_of(model, f"{L0}/mlp/up_proj/MatMul")
    model.graph.input.append(helper.make_tensor_value_info(name, FLOAT, [128, 256]))
    return model


def weight_computed(model):
    """Layer 0's down_proj weight is computed: Mul(W, 2) by a node, so down_proj is doubled."""
    down = node(model, f"{L0}/mlp/down_proj/MatMul")
    doubled = helper.make_node("Mul", [down.input[1], add_initializer(model, "two", np.array(2.0, np.float32))],
                               ["down_weight_x2"], name="down_weight_x2")
    down.input[1] = "down_weight_x2"
    model.graph.node.insert(0, doubled)
    return model


def weight_shared_with_untouched_reader(model):
    """Layer 0's gate_proj weight initializer is also read by a new node outside the decoder:
    ReduceSum over its rows, a graph output (must keep the original weight's value)."""
    w = weight_of(model, f"{L0}/mlp/gate_proj/MatMul")
    s = helper.make_node("ReduceSum", [w, add_initializer(model, "gate_weight_sum/axes", np.array([0]))],
                         ["gate_weight_sum"], name="gate_weight_sum", keepdims=0)
    model.graph.node.insert(0, s)
    add_output(model, "gate_weight_sum")
    return model


def weight_shared_between_layers(model):
    """Layer 1's up_proj reads layer 0's up_proj weight initializer (one weight, two layers)."""
    node(model, f"{L1}/mlp/up_proj/MatMul").input[1] = weight_of(model, f"{L0}/mlp/up_proj/MatMul")
    return model


# ---------------------------------------------------------------------------------- casts

def _cast_round_trip(model, producer: str, to=TensorProto.FLOAT16):
    name = f"{producer}/mutated_cast"
    splice(model, producer,
           helper.make_node("Cast", [out(producer)], [name + "_low"], name=name + "_low", to=to),
           helper.make_node("Cast", [name + "_low"], [name + "_back"], name=name + "_back", to=FLOAT))


def cast_fp16_in_mlp(model):
    """Layer 0's MLP intermediate is rounded to float16 and back before down_proj."""
    _cast_round_trip(model, f"{L0}/mlp/Mul")
    return model


def cast_bf16_on_residual(model):
    """The residual stream after layer 0's attention is rounded to bfloat16 and back (rounding in
    the original channel basis: not rotation-invariant)."""
    _cast_round_trip(model, f"{L0}/Add", TensorProto.BFLOAT16)
    return model


# ------------------------------------------------------------------------------------ MLP

def _mlp_op(model, op: str, value):
    producer = f"{L0}/mlp/Mul"
    name = f"{L0}/mlp/mutated_{op}"
    c = add_initializer(model, name + "/constant", np.asarray(value, dtype=np.float32))
    splice(model, producer, helper.make_node(op, [out(producer), c], [name + "_output_0"], name=name))


def mlp_add_vector(model):
    """Layer 0's MLP adds a per-channel constant vector [256] to act(gate) * up before down_proj
    (not permutation-equivariant)."""
    _mlp_op(model, "Add", np.linspace(-0.5, 0.5, 256))
    return model


def mlp_mul_vector(model):
    """Layer 0's MLP scales act(gate) * up by a per-channel constant vector [256] before down_proj."""
    _mlp_op(model, "Mul", np.linspace(0.1, 3.0, 256))
    return model


def mlp_add_scalar(model):
    """Layer 0's MLP adds the scalar 0.05 to act(gate) * up (permutation-equivariant: exact
    rewrite exists)."""
    _mlp_op(model, "Add", 0.05)
    return model


def mlp_gate_bias_2d(model):
    """Layer 0's gate_proj gets a bias of shape [1, 256] (broadcasts like a [256] bias)."""
    _bias(model, f"{L0}/mlp/gate_proj/MatMul", np.linspace(-0.3, 0.3, 256).reshape(1, 256))
    return model


def mlp_swap_gate_up(model):
    """Layer 0's MLP applies SiLU to up_proj's output and gates with gate_proj's (roles swapped)."""
    gate, up = out(f"{L0}/mlp/gate_proj/MatMul"), out(f"{L0}/mlp/up_proj/MatMul")
    node(model, f"{L0}/mlp/act_fn/Sigmoid").input[0] = up
    node(model, f"{L0}/mlp/act_fn/Mul").input[0] = up
    mul = node(model, f"{L0}/mlp/Mul")
    mul.input[1] = gate
    # the act_fn nodes now read up_proj's output, which comes later in the node list
    act = [node(model, f"{L0}/mlp/act_fn/Sigmoid"), node(model, f"{L0}/mlp/act_fn/Mul")]
    for n in act:
        model.graph.node.remove(n)
    insert_after(model, f"{L0}/mlp/up_proj/MatMul", *act)
    return model


def mlp_softmax_activation(model):
    """Layer 0's MLP activation is gate * Softmax(gate) over the channels instead of gate * Sigmoid(gate)."""
    sig = node(model, f"{L0}/mlp/act_fn/Sigmoid")
    sig.op_type = "Softmax"
    sig.attribute.append(helper.make_attribute("axis", -1))
    return model


# ----------------------------------------------------------------------- attention, residual

def _bias(model, matmul: str, value):
    name = f"{matmul}/mutated_bias"
    b = add_initializer(model, name + "/value", np.asarray(value, dtype=np.float32))
    splice(model, matmul, helper.make_node("Add", [out(matmul), b], [name + "_output_0"], name=name))


def heads_interleaved(model):
    """Layer 0's value Reshape uses head size 2 ([b, s, 32, 2]) and its Transpose perm [0, 3, 1, 2]:
    kv head h is made of v_proj channels h, h+2, h+4, ... instead of a contiguous block of 32."""
    concat = node(model, f"{L0}/self_attn/Concat_2")
    concat.input[2] = add_initializer(model, "heads_interleaved/32", np.array([32]))
    concat.input[3] = add_initializer(model, "heads_interleaved/2", np.array([2]))
    perm = next(a for a in node(model, f"{L0}/self_attn/Transpose_2").attribute if a.name == "perm")
    perm.ints[:] = [0, 3, 1, 2]
    return model


def extra_transpose_before_o_proj(model):
    """An extra Transpose (perm [0, 1, 3, 2]) after layer 0's attention output Transpose: o_proj
    reads the heads interleaved (channel d * heads + h instead of h * head_dim + d)."""
    t = f"{L0}/self_attn/Transpose_4"
    name = f"{L0}/self_attn/mutated_Transpose"
    splice(model, t, helper.make_node("Transpose", [out(t)], [out(name)], name=name, perm=[0, 1, 3, 2]))
    return model


def softmax_over_queries(model):
    """Layer 0's attention Softmax normalizes over the query axis (axis 2) instead of the keys."""
    sm = node(model, f"{L0}/self_attn/Softmax")
    next(a for a in sm.attribute if a.name == "axis").i = 2
    return model


def o_proj_bias(model):
    """Layer 0's o_proj (a residual writer) gets a bias [128] (an exact rewrite rotates it)."""
    _bias(model, f"{L0}/self_attn/o_proj/MatMul", np.linspace(-0.2, 0.2, 128))
    return model


def o_proj_bias_2d(model):
    """Layer 0's o_proj gets a bias of shape [1, 128] (broadcasts like a [128] bias)."""
    _bias(model, f"{L0}/self_attn/o_proj/MatMul", np.linspace(-0.2, 0.2, 128).reshape(1, 128))
    return model


def residual_add_relu(model):
    """Layer 0's attention residual Add adds Relu(o_proj output) instead of the o_proj output."""
    o = f"{L0}/self_attn/o_proj/MatMul"
    splice(model, o, helper.make_node("Relu", [out(o)], ["o_proj_relu"], name="o_proj_relu"))
    return model


# ------------------------------------------------------------------------- Qwen2 (biases)

def qwen2_v_bias_2d(model):
    """Qwen2: layer 0's v_proj bias has shape [1, 64] instead of [64] (same values)."""
    initializer(model, "model.layers.0.self_attn.v_proj.bias").dims[:] = [1, 64]
    return model


def qwen2_v_reads_k_bias(model):
    """Qwen2: layer 0's v_proj bias Add reads k_proj's bias initializer (one initializer, two readers)."""
    node(model, f"{L0}/self_attn/v_proj/Add").input[0] = "model.layers.0.self_attn.k_proj.bias"
    return model
