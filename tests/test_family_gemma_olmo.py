"""Gemma 1/2/3 (text) and OLMo2: tiny random models exported by optimum are rewritten exactly
(--no-quant, with and without KV cache), their quantized outputs run, and what is refused is
refused in one line.

Gemma 1 is a pre-norm model (gamma = 1 + w, embedding scaled by sqrt(hidden), GeGLU): every
rewrite applies, R1 included. Gemma 2/3 and OLMo2 put an RMSNorm with a per-channel gamma on each
sublayer's output: R1 is not exact there (perq_onnx/post_norms.py), refused when asked for
explicitly; left unset, the online residual rotation takes its place when activations are
quantized (a permutation of the stream, a block Hadamard at each pre-norm's output folded into the
readers: exact too), else R1 is skipped (one line in the report either way); R2, P3, R3 apply;
with a uniform output gamma R1 is exact again and is applied.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from perq_onnx.analysis import AnalysisError, analyze
from perq_onnx.calibration import generate
from perq_onnx.cli import main
from perq_onnx.errors import InternalError, PerqError
from perq_onnx.graph import load_graph
from perq_onnx.models.tiny import FAMILY_ARCHS
from perq_onnx.pipeline import calibrate, optimize
from perq_onnx.runtime import logits, session
from perq_onnx.settings import Settings

from conftest import family_exporter, family_id as _id, random_ids, relative_difference

TOL = 1e-4
POST_NORM = ("gemma2", "gemma3", "olmo2")
MODELS = [(arch, past) for arch in FAMILY_ARCHS for past in (False, True)]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Each tiny model exported once for this module (Gemma tied like the real ones, OLMo2 untied)."""
    return family_exporter(tmp_path_factory.mktemp("family"), {a: a != "olmo2" for a in FAMILY_ARCHS})


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS, ids=_id)
def test_no_quant_exact(family, tmp_path, model):
    arch, past = model
    path = family(arch, past)
    stats = calibrate(path, generate(path, 2, 32, seed=0), progress=False)
    ids = random_ids()
    # R1 left to the pipeline (full, or skipped on post-norms), and a block R1 where it is exact
    block_r1 = "none" if arch in POST_NORM else "block"
    for i, kw in enumerate([dict(block="16"), dict(block="32", permute="zigzag", residual_rotation=block_r1)]):
        out = tmp_path / f"out{i}.onnx"
        report = optimize(path, out, Settings.parse(quantize=False, **kw), stats=stats, progress=False)
        diff = relative_difference(path, out, ids)
        assert 0.0 < diff < TOL, (kw, diff)
        passes = " ".join(report.summaries)
        assert "RotateHeads" in passes and "PermuteMLP" in passes and "InsertOnlineRotation" in passes
        if arch in POST_NORM:
            assert "RotateResidual" not in passes
            if "residual_rotation" not in kw:
                assert report.summaries[0].startswith("residual rotation skipped (R1 would not be exact): node '")
        else:
            assert "RotateResidual" in passes
        out.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_structure(family, arch):
    s = analyze(load_graph(family(arch)))
    assert len(s.layers) == 2 and s.hidden_size == 128 and s.intermediate_size == 256 and s.head_dim == 32
    kinds = [r.kind for r in s.regions()]
    if arch in POST_NORM:
        assert "post_attention_layernorm" in s.residual_blocker and "residual" not in kinds
        for layer in s.layers:
            assert layer.attn_output_norm.writer == layer.o.name
            assert layer.mlp_output_norm.writer == layer.down.name
    else:
        assert s.residual_blocker is None and kinds[0] == "residual"
        assert all(layer.attn_output_norm is None and layer.mlp_output_norm is None for layer in s.layers)
    if arch == "olmo2":  # no pre-norms: q/k/v and gate/up read the residual stream directly
        assert all(not layer.input_norm.nodes and not layer.mlp_norm.nodes for layer in s.layers)
        assert all(len(layer.input_norm.readers) == 3 for layer in s.layers)
    else:
        assert all(layer.input_norm.gamma and layer.mlp_norm.gamma for layer in s.layers)
    assert kinds.count("mlp") == 2 and kinds.count("heads") == 2


@pytest.mark.slow
@pytest.mark.parametrize("target", ["simulate", "ort"])
@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_quantized_runs(family, tmp_path, arch, target):
    path = family(arch)
    out = tmp_path / "q.onnx"
    optimize(path, out, Settings.parse(block="16", permute="random", target=target), progress=False)
    ref, got = logits(session(path), random_ids()), logits(session(out), random_ids())
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert not np.allclose(got, ref)  # it was quantized


def _output_norm_gammas(model: onnx.ModelProto, path) -> list[str]:
    s = analyze(load_graph(path))
    return [n.gamma for layer in s.layers for n in (layer.attn_output_norm, layer.mlp_output_norm)]


