"""Greedy text generation with a perq-onnx ``--target ort`` output of a KV-cache export, two ways.

    perq-onnx optimize smollm2-with-past --target ort -o out/model.onnx --calib-data ../shared/data/wikitext-2/valid.txt
    python examples/generate.py out/model.onnx --prompt "The capital of France is"

    python examples/generate.py                  # builds that model once (data-free calibration)

(i) ``generate_loop``: a plain onnxruntime loop. The session comes from
``perq_onnx.runtime.session(path)``, which applies the session settings the model recorded in
its metadata (``perq.ort.session_config``: MatMulNBits accuracy level 4 for the ort target).
The prompt runs once with empty ``past_key_values.*``; every step then feeds the new token, the
``present.*`` outputs back as ``past_key_values.*``, an attention mask one longer and
``position_ids`` = the number of tokens already cached.

(ii) ``generate_optimum``: optimum's ``ORTModelForCausalLM`` (``optimum.onnxruntime``). It needs,
beside the .onnx file, the ``config.json`` of the Hugging Face model (perq-onnx copies the input's
config, generation config and tokenizer files next to its output). From the installed
optimum-onnx code (``ORTModelForCausalLM._from_pretrained``):

* a file not called ``model.onnx`` needs ``file_name=`` (otherwise it picks ``model.onnx`` or the
  first ``*.onnx`` found recursively in the directory);
* its ``InferenceSession`` is built from ``session_options=`` (an ``onnxruntime.SessionOptions``)
  as given, so the model's recorded accuracy level is *not* applied unless it is in there: pass
  ``perq_onnx.runtime.session_options(threads, deploy_config(path))``;
* the ``perq.BlockHadamard`` run-time op is a model-local function, so a plain onnxruntime (as
  optimum creates it) runs it without the op library.

Tokenizer: the recipe's tokenizer (``PreTrainedTokenizerFast``) lists ``token_type_ids`` among its
``model_input_names`` and returns them, but the model has no such input (feeding it to
onnxruntime fails, and ``generate`` would pass it through to the model). ``encode`` asks for
``return_token_type_ids=False`` and keeps only the keys the model takes.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perq_onnx.runtime import deploy_config, make_feeds, session, session_options  # noqa: E402


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def encode(tokenizer, prompt: str, input_names=("input_ids", "attention_mask")) -> dict[str, np.ndarray]:
    """Token ids (and mask) of the prompt, batch 1, without token_type_ids (no model input takes them)."""
    enc = tokenizer(prompt, return_tensors="np", return_token_type_ids=False, add_special_tokens=False)
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in input_names}


def generate_loop(model_path, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None,
                  threads: int | None = None, sess=None) -> list[int]:
    """Greedy continuation (new token ids) of input_ids [1, n] with a plain onnxruntime loop."""
    sess = sess or session(model_path, threads)
    inputs = {i.name for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    present = [n for n in outputs if n.startswith("present")]
    past = [n.replace("present", "past_key_values", 1) for n in present]
    if not past or not set(past) <= inputs:
        raise SystemExit(f"{model_path}: not a KV-cache export (no past_key_values.* inputs matching present.*)")
    ids = np.asarray(input_ids, dtype=np.int64)
    out = dict(zip(outputs, sess.run(outputs, make_feeds(sess, ids))))
    length = ids.shape[1]
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out["logits"][0, -1].argmax())
        new.append(token)
        if token == eos_token_id or len(new) == max_new_tokens:
            break
        feeds = {"input_ids": np.array([[token]], dtype=np.int64),
                 "attention_mask": np.ones((1, length + 1), dtype=np.int64)}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.array([[length]], dtype=np.int64)
        feeds.update({p: out[c] for p, c in zip(past, present)})
        out = dict(zip(outputs, sess.run(outputs, feeds)))
        length += 1
    return new


def load_optimum(model_path, threads: int | None = None):
    """ORTModelForCausalLM on model_path, with the session settings the model recorded."""
    from optimum.onnxruntime import ORTModelForCausalLM
    model_path = pathlib.Path(model_path)
    if not (model_path.parent / "config.json").is_file():
        raise SystemExit(f"{model_path.parent}: no config.json beside the model (ORTModelForCausalLM needs it)")
    opts = session_options(threads, deploy_config(model_path))
    return ORTModelForCausalLM.from_pretrained(str(model_path.parent), file_name=model_path.name,
                                               session_options=opts, use_cache=True, use_io_binding=False,
                                               local_files_only=True)


def generate_optimum(model, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None,
                     pad_token_id: int | None = None) -> list[int]:
    """Greedy continuation (new token ids) with ORTModelForCausalLM.generate."""
    import torch
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=0, do_sample=False, num_beams=1, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id,
                         repetition_penalty=None, temperature=None, top_p=None, top_k=None)
    return out[0, ids.shape[1]:].tolist()


def default_model(calib_data: str | None) -> pathlib.Path:
    """The ort-target output of the smollm2-with-past recipe, built once in the perq-onnx cache."""
    import os

    from perq_onnx import pipeline
    from perq_onnx.models import resolve
    from perq_onnx.settings import Settings
    root = pathlib.Path(os.environ.get("PERQ_CACHE") or "~/.cache/perq-onnx").expanduser()
    out = root / "examples" / "smollm2-with-past-ort" / "model.onnx"
    if not out.exists():
        src = resolve("smollm2-with-past")
        print(f"building {out} (perq-onnx optimize smollm2-with-past --target ort) ...", file=sys.stderr)
        pipeline.optimize(src, out, Settings.parse(target="ort", calib_data=calib_data,
                                                   tokenizer=str(src.parent)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="greedy generation with a perq-onnx --target ort KV-cache model")
    ap.add_argument("model", nargs="?", help="model.onnx (a perq-onnx output of a with-past export); "
                                             "default: build the smollm2-with-past ort output")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model's directory)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--calib-data", help="calibration text for building the default model")
    ap.add_argument("--skip-optimum", action="store_true", help="only the plain onnxruntime loop")
    args = ap.parse_args(argv)

    path = pathlib.Path(args.model) if args.model else default_model(args.calib_data)
    tok = load_tokenizer(args.tokenizer or path.parent)
    enc = encode(tok, args.prompt)
    ids = enc["input_ids"]
    eos = tok.eos_token_id
    print(f"model: {path}  (session settings {deploy_config(path) or 'none recorded'})")
    print(f"prompt: {args.prompt!r} ({ids.shape[1]} tokens)")

    t0 = time.perf_counter()
    loop = generate_loop(path, ids, args.max_new_tokens, eos, args.threads)
    t1 = time.perf_counter()
    print(f"\n[onnxruntime loop, {len(loop)} tokens in {t1 - t0:.2f} s]\n{args.prompt}{tok.decode(loop)}")
    if not args.skip_optimum:
        model = load_optimum(path, args.threads)
        t0 = time.perf_counter()
        opt = generate_optimum(model, ids, args.max_new_tokens, eos, tok.pad_token_id)
        t1 = time.perf_counter()
        print(f"\n[optimum ORTModelForCausalLM, {len(opt)} tokens in {t1 - t0:.2f} s]\n{args.prompt}{tok.decode(opt)}")
        print(f"\nsame tokens: {loop == opt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
