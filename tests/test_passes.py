"""Per-pass tests on the hand-made decoder (tests/handmade.py; no torch, no optimum).

Each test runs one pass (or the shortest prefix it requires) through a Context and a
PassManager, writes the result the way the pipeline does (export_structure + WeightStore), and
compares it with the original in onnxruntime:

* exactness: the float passes keep the logits to 1e-5 relative, and they really act: the
  residual stream, the value heads, the down_proj input are the original tensors times the
  transform (read from the rewritten model through extra graph outputs);
* weight quantization: int4 DequantizeLinear with the right axis / block_size, codes and scales
  equal to perq_onnx.rounding.rtn on the same weight, reported error equal to numpy's;
* contracts: a misordered pipeline, or a pass that breaks its own postcondition, raises
  InternalError naming the pass and the condition;
* the frozen analysis records are the same before and after every pass has run.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from handmade import HEAD_DIM, HIDDEN, INTERMEDIATE, VOCAB, build_decoder
from perq_onnx.analysis import analyze
from perq_onnx.calibration import with_outputs
from perq_onnx.errors import InternalError
from perq_onnx.graph import export_structure, load_graph
from perq_onnx.hadamard import hadamard, random_orthogonal
from perq_onnx.passes.base import GAMMAS_FOLDED, QUANTIZED_WEIGHT, Context, Pass, PassManager, PassResult
from perq_onnx.passes.fold_norm_gammas import FoldNormGammas
from perq_onnx.passes.online_rotation import InsertOnlineRotation
from perq_onnx.passes.permute_mlp import PermuteMLP
from perq_onnx.passes.quantize_activations import IntQDQ, QuantizeActivations
from perq_onnx.passes.quantize_weights import QuantizeWeights
from perq_onnx.passes.rotate_heads import RotateHeads
from perq_onnx.passes.rotate_residual import RotateResidual
from perq_onnx.pipeline import optimize
from perq_onnx.rounding import WeightQuant, relative_error, rtn
from perq_onnx.runtime import make_feeds, session
from perq_onnx.settings import Rounding, Settings
from perq_onnx.targets import Simulate
from perq_onnx.transforms import BlockDiagonal, Chain, Dense, Permutation
from perq_onnx.weights import WeightStore

TOL = 1e-5
IDS = np.random.default_rng(7).integers(0, VOCAB, size=(2, 12))
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


# ------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module", params=[2, 1], ids=["mha", "gqa"])
def model(request, tmp_path_factory):
    """The hand-made decoder with 2 kv heads (multi-head) or 1 (grouped-query)."""
    return build_decoder(tmp_path_factory.mktemp("handmade") / "model.onnx", kv_heads=request.param)


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    return build_decoder(tmp_path_factory.mktemp("handmade_mha") / "model.onnx")


def new_context(path, tmp_path) -> Context:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    graph = load_graph(path)
    return Context(graph, analyze(graph), WeightStore(staging))


def rewrite(path, tmp_path, passes, name="out.onnx"):
    """Run passes on the model at path; write the result as the pipeline does. (ctx, results, out)"""
    ctx = new_context(path, tmp_path)
    results = PassManager(passes, progress=False).run(ctx)
    Simulate().finalize(ctx)
    model = export_structure(ctx.graph, ctx.functions.values(), ctx.min_opset, ctx.metadata)
    out = tmp_path / name
    ctx.store.write_model(model, ctx.graph, out)
    onnx.checker.check_model(str(out), full_check=True)
    return ctx, results, out


def run(path, tensors=()) -> dict[str, np.ndarray]:
    """logits and the named intermediate tensors of the model at path on IDS."""
    names = ["logits", *tensors]
    sess = session(with_outputs(onnx.load(str(path)), tensors))
    return dict(zip(names, sess.run(names, make_feeds(sess, IDS))))


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def initializers(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def node_weight(path, node_name: str, index: int = 1) -> np.ndarray:
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name == node_name)
    return initializers(path)[node.input[index]]


# ------------------------------------------------------------------------------- float passes

def test_handmade_model_is_recognised(model):
    s = analyze(load_graph(model))
    assert (s.hidden_size, s.intermediate_size, s.head_dim, s.vocab_size, len(s.layers)) == \
        (HIDDEN, INTERMEDIATE, HEAD_DIM, VOCAB, 2)
    assert all(n.gamma is not None and len(n.readers) in (1, 2, 3) for n in s.norms)
    assert [w.name for w in s.writers] == [f"layers.{i}.{m}" for i in (0, 1)
                                           for m in ("attn.o_proj", "mlp.down_proj")]


def test_fold_norm_gammas(model, tmp_path):
    ctx, _, out = rewrite(model, tmp_path, [FoldNormGammas()])
    gammas = {n.gamma for n in ctx.structure.norms}
    assert len(gammas) == 5
    written = onnx.load(str(out))
    nodes = {n.name: n for n in written.graph.node}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in written.graph.initializer}
    # the gamma Muls stay (so that onnxruntime can fuse the norm), multiplying by ones
    for g in gammas:
        scale = [inits[t] for t in nodes[g].input if t in inits]
        assert len(scale) == 1 and scale[0].shape == (HIDDEN,) and np.all(scale[0] == 1)
    assert not any(name.endswith(".gamma") for n in nodes.values() for name in n.input)
    # the readers' rows are scaled by gamma
    q = ctx.structure.layers[0].q
    gamma = initializers(model)["layers.0.input_layernorm.gamma"]
    np.testing.assert_allclose(node_weight(out, q.name), gamma[:, None] * node_weight(model, q.name), rtol=1e-6)
    assert relative(run(model)["logits"], run(out)["logits"]) < TOL


RESIDUAL_ROTATIONS = {
    "dense": lambda: Dense(random_orthogonal(HIDDEN, seed=3)),
    "perm-block": lambda: Chain(Permutation(np.random.default_rng(4).permutation(HIDDEN)),
                                BlockDiagonal(hadamard(8))),
}


@pytest.mark.parametrize("kind", RESIDUAL_ROTATIONS)
def test_rotate_residual(model, tmp_path, kind):
    t = RESIDUAL_ROTATIONS[kind]()
    ctx, _, out = rewrite(model, tmp_path, [FoldNormGammas(), RotateResidual(t, kind)])
    stream = ["embed_tokens", "layers.0/attn_residual", "layers.1/mlp_residual"]
    before, after = run(model, stream), run(out, stream)
    assert relative(before["logits"], after["logits"]) < TOL
    q = t.matrix(HIDDEN)
    for name in stream:  # every residual tensor is x @ Q
        np.testing.assert_allclose(after[name], before[name] @ q, rtol=1e-4, atol=1e-4 * np.abs(before[name]).max())
        assert relative(before[name], after[name]) > 0.1


def test_rotate_heads(model, tmp_path):
    h = random_orthogonal(HEAD_DIM, seed=5)
    ctx, _, out = rewrite(model, tmp_path, [RotateHeads(BlockDiagonal(h))])
    v = [layer.v.output for layer in ctx.structure.layers]
    before, after = run(model, v), run(out, v)
    assert relative(before["logits"], after["logits"]) < TOL
    for name in v:
        kv = before[name].shape[-1]
        np.testing.assert_allclose(after[name], before[name] @ np.kron(np.eye(kv // HEAD_DIM), h),
                                   rtol=1e-4, atol=1e-5)
        assert relative(before[name], after[name]) > 0.1


def test_permute_mlp(model, tmp_path):
    rng = np.random.default_rng(6)
    perms = {0: rng.permutation(INTERMEDIATE), 1: rng.permutation(INTERMEDIATE)}
    ctx, (result,), out = rewrite(model, tmp_path, [PermuteMLP(perms, "random")])
    downs = [layer.down.input for layer in ctx.structure.layers]
    before, after = run(model, downs), run(out, downs)
    assert relative(before["logits"], after["logits"]) < TOL
    for i, name in enumerate(downs):  # what down_proj reads is x[..., p]
        np.testing.assert_allclose(after[name], before[name][..., perms[i]], rtol=1e-5, atol=1e-6)
        assert not np.allclose(after[name], before[name])
    assert "random" in result[1].summary


@pytest.mark.parametrize("block", [8, 16, None], ids=["b8", "b16", "full"])
def test_insert_online_rotation(model, tmp_path, block):
    t = BlockDiagonal(hadamard(block)) if block else Dense(random_orthogonal(INTERMEDIATE, seed=9))
    ctx, _, out = rewrite(model, tmp_path, [InsertOnlineRotation(t, block)])
    layers = ctx.structure.layers
    rotated = [f"{layer.down.name}/online_rotation_output" for layer in layers]
    before = run(model, [layer.down.input for layer in layers])
    after = run(out, rotated)
    assert relative(before["logits"], after["logits"]) < TOL
    r = t.matrix(INTERMEDIATE)
    for layer, name in zip(layers, rotated):
        x = before[layer.down.input]
        np.testing.assert_allclose(after[name], x @ r, rtol=1e-4, atol=1e-5 * np.abs(x).max())
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("BlockHadamard") == (2 if block else 0)


def test_whole_float_pipeline_through_optimize(model, tmp_path):
    out = tmp_path / "perq.onnx"
    settings = Settings.parse(block="16", permute="random", residual_rotation="block", residual_block=8,
                              quantize=False)
    report = optimize(model, out, settings, progress=False)
    assert set(report.permutations) == {"layers.0.mlp", "layers.1.mlp", "residual"}
    assert relative(run(model)["logits"], run(out)["logits"]) < TOL


# ----------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("group", [None, 16], ids=["per-channel", "group16"])
def test_quantize_weights_rtn(mha, tmp_path, group):
    form = WeightQuant(4, group, True, "mse")
    ctx, (result,), out = rewrite(mha, tmp_path, [QuantizeWeights(form)])
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    errors = result[1].metrics["weight_rel_error"]
    assert len(errors) == 2 * len(LINEARS)
    for layer in ctx.structure.layers:
        for kind, lin in layer.linears().items():
            matmul = next(n for n in model.graph.node if n.name == lin.name)
            dq = producers[matmul.input[1]]
            assert dq.op_type == "DequantizeLinear"
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
            assert attrs == ({"axis": 1} if group is None else {"axis": 0, "block_size": group})
            codes_proto, scale_proto = inits[dq.input[0]], inits[dq.input[1]]
            assert codes_proto.data_type == onnx.TensorProto.INT4
            w = node_weight(mha, lin.name).astype(np.float32)
            expected = rtn(w, form)
            codes = numpy_helper.to_array(codes_proto).astype(np.int8)
            scale = numpy_helper.to_array(scale_proto)
            np.testing.assert_array_equal(codes, expected.codes)
            np.testing.assert_array_equal(scale, expected.scale)
            assert scale.shape == ((lin.out_features,) if group is None else (lin.in_features // group,
                                                                              lin.out_features))
            assert errors[f"layers.{layer.index}.{kind}"] == pytest.approx(relative_error(w, expected), rel=1e-6)
    # lm_head stays float; the quantized model runs and is close to, not equal to, the original
    lm_head = next(n for n in model.graph.node if n.name == "lm_head")
    assert lm_head.input[1] in inits and inits[lm_head.input[1]].data_type == onnx.TensorProto.FLOAT
    diff = relative(run(mha)["logits"], run(out)["logits"])
    assert 1e-4 < diff < 0.5



def test_lm_head_rounded_by_gptq_with_its_own_hessian(mha, tmp_path, monkeypatch):
    """When the target quantizes lm_head and GPTQ rounds, lm_head's input Hessian comes with the
    last calibration run and GPTQ rounds lm_head against it, as it rounds the decoder's linears."""
    from perq_onnx.calibration import Calibrator
    from perq_onnx.passes import quantize_weights
    calls, real = [], quantize_weights.gptq

    def spy(w, hessian, form, **kwargs):
        calls.append((w.shape, hessian.shape))
        return real(w, hessian, form, **kwargs)
    monkeypatch.setattr(quantize_weights, "gptq", spy)
    form = WeightQuant(4, 16, True, "mse")
    ctx = new_context(mha, tmp_path)
    ctx.calibrator = Calibrator(IDS, 1, False)
    PassManager([QuantizeWeights(form, Rounding.GPTQ, lm_head=form)], progress=False).run(ctx)
    assert calls[-1] == ((HIDDEN, VOCAB), (HIDDEN, HIDDEN)) and len(calls) == 2 * len(LINEARS) + 1
    head = ctx.node(ctx.structure.lm_head.name).inputs[1]
    assert head.name in ctx.recorded(QUANTIZED_WEIGHT)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_quantized_pipeline_through_optimize(tmp_path, kv_heads):
    """The whole pipeline with fused activation quantization writes a model that runs."""
    path = build_decoder(tmp_path / "model.onnx", kv_heads=kv_heads)
    out = tmp_path / "w4a4.onnx"
    optimize(path, out, Settings.parse(block="16", permute="random", a_bits=4, fused_ops=True), progress=False)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"BlockHadamardQuantize", "DequantizeLinear"} <= ops
    assert np.isfinite(run(out)["logits"]).all()