@pytest.mark.slow
def test_uniform_output_gamma_allows_r1(family, tmp_path):
    """rms(yQ) = rms(y), so an output norm with a uniform gamma commutes with R1: applied, exact."""
    path = family("gemma2")
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for gamma in _output_norm_gammas(model, path):
        name = next(t for t in nodes[gamma].input if t in inits)
        inits[name].CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(inits[name]), 1.7), name))
    uniform = tmp_path / "uniform.onnx"
    onnx.save(model, uniform)
    assert analyze(load_graph(uniform)).residual_blocker is None
    out = tmp_path / "out.onnx"
    report = optimize(uniform, out, Settings.parse(block="16", permute="random", quantize=False), progress=False)
    assert any(s.startswith("RotateResidual") for s in report.summaries)
    assert 0.0 < relative_difference(uniform, out, random_ids()) < TOL


@pytest.mark.slow
def test_refused_in_one_line(family, tmp_path):
    """An output norm's result read by something besides the residual Add is refused, naming a node."""
    path = family("olmo2")
    model = onnx.load(path)
    gamma = _output_norm_gammas(model, path)[0]
    norm_out = next(n for n in model.graph.node if n.name == gamma).output[0]
    model.graph.node.append(helper.make_node("Relu", [norm_out], ["extra"], name="extra_reader"))
    model.graph.output.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, None))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    with pytest.raises(AnalysisError) as info:
        optimize(bad, tmp_path / "out.onnx", Settings.parse(quantize=False), progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("node '") and "output norm" in message


@pytest.mark.slow
@pytest.mark.parametrize("residual", ["full", "block"])
def test_explicit_residual_rotation_on_post_norms_is_an_error(family, tmp_path, capsys, residual):
    """Asking for R1 on a model where it is not exact is refused in one line naming the output norm
    (exit 2 on the command line, nothing written), instead of being skipped."""
    path, out = family("gemma3"), tmp_path / "out" / "model.onnx"
    with pytest.raises(PerqError) as info:
        optimize(path, out, Settings.parse(quantize=False, residual_rotation=residual), progress=False)
    message = str(info.value)
    assert "\n" not in message and f"--residual-rotation {residual}" in message
    assert "node '" in message and "post_attention_layernorm" in message and "per-channel gamma" in message
    capsys.readouterr()
    assert main(["optimize", str(path), "-o", str(out), "--no-quant", "--residual-rotation", residual]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("perq-onnx: error: --residual-rotation") and "node '" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_residual_rotation_pass_refuses_post_norms(family, tmp_path):
    """Running R1 by hand on a structure it is not exact for fails its precondition, naming it."""
    from perq_onnx.passes.base import Context, PassManager
    from perq_onnx.passes.fold_norm_gammas import FoldNormGammas
    from perq_onnx.passes.rotate_residual import RotateResidual
    from perq_onnx.transforms import Permutation
    from perq_onnx.weights import WeightStore

    graph = load_graph(family("gemma3"))
    ctx = Context(graph, analyze(graph), WeightStore(tmp_path))
    with pytest.raises(InternalError, match="RotateResidual: precondition 'a residual rotation is exact"):
        PassManager([FoldNormGammas(), RotateResidual(Permutation(np.arange(128)), "identity")], False).run(ctx)


@pytest.mark.slow
def test_gemma3_270m_recipe_exact(tmp_path):
    """The Gemma 3 270M recipe (skipped without its GGUF package): export, --no-quant rewrite
    (R1 skipped, R2/P3/R3 applied) and the same logits on a few tokens."""
    from perq_onnx.models import gemma3, resolve

    if not gemma3.available():
        pytest.skip(f"the {gemma3.PIP_NAME} package is not installed")
    path = resolve("gemma3-270m")
    ids = np.array([[2, 818, 5279, 529, 7001, 563, 9079, 236761]])  # <bos> and 7 token ids
    out = tmp_path / "out.onnx"  # a random P3 needs no calibration run (massdiff: same rewrite, other order)
    report = optimize(path, out, Settings.parse(block="16", permute="random", quantize=False), progress=False)
    assert "skipped (R1 would not be exact)" in report.summaries[0]
    assert any(s.startswith("InsertOnlineRotation") for s in report.summaries)
    assert relative_difference(path, out, ids) < TOL


# ------------------------------------------------------------- the online residual rotation

def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.slow
@pytest.mark.parametrize("model", [(a, False) for a in (*POST_NORM, "gemma")] + [("gemma3", True)], ids=_id)
def test_online_residual_rotation_exact(family, tmp_path, model):
    """--residual-rotation online (a block or full Hadamard at each pre-norm's output, its transpose
    folded into q/k/v and gate/up) is exact on post-norm models, and on a pre-norm one (Gemma) too:
    the residual stream, its norms and the output norms are untouched."""
    arch, past = model
    path = family(arch, past)
    for kw, blocks in ((dict(block="16"), 3 * 2), (dict(block="full", permute="none"), 0)):
        out = tmp_path / "out.onnx"
        settings = Settings.parse(quantize=False, residual_rotation="online", **{"permute": "random", **kw})
        report = optimize(path, out, settings, progress=False)
        assert 0.0 < relative_difference(path, out, random_ids()) < TOL, kw
        passes = " ".join(report.summaries)
        assert "RotateResidualOnline: online" in passes and "at 4 residual reader inputs" in passes
        assert "RotateResidual:" not in passes and "FoldNormGammas" not in passes  # gammas stay in the norms
        assert _ops(out).count("BlockHadamard") == blocks  # 2 per layer at the readers, 1 at down_proj
        # with a block, the whole stream is permuted first (random here), gammas included
        assert ("PermuteResidual: residual stream permuted (random" in passes) == (blocks > 0)
        out.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("arch", POST_NORM)
def test_online_residual_rotation_massdiff_exact(family, tmp_path, arch):
    """PeRQ's massdiff permutation of the residual stream, from the calibrated mean |x| of what the
    readers read, folded offline before the online block Hadamard: exact, and really a permutation."""
    path = family(arch)
    stats = calibrate(path, generate(path, 2, 32, seed=0), progress=False)
    assert stats["residual_readers"].shape == (128,)
    out = tmp_path / "out.onnx"
    report = optimize(path, out, Settings.parse(quantize=False, block="16", residual_rotation="online"),
                      stats=stats, progress=False)
    assert 0.0 < relative_difference(path, out, random_ids()) < TOL
    perm = report.permutations["residual"]
    assert sorted(perm) == list(range(128)) and (perm != np.arange(128)).any()
    assert any(s.startswith("PermuteResidual: residual stream permuted (massdiff") for s in report.summaries)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma3", "olmo2", "gemma"])
def test_online_residual_rotation_by_default(family, tmp_path, arch):
    """W4A4 on a post-norm model: the planner picks the online residual rotation where R1 is not
    exact and says so; W4A16 (float activations) skips it as before; a pre-norm model keeps R1."""
    path = family(arch)
    out = tmp_path / "q.onnx"
    report = optimize(path, out, Settings.parse(block="16", permute="random"), progress=False)
    got = logits(session(out), random_ids())
    assert np.isfinite(got).all() and not np.allclose(got, logits(session(path), random_ids()))
    passes = " ".join(report.summaries)
    if arch == "gemma":
        assert "RotateResidual:" in passes and "RotateResidualOnline" not in passes
        return
    assert report.summaries[0].startswith("residual rotation online (R1 would not be exact: node '")
    assert "RotateResidualOnline: online block Hadamard b=16" in passes
    # the activation quantizer at q/k/v and gate/up reads the rotated tensors
    model = onnx.load(str(out), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    qdq = [n for n in model.graph.node if "/input_qdq/" in n.name]
    rotated = {n.output[0] for n in model.graph.node if n.op_type == "BlockHadamard"}
    assert len(rotated) == 6 and any(i in rotated for n in qdq for i in n.input)
    assert all(producers[t].op_type == "BlockHadamard" for t in rotated)
    w4a16 = optimize(path, out, Settings.parse(block="16", permute="random", a_bits=16), progress=False)
    assert w4a16.summaries[0].startswith("residual rotation skipped (R1 would not be exact)")


@pytest.mark.slow
def test_online_residual_rotation_refusals(family, tmp_path, capsys):
    """What the online residual rotation cannot do is refused in one line naming the option or node."""
    path, out = family("gemma3"), tmp_path / "out" / "model.onnx"
    cases = [(dict(block="none"), "--residual-rotation online needs a block size"),
             (dict(block="16", residual_block=32), "--residual-block 32 with --residual-rotation online and --block 16"),
             (dict(block="16", residual_block=256), "residual block size 256 does not divide the hidden size 128 (node '"),
]
    for kw, expected in cases:
        with pytest.raises(PerqError) as info:
            optimize(path, out, Settings.parse(quantize=False, residual_rotation="online", permute="random", **kw),
                     progress=False)
        assert expected in str(info.value) and "\n" not in str(info.value), kw
    # the genai target refuses Gemma before planning; the planner's own refusal, for any model:
    from perq_onnx.pipeline import Report, _fit_residual_rotation
    with pytest.raises(PerqError, match="--residual-rotation online: the genai target"):
        _fit_residual_rotation(Settings.parse(target="genai", residual_rotation="online"), analyze(load_graph(path)),
                               Report())
    capsys.readouterr()
    assert main(["optimize", str(path), "-o", str(out), "--no-quant", "--residual-rotation", "online",
                 "--block", "none"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--residual-rotation online needs a block size" in lines[0]
    assert not out.exists()
