"""perq_onnx.runtime.make_feeds on a model whose past key/value head size is symbolic (as
onnxruntime-genai's model builder writes them): the folder's genai_config.json gives it."""
from __future__ import annotations

import json

import numpy as np
from onnx import TensorProto, helper

from perq_onnx.runtime import make_feeds, session


def test_symbolic_head_size_comes_from_genai_config(tmp_path):
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", "head"])
    graph = helper.make_graph(
        [helper.make_node("Shape", ["past_key_values.0.key"], ["logits"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]), past],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, [4])])
    path = tmp_path / "model.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString())
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": 64}}}))
    sess = session(path)
    feeds = make_feeds(sess, np.zeros((1, 5), np.int64))
    assert feeds["past_key_values.0.key"].shape == (1, 2, 0, 64)
    assert sess.run(["logits"], feeds)[0].tolist() == [1, 2, 0, 64]
