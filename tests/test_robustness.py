"""Inputs that used to produce invalid models or run slowly: old opsets (optimum --opset 14 / 17),
data-free calibration with a KV cache, tokenizers whose ids exceed the model's vocabulary."""
from __future__ import annotations


import numpy as np
import onnx
import pytest

from perq_onnx import calibration
from perq_onnx.errors import PerqError
from perq_onnx.graph import load_graph
from perq_onnx.models.tiny import export_tiny
from perq_onnx.pipeline import optimize
from perq_onnx.runtime import session
from perq_onnx.settings import Settings
from perq_onnx.weights import read

from conftest import random_ids, relative_difference

TOL = 1e-4
QUICK = dict(calib_samples=1, seq_len=16)


@pytest.fixture(scope="module")
def old_opset_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("opsets")
    return {v: export_tiny("llama", root / f"llama-opset{v}", with_past=False, tied=False, opset=v) for v in (14, 17)}


def _default_opset(path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# ------------------------------------------------------------------------------ old opsets

@pytest.mark.slow
@pytest.mark.parametrize("opset", [14, 17])
def test_old_opset_no_quant_exact(old_opset_models, tmp_path, opset):
    path = old_opset_models[opset]
    assert _default_opset(path) == opset
    out = tmp_path / "out.onnx"
    optimize(path, out, Settings.parse(block="32", quantize=False, **QUICK), progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    assert _default_opset(out) == 21
    assert all(o.version == 21 for f in model.functions for o in f.opset_import if o.domain in ("", "ai.onnx"))
    assert not [n for n in model.graph.node if n.op_type == "ReduceMean" and any(a.name == "axes" for a in n.attribute)]
    assert relative_difference(path, out, random_ids()) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("opset", [14, 17])
def test_old_opset_quantized_valid(old_opset_models, tmp_path, opset):
    path = old_opset_models[opset]
    out = tmp_path / "out.onnx"
    optimize(path, out, Settings.parse(block="32", **QUICK), progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    assert _default_opset(out) == 21
    la = session(out).run(["logits"], {"input_ids": random_ids(), "attention_mask": np.ones((2, 24), np.int64),
                                       "position_ids": np.tile(np.arange(24), (2, 1))})[0]
    assert np.isfinite(la).all()


@pytest.mark.slow
def test_conversion_never_sees_weights(old_opset_models, monkeypatch):
    """The version converter gets a weightless skeleton (embedded weights are not copied)."""
    seen = {}
    real = onnx.version_converter.convert_version

    def spy(model, version):
        seen["bytes"] = sum(len(t.raw_data) + len(t.float_data) for t in model.graph.initializer)
        seen["count"] = len(model.graph.initializer)
        return real(model, version)

    monkeypatch.setattr(onnx.version_converter, "convert_version", spy)
    graph = load_graph(old_opset_models[14])
    assert seen["count"] > 0 and seen["bytes"] == 0
    assert graph.opset == 21
    embed = graph.tensors()["model.embed_tokens.weight"]
    assert tuple(embed.shape) == (512, 128) and np.abs(np.asarray(read(embed))).sum() > 0


@pytest.mark.slow
def test_conversion_failure_refused(old_opset_models, monkeypatch):
    def broken(model, version):
        raise RuntimeError("No Adapter For Frobnicate")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    with pytest.raises(PerqError, match=r"from opset 14 to opset 21 .*: No Adapter For Frobnicate; re-export it with --opset 21"):
        load_graph(old_opset_models[14])


@pytest.mark.slow
def test_conversion_touching_a_weight_refused(old_opset_models, monkeypatch):
    real = onnx.version_converter.convert_version

    def rewrites(model, version):
        out = real(model, version)
        t = out.graph.initializer[0]
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        return out

    monkeypatch.setattr(onnx.version_converter, "convert_version", rewrites)
    with pytest.raises(PerqError, match="rewrote weight"):
        load_graph(old_opset_models[17])


@pytest.mark.slow
def test_newer_opset_kept_and_functions_match(tiny_models, tmp_path):
    """An opset-23 model stays at 23; the model-local function bodies import 23 as well (a
    function must import its model's version of a domain)."""
    src = tiny_models("llama")
    path = tmp_path / "op23" / "model.onnx"
    path.parent.mkdir()
    onnx.save(onnx.version_converter.convert_version(onnx.load(str(src)), 23), str(path))
    out = tmp_path / "out.onnx"
    optimize(path, out, Settings.parse(block="32", fused_ops=True, **QUICK), progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    assert _default_opset(out) == 23
    assert model.functions and all(o.version == 23 for f in model.functions for o in f.opset_import
                                   if o.domain in ("", "ai.onnx"))
    assert np.isfinite(session(out).run(["logits"], {"input_ids": random_ids(), "attention_mask": np.ones((2, 24), np.int64),
                                                     "position_ids": np.tile(np.arange(24), (2, 1))})[0]).all()


@pytest.mark.slow
def test_old_opset_cli_does_not_touch_input(old_opset_models, tmp_path):
    from perq_onnx.cli import main
    path = old_opset_models[14]
    before = path.read_bytes()
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--no-quant", "--calib-samples", "1",
                 "--seq-len", "16"]) in (0, None)
    assert path.read_bytes() == before


# ------------------------------------------------------------- data-free sampling with a cache

class _CountingSession:
    """Wraps calibration.session: counts the token positions fed to input_ids."""

    def __init__(self, monkeypatch):
        self.positions = 0
        real = calibration.session

        def counting(*args, **kwargs):
            sess = real(*args, **kwargs)
            outer = self

            class Proxy:
                def __getattr__(self, name):
                    return getattr(sess, name)

                def run(self, names, feeds):
                    outer.positions += int(np.asarray(feeds["input_ids"]).size)
                    return sess.run(names, feeds)
            return Proxy()
        monkeypatch.setattr(calibration, "session", counting)


@pytest.mark.slow
def test_incremental_sampling_equals_full_reforward(tiny_models, monkeypatch):
    path = tiny_models("llama", past=True, tied=False)
    counter = _CountingSession(monkeypatch)
    full = calibration.generate(path, 3, 64, seed=7, incremental=False)
    full_positions, counter.positions = counter.positions, 0
    inc = calibration.generate(path, 3, 64, seed=7)
    assert inc.shape == full.shape == (3, 64)
    np.testing.assert_array_equal(inc, full)  # same RNG draws in the same order, same logits
    # the cache feeds one new position per row and step: linear, not quadratic, work
    assert counter.positions == 1 + 3 * 63  # the vocab probe, then one position per row and step
    assert full_positions == 1 + 3 * sum(range(1, 64))


@pytest.mark.slow
def test_model_without_cache_samples_by_reforward(tiny_models):
    path = tiny_models("llama", past=False, tied=False)
    ids = calibration.generate(path, 2, 12, seed=1)
    assert ids.shape == (2, 12) and ids.max() < 512


# ------------------------------------------------------------------------ tokenizer vocabulary

def test_check_ids_accepts_ids_inside_the_vocabulary():
    calibration.check_ids(np.array([0, 5, 511]), 512, "tokenizer in x")
    calibration.check_ids(np.zeros(0, np.int64), 512, "tokenizer in x")


def test_check_ids_names_tokenizer_and_sizes():
    with pytest.raises(PerqError, match=r"tokenizer in /t: token id 700 is outside the model's vocabulary "
                                        r"\(the tokenizer has 1000 tokens, the model's embedding has 512 rows\)"):
        calibration.check_ids(np.array([3, 700, 2]), 512, "tokenizer in /t", tokenizer_vocab=1000)
    with pytest.raises(PerqError, match="token id -1"):
        calibration.check_ids(np.array([-1, 2]), 512, "ids")


def test_windows_check_the_vocabulary():
    tokens = np.arange(0, 64) * 10  # up to 630
    assert calibration.windows(tokens, 16, 2, "text", vocab=512).shape == (2, 16)  # only the first 32 are used
    with pytest.raises(PerqError, match="token id 630 is outside the model's vocabulary"):
        calibration.windows(tokens, 16, None, "text", vocab=512)


def test_tokenizer_of_another_model_refused(tmp_path):
    """A tokenizer with 1000 tokens (ids beyond the tiny model's 512 rows) on a text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 1000)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "other-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tok_dir)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i}" for i in range(1, 999, 7)) + "\n")
    tok = calibration.load_tokenizer(tok_dir)
    tokens = calibration.tokenize_file(text, tok)
    with pytest.raises(PerqError, match=rf"tokenizer in {tok_dir}: token id \d+ is outside the model's vocabulary "
                                        r"\(the tokenizer has 1000 tokens, the model's embedding has 512 rows\)"):
        calibration.check_ids(tokens, 512, f"tokenizer in {tok_dir}", tokenizer_vocab=len(tok))