# -------------------------------------------------------------------------------- contracts

def contract_error(pattern_pass: str, when: str, condition: str) -> str:
    return re.escape(f"pass {pattern_pass}: {when} '{condition}' does not hold")


CONTRACTS = {
    "residual-before-gammas": (
        lambda: [RotateResidual(Dense(np.eye(HIDDEN)), "identity")],
        contract_error("RotateResidual", "precondition", "RMSNorm gammas folded")),
    "permute-after-online": (
        lambda: [InsertOnlineRotation(BlockDiagonal(hadamard(16)), 16),
                 PermuteMLP({0: np.arange(INTERMEDIATE), 1: np.arange(INTERMEDIATE)}, "none")],
        contract_error("PermuteMLP", "precondition", "no online rotation at down_proj yet")),
    "heads-after-weight-quant": (
        lambda: [QuantizeWeights(WeightQuant(4, None, True, "absmax")),
                 RotateHeads(BlockDiagonal(hadamard(HEAD_DIM)))],
        contract_error("RotateHeads", "precondition", "decoder weights are float constants")),
    "fused-without-online": (
        lambda: [QuantizeActivations(IntQDQ(4), fused=True)],
        contract_error("QuantizeActivations", "precondition", "online rotation at every down_proj")),
}


@pytest.mark.parametrize("case", CONTRACTS)
def test_misordered_pipeline_is_caught(mha, tmp_path, case):
    passes, message = CONTRACTS[case]
    with pytest.raises(InternalError, match=message):
        PassManager(passes(), progress=False).run(new_context(mha, tmp_path))


