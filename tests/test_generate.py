"""examples/generate.py: the plain onnxruntime loop and optimum's ORTModelForCausalLM generate the
same greedy tokens from a perq-onnx --target ort output of a KV-cache export (and, for the float
--no-quant output, the same tokens as the loop on the input model)."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from perq_onnx.pipeline import optimize
from perq_onnx.runtime import deploy_config
from perq_onnx.settings import Settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
CALIB = dict(calib_samples=2, seq_len=32)
NEW_TOKENS = 12


def _example():
    spec = importlib.util.spec_from_file_location("perq_generate_example", ROOT / "examples" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    pytest.importorskip("optimum.onnxruntime")
    return _example()


@pytest.fixture(scope="module")
def outputs(tiny_models, tmp_path_factory):
    src = tiny_models("llama", past=True)
    root = tmp_path_factory.mktemp("generate")
    ort_out = root / "ort" / "model.perq.onnx"       # not model.onnx: exercises file_name=
    float_out = root / "float" / "model.onnx"
    optimize(src, ort_out, Settings.parse(block="16", target="ort", rounding="rtn", **CALIB), progress=False)
    optimize(src, float_out, Settings.parse(block="16", target="ort", quantize=False, **CALIB), progress=False)
    return src, ort_out, float_out


def _prompt(gen, model_dir):
    tok = gen.load_tokenizer(model_dir)
    assert "token_type_ids" in tok("x")  # the tokenizer offers them; the model does not take them
    enc = gen.encode(tok, "Hello, perq!")
    assert set(enc) == {"input_ids", "attention_mask"}
    return enc["input_ids"]


@pytest.mark.slow
def test_sidecar_files_travel_with_the_output(outputs):
    _, ort_out, _ = outputs
    assert (ort_out.parent / "config.json").is_file() and (ort_out.parent / "tokenizer.json").is_file()
    assert deploy_config(ort_out) == {"session.qdq_matmulnbits_accuracy_level": "4"}


@pytest.mark.slow
def test_loop_and_optimum_agree_on_ort_output(gen, outputs):
    _, ort_out, _ = outputs
    ids = _prompt(gen, ort_out.parent)
    loop = gen.generate_loop(ort_out, ids, NEW_TOKENS)
    model = gen.load_optimum(ort_out)
    level = model.model.get_session_options().get_session_config_entry("session.qdq_matmulnbits_accuracy_level")
    assert level == "4"  # the recorded setting reached optimum's session
    opt = gen.generate_optimum(model, ids, NEW_TOKENS)
    assert len(loop) == NEW_TOKENS
    assert loop == opt


@pytest.mark.slow
def test_float_output_generates_like_the_input(gen, outputs):
    src, _, float_out = outputs
    ids = _prompt(gen, float_out.parent)
    reference = gen.generate_loop(src, ids, NEW_TOKENS)
    assert gen.generate_loop(float_out, ids, NEW_TOKENS) == reference
    assert gen.generate_optimum(gen.load_optimum(float_out), ids, NEW_TOKENS) == reference
    assert np.asarray(reference).size == NEW_TOKENS
