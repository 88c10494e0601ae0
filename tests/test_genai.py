"""The onnxruntime-genai form (perq_onnx/genai.py) on tiny random-weight exports.

* float rewrite (R1+R2+P3+R3, --no-quant) -> genai form: the logits of the prompt and of greedy
  decode steps through the KV cache equal the original optimum model's (1e-4 relative);
* ort target (INT4 GPTQ blocks, INT8 embedding) -> genai form with MatMulNBits at accuracy level 0:
  equal to the ort output run with float activations;
* onnxruntime-genai (``og.Model`` + ``og.Generator``) generates the same greedy tokens as an
  onnxruntime loop over the optimum model;
* from a rewrite of an export without KV cache, and called on the live graph inside the ort
  target's lowering (where the pipeline will call it);
* refusals: rope scaling, a model type it does not build, a non-empty output folder.
"""
from __future__ import annotations

import io
import json

import numpy as np
import onnxruntime as ort
import pytest

from perq_onnx import pipeline
from perq_onnx.genai import GenaiError, ModelConfig, genai_from_model
from perq_onnx.settings import Settings

TOL = 1e-4


def _options(level: str = "0") -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
    return opts


def greedy_logits(path, ids: np.ndarray, steps: int, step_path=None) -> list[np.ndarray]:
    """Logits of the prompt, then of `steps` greedy tokens fed one at a time through the KV cache
    (the feeds an optimum with-past export and the genai form both accept); with `step_path`,
    the single tokens run through that model (a two-graph genai folder's token graph)."""
    sess = ort.InferenceSession(str(path), _options(), providers=["CPUExecutionProvider"])
    step = sess if step_path is None else ort.InferenceSession(str(step_path), _options(),
                                                               providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name: i for i in sess.get_inputs()}
    batch, length = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "position_ids" in inputs:
        feeds["position_ids"] = np.broadcast_to(np.arange(length), ids.shape).copy()
    for name, i in inputs.items():
        if name.startswith("past_key_values"):
            feeds[name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
    out = dict(zip(names, sess.run(names, feeds)))
    result = [out["logits"]]
    for _ in range(steps):
        token = out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        feeds = {"input_ids": token, "attention_mask": np.ones((batch, length + 1), np.int64)}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.full((batch, 1), length, np.int64)
        feeds.update({n.replace("present", "past_key_values", 1): out[n] for n in names if n.startswith("present")})
        out = dict(zip(names, step.run(names, feeds)))
        result.append(out["logits"])
        length += 1
    return result


def _relative(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max() / np.abs(x).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def rewritten(tiny_models, tmp_path_factory):
    """(source, float rewrite, ort output) of tiny with-past exports, made once per arch."""
    root = tmp_path_factory.mktemp("genai")
    cache = {}

    def get(arch, past=True):
        if (arch, past) not in cache:
            src = tiny_models(arch, past=past, tied=False)
            sub = root / f"{arch}-{'past' if past else 'nopast'}"
            nq, q = sub / "noquant" / "model.onnx", sub / "ort" / "model.onnx"
            pipeline.optimize(src, nq, Settings.parse(target="ort", quantize=False, calib_samples=4, seq_len=32),
                              progress=False)
            # the genai decoder folds R1 (the ort target's weight-only default is the online one)
            pipeline.optimize(src, q, Settings.parse(target="ort", residual_rotation="full", calib_samples=4, seq_len=32),
                              progress=False)
            cache[arch, past] = (src, nq, q)
        return cache[arch, past]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float_rewrite_matches_optimum(rewritten, tmp_path, arch):
    src, nq, _ = rewritten(arch)
    folder = genai_from_model(nq, src, tmp_path / "genai", accuracy_level=0)
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    ids = np.random.default_rng(1).integers(0, 512, size=(1, 24))
    assert _relative(greedy_logits(src, ids, 4), greedy_logits(folder / "model.onnx", ids, 4)) < TOL


@pytest.mark.slow
def test_from_an_export_without_kv_cache(rewritten, tiny_models, tmp_path):
    """The genai form always has the KV cache: made from a rewrite of the no-past export, it
    equals the with-past export (the same seeded weights) through decode steps."""
    src, nq, _ = rewritten("llama", past=False)
    folder = genai_from_model(nq, src, tmp_path / "genai", accuracy_level=0)
    reference = tiny_models("llama", past=True, tied=False)
    ids = np.random.default_rng(3).integers(0, 512, size=(1, 16))
    assert _relative(greedy_logits(reference, ids, 3), greedy_logits(folder / "model.onnx", ids, 3)) < TOL


@pytest.mark.slow
def test_fused_graph_form(rewritten, tmp_path):
    """The fused ops onnxruntime-genai's own builder writes; no perq domain, no unfused attention."""
    import onnx
    src, nq, _ = rewritten("llama")
    folder = genai_from_model(nq, src, tmp_path / "genai", check=False)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    layers = 2
    assert ops.count("GroupQueryAttention") == layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert ops.count("SimplifiedLayerNormalization") == 1
    assert "Softmax" not in ops and not any(n.domain == "perq" for n in model.graph.node)
    assert [i.name for i in model.graph.input][:2] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2 and config["model"]["type"] == "llama"


@pytest.mark.slow
def test_int4_ort_output_as_matmulnbits(rewritten, tmp_path):
    import onnx
    src, _, q = rewritten("llama")
    folder = genai_from_model(q, src, tmp_path / "genai", accuracy_level=0)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 2 * 5 + 1  # qkv, o, gate, up, down; lm_head
    ids = np.random.default_rng(2).integers(0, 512, size=(1, 20))
    assert _relative(greedy_logits(q, ids, 3), greedy_logits(folder / "model.onnx", ids, 3)) < TOL


@pytest.mark.slow
def test_asymmetric_ragged_blocks_as_matmulnbits(tiny_models, tmp_path):
    """UINT4 codes with zero points in blocks of 256 (ragged on the 128-row linears: one short
    block) pack into MatMulNBits with zero points and padding, equal to the ort output."""
    src = tiny_models("llama", past=True, tied=False)
    q = tmp_path / "ort" / "model.onnx"
    pipeline.optimize(src, q, Settings.parse(target="ort", w_group=256, w_symmetric=False, residual_rotation="full",
                                             calib_samples=4, seq_len=32), progress=False)
    folder = genai_from_model(q, src, tmp_path / "genai", accuracy_level=0)
    import onnx
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 5 + 1 and all(len(n.input) == 4 for n in nbits)  # every one has zero points
    ids = np.random.default_rng(4).integers(0, 512, size=(1, 20))
    assert _relative(greedy_logits(q, ids, 3), greedy_logits(folder / "model.onnx", ids, 3)) < TOL


@pytest.mark.slow
def test_onnxruntime_genai_generates_the_same_tokens(rewritten, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    src, nq, _ = rewritten("llama")
    folder = genai_from_model(nq, src, tmp_path / "genai")
    model = og.Model(str(folder))
    prompt = np.asarray(og.Tokenizer(model).encode("The capital of France is"), dtype=np.int64)
    new = 12
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    logits = greedy_logits(src, prompt[None], new - 1)
    expected = [int(x[0, -1].argmax()) for x in logits]
    assert tokens == expected


@pytest.mark.slow
def test_refusals(rewritten, tmp_path):
    src, nq, _ = rewritten("llama")
    config = json.loads((src.parent / "config.json").read_text())
    for change, words in [({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
                          ({"model_type": "gemma"}, "model_type")]:
        bad = tmp_path / f"config-{words}.json"
        bad.write_text(json.dumps({**config, **change}))
        with pytest.raises(GenaiError, match=words):
            genai_from_model(nq, src, tmp_path / "out", config_json=bad)
        assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(GenaiError, match="not empty"):
        genai_from_model(nq, src, tmp_path / "full")


def test_config_refuses_short_sliding_window(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mistral", "sliding_window": 16, "max_position_embeddings": 256}))
    with pytest.raises(GenaiError, match="sliding_window"):
        ModelConfig.read(path)
    path.write_text(json.dumps({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 256,
                                "rope_theta": 5e5}))
    assert ModelConfig.read(path).rope_theta == 5e5


@pytest.mark.slow
def test_genai_target_writes_the_ort_models_folder(tiny_models, tmp_path, capsys, monkeypatch):
    """--target genai: the ort target's quantized weights rebuilt as a genai folder in the pipeline;
    the same logits as the ort output through the KV cache (float activations in MatMulNBits:
    accuracy level 0 in both), loadable and runnable by onnxruntime-genai (`perq-onnx generate`)."""
    import perq_onnx.targets.genai
    monkeypatch.setattr(perq_onnx.targets.genai, "ACCURACY_LEVEL", 0)
    src = tiny_models("llama", past=True, tied=False)
    options = dict(calib_samples=4, seq_len=32)
    ort_out, folder = tmp_path / "ort" / "model.onnx", tmp_path / "genai"
    # the genai target folds R1, has no R3 and INT4 blocks of 64 by default; the ort target's defaults are
    # the online R1 and R3 and blocks of 32
    pipeline.optimize(src, ort_out, Settings.parse(target="ort", residual_rotation="full", block="none", w_group=64,
                                                   **options),
                      progress=False)
    pipeline.optimize(src, folder / "model.onnx", Settings.parse(target="genai", embedding="int8", **options),
                      progress=False)  # the ort target's embedding form (test_genai_embedding_forms: the others)
    for name in ("genai_config.json", "config.json", "tokenizer.json", "model.onnx.data"):
        assert (folder / name).is_file(), name
    import onnx
    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMul" not in ops  # no online rotation unless --block is given (nor a tie map: untied)
    ids = np.random.default_rng(4).integers(0, 512, size=(1, 12))
    assert _relative(greedy_logits(ort_out, ids, 2), greedy_logits(folder / "model.onnx", ids, 2)) < TOL
    pytest.importorskip("onnxruntime_genai")
    from perq_onnx.cli import main
    from perq_onnx.generate import stream
    assert "genai: INT4 blocks of 64 (the largest of 64/32" in capsys.readouterr().out  # optimize says its choice
    assert main(["generate", str(folder), "The capital of France is", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    # --threads reaches onnxruntime-genai's session options (an overlay; the folder is unchanged)
    config = (folder / "genai_config.json").read_text()
    assert main(["--threads", "2", "generate", str(folder), "The capital of France is", "--max-new-tokens", "5"]) == 0
    tokens = [stream(folder, "The capital of France is", 5, out=io.StringIO(), threads=t) for t in (None, 2)]
    assert len(tokens[0]) == 5 and tokens[0] == tokens[1] and (folder / "genai_config.json").read_text() == config


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"block": "none"}, {"block": "full"}, {"residual_rotation": "none"},
                                     {"target": "tensorrt"}], ids=lambda o: "-".join(map(str, o.values())))
def test_other_rewrites(tiny_models, tmp_path, options):
    """No online rotation, a full-matrix one, unfolded gammas (no R1), and the tensorrt target's
    inlined BlockHadamard: each rebuilt exactly (float weights)."""
    src = tiny_models("llama", past=True, tied=True)
    out = tmp_path / "rewritten" / "model.onnx"
    settings = {"target": "ort", "quantize": False, "calib_samples": 4, "seq_len": 32, **options}
    pipeline.optimize(src, out, Settings.parse(**settings), progress=False)
    folder = genai_from_model(out, src, tmp_path / "genai", accuracy_level=0)
    ids = np.random.default_rng(5).integers(0, 512, size=(1, 12))
    assert _relative(greedy_logits(src, ids, 2), greedy_logits(folder / "model.onnx", ids, 2)) < TOL


def test_genai_target_refuses_before_any_work(tmp_path):
    """No config.json beside the model: refused at once with the reason, nothing written."""
    from handmade import build_decoder
    model = build_decoder(tmp_path / "model.onnx")
    out = tmp_path / "genai" / "model.onnx"
    with pytest.raises(GenaiError, match="config.json"):
        pipeline.optimize(model, out, Settings.parse(target="genai", calib_samples=2, seq_len=16), progress=False)
    assert not out.parent.exists() or not any(out.parent.iterdir())


# ------------------------------------------------------------------------ tied embedding

def _float_rewrite_context(tiny_models, tmp_path, tied: bool):
    from perq_onnx.analysis import analyze
    from perq_onnx.graph import load_graph
    from perq_onnx.passes.base import Context
    from perq_onnx.weights import WeightStore
    src = tiny_models("llama", past=False, tied=tied)
    out = tmp_path / f"float-{tied}" / "model.onnx"
    pipeline.optimize(src, out, Settings.parse(target="ort", quantize=False, block="none", calib_samples=4, seq_len=32),
                      progress=False)
    graph = load_graph(out)
    (tmp_path / f"staging-{tied}").mkdir()
    return src, Context(graph, analyze(graph), WeightStore(tmp_path / f"staging-{tied}"))


@pytest.mark.slow
def test_tie_lm_head_is_exact_and_refuses_untied_models(tiny_models, tmp_path):
    """After R1, the gamma fold and the permutations, a tied lm_head is W = M T^T with T the
    embedding table as rewritten: the pass reads the table through M (same logits, 1e-5); an
    untied model is refused with the reason, the graph unchanged."""
    from perq_onnx.errors import PerqError
    from perq_onnx.passes.base import PassManager
    from perq_onnx.passes.tie_lm_head import TieLmHead
    from perq_onnx.runtime import make_feeds, session
    src, ctx = _float_rewrite_context(tiny_models, tmp_path, tied=True)
    lm = ctx.structure.lm_head
    ((_, result),) = PassManager([TieLmHead()], progress=False).run(ctx)
    assert "one table for both" in result.summary
    table = ctx.constant(ctx.structure.embedding, 0)
    np.testing.assert_array_equal(ctx.weight(lm), table.T)  # lm_head's weight is the table itself
    ids = np.random.default_rng(6).integers(0, 512, size=(2, 16))
    ref, new = session(src), session(ctx.session())
    a, b = ref.run(["logits"], make_feeds(ref, ids))[0], new.run(["logits"], make_feeds(new, ids))[0]
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-5

    _, untied = _float_rewrite_context(tiny_models, tmp_path, tied=False)
    before = untied.node(untied.structure.lm_head.name).inputs[0].name
    with pytest.raises(PerqError, match="--embedding tied: lm_head is not the embedding table.*untied"):
        PassManager([TieLmHead()], progress=False).run(untied)
    assert untied.node(untied.structure.lm_head.name).inputs[0].name == before


@pytest.mark.slow
def test_genai_embedding_forms(tiny_models, tmp_path, monkeypatch):
    """--target genai's embeddings: INT4 blocks of its own (the default of an untied model), tied
    to lm_head's MatMulNBits codes (one table; a tied model's default), INT8; each with the same logits through
    the KV cache as the quantized graph the pipeline rebuilt it from (accuracy level 0), the
    INT4 ones also with zero points and a ragged block (sliced off); --embedding refused where a
    target does not write that form."""
    import onnx

    import perq_onnx.targets.genai
    from perq_onnx.errors import PerqError
    monkeypatch.setattr(perq_onnx.targets.genai, "ACCURACY_LEVEL", 0)
    graphs = []
    write = perq_onnx.targets.genai.Genai.write

    def keep_graph(self, ctx, path, source_dir, settings):  # the quantized graph as onnxruntime runs it
        graphs.append(onnx.load(str(ctx.session())))
        return write(self, ctx, path, source_dir, settings)
    monkeypatch.setattr(perq_onnx.targets.genai.Genai, "write", keep_graph)
    src = tiny_models("llama", past=True, tied=True)
    options = dict(target="genai", calib_samples=4, seq_len=32)
    runs = {"int4": {"embedding": "int4"}, "tied": {}, "int8": {"embedding": "int8"},  # tied: a tied model's default
            "int4-ragged": {"embedding": "int4", "w_group": 256, "w_symmetric": False},
            "tied-ragged": {"embedding": "tied", "w_group": 256, "w_symmetric": False}}
    ids = np.random.default_rng(8).integers(0, 512, size=(1, 12))
    size = {}
    for name, extra in runs.items():
        folder = tmp_path / name
        pipeline.optimize(src, folder / "model.onnx", Settings.parse(**options, **extra), progress=False)
        onnx.save_model(graphs[-1], str(tmp_path / f"{name}.onnx"))
        assert _relative(greedy_logits(tmp_path / f"{name}.onnx", ids, 2), greedy_logits(folder / "model.onnx", ids, 2)) < TOL, name
        size[name] = (folder / "model.onnx.data").stat().st_size
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        nodes = {n.name: n for n in model.graph.node}
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("Gather") == (3 if name == "int8" else 1)  # the mask's width; INT8: rows and scales
        if name == "int8":
            continue
        gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
        shared = gather.input[2] == nodes["lm_head/MatMulNBits"].input[2]
        assert shared == name.startswith("tied") and ("lm_head/tie_map" in nodes) == shared
        assert len(gather.input) == (4 if "ragged" in name else 3)          # zero points
        assert ("Slice" in ops) == ("ragged" in name)                        # a ragged block's padding
    assert max(size["tied"], size["int4"]) < size["int8"]  # (tied is the smallest once the table outweighs M)
    for target, form in (("ort", "int4"), ("simulate", "int8")):
        with pytest.raises(PerqError, match=f"--embedding {form}: the {target} target"):
            pipeline.optimize(src, tmp_path / target / "model.onnx",
                              Settings.parse(target=target, embedding=form), progress=False)


def _matmulnbits_blocks(model, node):
    """The INT4 blocks of a symmetric MatMulNBits node (as genai_decoder.BlockInt4, decoded from
    its bytes) and their [K, N] float weight."""
    from onnx import numpy_helper

    from perq_onnx.genai_decoder import BlockInt4
    init = {i.name: i for i in model.graph.initializer}
    attrs = {a.name: a.i for a in node.attribute}
    k, n, b = attrs["K"], attrs["N"], attrs["block_size"]
    codes, scales = (numpy_helper.to_array(init[node.input[i]]) for i in (1, 2))
    u = np.stack([codes & 15, codes >> 4], -1).reshape(n, -1)[:, :k].T              # [K, N]
    scales = scales.reshape(n, -1).T                                                # [blocks, N]
    w = (u.astype(np.float32) - 8) * np.repeat(scales, b, axis=0)[:k]
    return BlockInt4(np.ascontiguousarray(u), np.ascontiguousarray(scales), np.full(scales.shape, 8, np.uint8), b), w


def _int8_folders(tiny_models, tmp_path, kernels=("nbits", "int8", "int8-prompt")) -> dict:
    """{kernel: folder} of one tiny untied llama with past, optimized for genai with each kernel
    and the same rotations (R3 given: by default only the INT8 kernels have it)."""
    src = tiny_models("llama", past=True, tied=False)
    folders = {k: tmp_path / k for k in kernels}
    for kernel, folder in folders.items():
        pipeline.optimize(src, folder / "model.onnx", Settings.parse(target="genai", calib_samples=4, seq_len=32,
                                                                     kernel=kernel, block=16), progress=False)
    return folders


def _folded(path, tmp_path) -> "onnx.ModelProto":
    """The model as onnxruntime runs it after loading (constant folding done)."""
    import onnx
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / f"folded-{path.parent.name}-{path.name}")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return onnx.load(opts.optimized_model_filepath, load_external_data=False)  # the folded ones are inline


def test_genai_int8_kernel(tiny_models, tmp_path):
    """--kernel int8: q/k/v/o/gate/up run as DynamicQuantizeMatMul, down_proj as MatMulInteger
    with one scale per token, over INT8 weights that onnxruntime folds, when it loads the model,
    from the file's MatMulNBits bytes (the same bytes the default folder stores) exactly as
    ``int8_weight`` / ``int8_columns`` compute them, each within half an INT8 step of the INT4
    weight; lm_head stays MatMulNBits; the logits stay close to the MatMulNBits folder's (int8
    activations); refused where it cannot apply."""
    import onnx
    from onnx import numpy_helper

    from perq_onnx.errors import PerqError
    from perq_onnx.genai_decoder import int8_columns, int8_weight
    folders = _int8_folders(tiny_models, tmp_path, ("nbits", "int8"))
    nbits, int8 = (onnx.load(str(f / "model.onnx")) for f in folders.values())
    ops = [n.op_type for n in int8.graph.node]
    layers = sum(n.op_type == "GroupQueryAttention" for n in int8.graph.node)
    assert ops.count("DynamicQuantizeMatMul") == 4 * layers  # qkv (packed), o, gate, up
    assert ops.count("MatMulInteger") == layers              # down_proj, one scale per token
    assert ops.count("MatMulNBits") == 1                     # lm_head
    stored = {i.name: i.raw_data for i in nbits.graph.initializer if i.name.endswith(".weight_Q4")}
    codes = [i for i in int8.graph.initializer if i.data_type == onnx.TensorProto.UINT4]
    assert len(codes) == 5 * layers and all(i.raw_data == stored[i.name] for i in codes)  # 4 bits a weight:
                                                                        # MatMulNBits' bytes, read as UINT4
    size = {k: (f / "model.onnx.data").stat().st_size for k, f in folders.items()}
    for f in folders.values():  # readable as the model file is (onnx writes external data 0600)
        assert (f / "model.onnx.data").stat().st_mode & 0o777 == (f / "model.onnx").stat().st_mode & 0o777
    assert size["int8"] < 1.05 * size["nbits"]  # one more scale per column

    folded = _folded(folders["int8"] / "model.onnx", tmp_path)
    values = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer
              if i.data_location != onnx.TensorProto.EXTERNAL}  # (the rest stays in the folder's data file)
    reference = {n.name.split("/")[0]: n for n in nbits.graph.node if n.op_type == "MatMulNBits"}
    written = {i.name: i for i in int8.graph.initializer}
    int8_ops = ("DynamicQuantizeMatMul", "MatMulInteger")
    checked = 0
    for node in (n for n in folded.graph.node if n.op_type in int8_ops):
        name = node.name.split("/")[0]
        blocks, w4 = _matmulnbits_blocks(nbits, reference[name])
        w8, scale = values[node.input[1]], int8_columns(blocks).scale
        assert w8.dtype == np.int8 and np.abs(w8.astype(np.int32)).max() <= 127
        assert np.array_equal(w8, int8_weight(blocks)), name     # the same INT4 weights, folded as documented
        if node.op_type == "DynamicQuantizeMatMul":
            assert np.array_equal(numpy_helper.to_array(written[node.input[2]]), scale), name
        assert np.abs(w8 * scale - w4).max() <= 0.5 * scale.max() * (1 + 1e-5), name
        checked += 1
    assert checked == 5 * layers
    ids = np.random.default_rng(3).integers(0, 512, size=(1, 12))
    err = _relative(*(greedy_logits(f / "model.onnx", ids, 0) for f in folders.values()))  # (greedy paths of a
    assert err < 0.05, err                                                                   # random model part)
    src = tiny_models("llama", past=True, tied=False)
    for kernel in ("int8", "int8-prompt"):
        for extra, message in (({"target": "ort"}, f"--kernel {kernel}: the ort target has no kernel choice"),
                               ({"target": "genai", "quantize": False}, f"--kernel {kernel} multiplies by INT4 weights")):
            with pytest.raises(PerqError, match=message):
                pipeline.optimize(src, tmp_path / "refused" / "model.onnx", Settings.parse(kernel=kernel, **extra),
                                  progress=False)


def test_genai_int8_prompt_kernel(tiny_models, tmp_path):
    """--kernel int8-prompt: two graphs on one weight file. model.onnx is the MatMulNBits folder's
    graph; model.prompt.onnx is the --kernel int8 folder's graph, every weight read from
    model.onnx.data (no data file of its own); genai_config.json runs the prompt graph on
    multi-token steps and model.onnx on single tokens, and onnxruntime-genai does: its prompt
    logits are the INT8 graph's, and its greedy tokens are those of the INT8 prompt followed by
    MatMulNBits steps in plain onnxruntime."""
    import onnx
    from onnx import numpy_helper
    folders = _int8_folders(tiny_models, tmp_path)
    split = folders["int8-prompt"]
    assert sorted(p.name for p in split.glob("model*")) == ["model.onnx", "model.onnx.data", "model.prompt.onnx"]
    assert (split / "model.onnx.data").stat().st_size == (folders["nbits"] / "model.onnx.data").stat().st_size

    def graph_of(path):
        model = onnx.load(str(path))
        return ([(n.op_type, list(n.input), list(n.output)) for n in model.graph.node],
                {i.name: (i.data_type, list(i.dims), numpy_helper.to_array(i).tobytes()) for i in model.graph.initializer})
    assert graph_of(split / "model.onnx") == graph_of(folders["nbits"] / "model.onnx")
    assert graph_of(split / "model.prompt.onnx") == graph_of(folders["int8"] / "model.onnx")
    prompt = onnx.load(str(split / "model.prompt.onnx"), load_external_data=False)
    large = [i for i in prompt.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert {e.value for i in large for e in i.external_data if e.key == "location"} == {"model.onnx.data"}
    own = [i for i in prompt.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    assert {i.name.rsplit(".", 1)[-1] for i in own if len(i.raw_data) > 1024} <= {"weight_scale"}  # its own:
    assert sum(len(i.raw_data) for i in own) < 0.05 * (split / "model.onnx.data").stat().st_size  # column scales
    assert any(i.name.endswith("weight_Q4") for i in large)

    config = json.loads((split / "genai_config.json").read_text())["model"]
    assert config["type"] == "decoder-pipeline"
    stages = [next(iter(stage.items())) for stage in config["decoder"]["pipeline"]]
    assert [(s["filename"], s["run_on_prompt"], s["run_on_token_gen"]) for _, s in stages] == [
        ("model.prompt.onnx", True, False), ("model.onnx", False, True)]

    og = pytest.importorskip("onnxruntime_genai")
    ids = np.random.default_rng(5).integers(0, 512, size=(1, 10))
    new = 6
    expected = greedy_logits(split / "model.prompt.onnx", ids, new - 1, step_path=split / "model.onnx")
    all_nbits = greedy_logits(split / "model.onnx", ids, 0)[0]
    model = og.Model(str(split))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype(np.int32))
    seen = np.asarray(gen.get_output("logits")).reshape(expected[0].shape)
    assert _relative([expected[0]], [seen]) < 1e-5                 # the prompt ran through the INT8 graph,
    assert _relative([all_nbits], [seen]) > 1e-3                   # not through MatMulNBits
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == [int(x[0, -1].argmax()) for x in expected]


def test_genai_ties_the_embedding_by_default_where_the_model_does(tiny_models):
    """The genai target's default embedding: tied for a model whose lm_head is its embedding
    table transposed (is_tied on the source graph), its own INT4 blocks otherwise; what the user
    names wins."""
    from perq_onnx.passes.tie_lm_head import is_tied
    from perq_onnx.analysis import analyze
    from perq_onnx.graph import load_graph
    from perq_onnx.settings import Embedding
    from perq_onnx.targets import target
    genai = target("genai")
    for tied in (True, False):
        graph = load_graph(tiny_models("llama", past=True, tied=tied))
        assert is_tied(graph, analyze(graph)) == tied
        resolved = genai.resolve(Settings.parse(target="genai"), {}, tied).embedding
        assert resolved is (Embedding.TIED if tied else Embedding.INT4)
    assert genai.resolve(Settings.parse(target="genai", embedding="int8"), {}, True).embedding is Embedding.INT8
    assert target("ort").resolve(Settings.parse(target="ort"), {}, True).embedding is Embedding.INT8


def test_genai_weight_blocks_default_to_64_where_they_divide():
    """The genai target's INT4 blocks: 64 where 64 divides every linear's input (SmolLM2's 576 and
    1536), else ort's 32; an explicit --w-group wins."""
    from perq_onnx.targets import target
    genai, settings = target("genai"), Settings.parse(target="genai")
    assert genai.resolve(settings, {"q": 576, "down": 1536}).weights.group == 64
    assert genai.resolve(settings, {"q": 576, "down": 1504}).weights.group == 32
    assert genai.resolve(Settings.parse(target="genai", w_group=128), {"q": 576}).weights.group == 128
    assert target("ort").resolve(Settings.parse(target="ort"), {"q": 576}).weights.group == 32


@pytest.mark.slow
def test_an_online_residual_rotation_is_refused_not_dropped(tiny_models, tmp_path):
    """The ort target's default weight-only R1 is online (block Hadamards at q/k/v and gate/up
    inputs): the genai writer has no place for it and refuses, naming the node."""
    src = tiny_models("llama", past=True, tied=False)
    ort_out = tmp_path / "ort" / "model.onnx"
    pipeline.optimize(src, ort_out, Settings.parse(target="ort", calib_samples=2, seq_len=32), progress=False)
    with pytest.raises(GenaiError, match=r"node '.*': perq.BlockHadamard in front of '.*q_proj.*' \(an online residual"):
        genai_from_model(ort_out, src, tmp_path / "genai")
    assert not (tmp_path / "genai" / "model.onnx").exists()


def test_genai_keeps_the_online_rotation_only_for_the_int8_kernels(tiny_models, tmp_path):
    """By default the genai folder has R3 in front of down_proj only where it pays: before the
    INT8 kernels' per-token activation quantization, not in front of MatMulNBits (both graphs of
    an int8-prompt folder have it: they share the weights); --block 16 keeps it for MatMulNBits."""
    import onnx
    src = tiny_models("llama", past=True, tied=False)
    for kernel, block, expected in (("nbits", None, False), ("nbits", 16, True), ("int8-prompt", None, True)):
        folder = tmp_path / f"{kernel}-{block}"
        pipeline.optimize(src, folder / "model.onnx", Settings.parse(target="genai", calib_samples=4, seq_len=32,
                                                                     kernel=kernel, block=block), progress=False)
        for graph in folder.glob("model*.onnx"):
            nodes = onnx.load(str(graph), load_external_data=False).graph.node
            layers = sum(n.op_type == "GroupQueryAttention" for n in nodes)
            rotations = sum(n.name.endswith("online_rotation/MatMul") for n in nodes)
            assert rotations == (layers if expected else 0), (kernel, block, graph.name)