def test_correct_order_of_the_same_passes_is_accepted(mha, tmp_path):
    """The contracts above do not refuse everything: in order, the same passes run."""
    passes = [FoldNormGammas(), RotateResidual(Dense(np.eye(HIDDEN)), "identity"),
              RotateHeads(BlockDiagonal(hadamard(HEAD_DIM))),
              PermuteMLP({0: np.arange(INTERMEDIATE), 1: np.arange(INTERMEDIATE)}, "none"),
              InsertOnlineRotation(BlockDiagonal(hadamard(16)), 16),
              QuantizeWeights(WeightQuant(4, None, True, "absmax")), QuantizeActivations(IntQDQ(4), fused=True)]
    assert len(PassManager(passes, progress=False).run(new_context(mha, tmp_path))) == len(passes)


class ClaimsFolded(Pass):
    """Does nothing, yet claims the gammas are folded afterwards."""
    ensures = (GAMMAS_FOLDED,)

    def run(self, ctx):
        return PassResult("nothing")


def test_broken_postcondition_is_reported(mha, tmp_path):
    with pytest.raises(InternalError, match=contract_error("ClaimsFolded", "postcondition",
                                                           "RMSNorm gammas folded") + ".*not folded"):
        PassManager([ClaimsFolded()], progress=False).run(new_context(mha, tmp_path))


def test_analysis_records_are_not_mutated(model, tmp_path):
    ctx = new_context(model, tmp_path)
    before_repr, before_tuple = repr(ctx.structure), dataclasses.astuple(ctx.structure)
    passes = [FoldNormGammas(), RotateResidual(Dense(random_orthogonal(HIDDEN, 1)), "random"),
              RotateHeads(BlockDiagonal(hadamard(HEAD_DIM))),
              PermuteMLP({0: np.arange(INTERMEDIATE)[::-1].copy(), 1: np.arange(INTERMEDIATE)}, "test"),
              InsertOnlineRotation(BlockDiagonal(hadamard(16)), 16),
              QuantizeWeights(WeightQuant(4, 16, True, "absmax")), QuantizeActivations(IntQDQ(4), fused=True)]
    PassManager(passes, progress=False).run(ctx)
    assert repr(ctx.structure) == before_repr
    assert dataclasses.astuple(ctx.structure) == before_tuple
    assert repr(analyze(load_graph(model))) == before_repr
