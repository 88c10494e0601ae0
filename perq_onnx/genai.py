"""The onnxruntime-genai form of a rewritten decoder: a folder that ``onnxruntime_genai.Model`` loads.

onnxruntime-genai runs decoders written in onnxruntime's fused LLM ops, with fixed graph input
and output names and a ``genai_config.json`` beside the model. This module *rebuilds* the decoder
in that form from the analysis records (``DecoderStructure``) and the weights of the graph as
perq-onnx rewrote it (R1 folded, R2 folded, P3 folded, R3 inserted, weights quantized or not),
instead of pattern-rewriting optimum's unfused attention:

* norms: ``SimplifiedLayerNormalization`` for the first, ``SkipSimplifiedLayerNormalization``
  (residual Add + RMSNorm, its fourth output the new residual) for every later one; gamma as the
  graph has it (ones after perq folded it into the readers), epsilon from the norm's Add;
* attention: q/k/v packed into one linear feeding ``com.microsoft.GroupQueryAttention`` with its
  KV cache (``past_key_values.N.key/value`` -> ``present.N.key/value``, BNSH), rotary inside
  (``do_rotary=1``, half-split like Hugging Face's rotate_half) from cos/sin caches computed from
  config.json (``rope_theta``, head_dim; a rope scaling is refused), or the source graph's own
  (genai_source.py), scale 1/sqrt(head_dim);
  ``seqlens_k`` = sum(attention_mask) - 1, ``total_sequence_length`` = attention_mask's length;
* linears: an INT4 blocked ``DequantizeLinear`` weight (codes [K, N], scales [ceil(K/b), N], axis 0,
  block b) becomes ``com.microsoft.MatMulNBits`` (codes + 8 packed two per byte along K, scales
  [N, ceil(K/b)], default zero point 8: (u - 8) * s == q * s also for perq's negative scales; a
  ragged last block padded with its zero point); an asymmetric UINT4 one keeps its codes and gets
  its zero points packed likewise; a float weight stays a MatMul; biases stay an Add; or, with
  ``kernel="int8"``, INT8 GEMMs over weights onnxruntime widens from those bytes when it loads
  the model (genai_decoder.py); ``kernel="int8-prompt"`` writes both graphs, the INT8 one as
  ``prompt_path(model)`` reading the model's weight file, and a ``decoder-pipeline``
  genai_config.json that runs it on prompts and the MatMulNBits graph on each generated token;
* MLP: gate and up as two linears (packed into one behind a Split, decode was 6% slower per token
  in og.Generator here), SiLU gating as Sigmoid/Mul/Mul; the online rotation R3 (``perq.BlockHadamard``, its
  inlined Reshape-MatMul-Reshape, or a full-matrix MatMul) as standard ops, so no custom-op
  library is needed;
* embedding: a float Gather; perq's INT8 gather-then-dequantize form as it is; INT4 blocks
  (its own, or lm_head's when tied) as ``com.microsoft.GatherBlockQuantized``;
* lm_head: a linear, behind the hidden x hidden map TieLmHead put in front of it when tied.

Graph inputs ``input_ids``, ``attention_mask``, ``past_key_values.N.key/value``; outputs
``logits``, ``present.N.key/value``; opset 21 + com.microsoft. Supported: float32 Llama, Mistral
(sliding window not shorter than the context) and Qwen2 exports of optimum, and the fp32 graphs of
onnxruntime-genai's model builder (packed qkv_proj; its folder's genai_config.json stands in for
config.json), without post-norms or scalar multipliers; anything else is refused with the reason.

Entry points: ``write_genai_folder`` (a graph and its analysis, e.g. from inside the pipeline's
lowering) and ``genai_from_model`` (a perq-onnx output file and the optimum export it came from).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import onnx
import onnx_graphsurgeon as gs

from .errors import PerqError
from .genai_decoder import GenaiError, ModelConfig, build_decoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def genai_config(structure, config: ModelConfig, filename: str = "model.onnx", prompt_filename: str | None = None) -> dict:
    """genai_config.json for the decoder build_decoder writes (fields as the model builder's). With
    `prompt_filename`, a two-graph pipeline: that graph runs every multi-token step (the prompt),
    `filename` every single-token one (onnxruntime-genai's ``decoder-pipeline`` model type)."""
    layer, layers = structure.layers[0], len(structure.layers)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": structure.head_dim,
        "hidden_size": structure.hidden_size,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": layer.num_heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": layer.num_kv_heads,
    }
    if prompt_filename:
        cache = [f"{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        inputs = ["input_ids", "attention_mask", *(f"past_key_values.{c}" for c in cache)]
        outputs = ["logits", *(f"present.{c}" for c in cache)]
        decoder["pipeline"] = [
            {"prompt": {"filename": prompt_filename, "inputs": inputs, "outputs": outputs,
                        "run_on_prompt": True, "run_on_token_gen": False}},
            {"token_generation": {"filename": filename, "inputs": inputs, "outputs": outputs,
                                  "run_on_prompt": False, "run_on_token_gen": True}}]
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": config.context_length,
            "decoder": decoder,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
            "type": "decoder-pipeline" if prompt_filename else config.model_type,
            "vocab_size": structure.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": config.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 50, "top_p": 1.0,
        },
    }


def prompt_path(path) -> pathlib.Path:
    """The prompt graph beside a two-graph folder's model file (``--kernel int8-prompt``)."""
    path = pathlib.Path(path)
    return path.with_name(f"{path.stem}.prompt{path.suffix}")


def _with_metadata(model: onnx.ModelProto, metadata: dict[str, str] | None) -> onnx.ModelProto:
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def _share_weights(model: onnx.ModelProto, saved: pathlib.Path) -> None:
    """Point every initializer of `model` that the saved model file `saved` keeps in its (one)
    external data file, with the same name and bytes, at those bytes (the type may differ: the
    prompt graph reads MatMulNBits' packed bytes as UINT4 codes). A same-named tensor with other
    bytes is an internal error (the graphs must read one set of weights)."""
    refs = {t.name: t for t in onnx.load(str(saved), load_external_data=False).graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}
    with open(saved.parent / (saved.name + ".data"), "rb") as f:
        for t in model.graph.initializer:
            ref = refs.get(t.name)
            if ref is None:
                continue
            info = {e.key: e.value for e in ref.external_data}
            f.seek(int(info.get("offset", 0)))
            if f.read(int(info["length"])) != t.raw_data:
                raise GenaiError(f"initializer '{t.name}' differs between {saved.name} and the prompt graph")
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.extend(ref.external_data)


def write_genai_files(graph: gs.Graph, structure, path, config_json, tokenizer_dir=None, accuracy_level: int = 4,
                      metadata: dict[str, str] | None = None, kernel: str = "nbits") -> list[pathlib.Path]:
    """Write the genai-form model at `path` (its weights in `path`.data), genai_config.json, config.json
    and the tokenizer files beside it; the files written, the model first. kernel: ``nbits``
    (MatMulNBits), ``int8`` (``build_decoder``'s int8_linears) or ``int8-prompt``: both, the INT8
    graph at ``prompt_path(path)`` for prompts, reading the model's weight file (nothing of its own
    but small constants), `path` for token generation."""
    path, config_json = pathlib.Path(path), pathlib.Path(config_json)
    tokenizer_dir = pathlib.Path(tokenizer_dir) if tokenizer_dir else config_json.parent
    config = ModelConfig.read(config_json)
    model = _with_metadata(build_decoder(graph, structure, config, accuracy_level, int8_linears=kernel == "int8"),
                           metadata)
    directory, data = path.parent, path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    del model
    (directory / data).chmod(path.stat().st_mode & 0o777)  # onnx writes external data private (0600)
    files = [path, directory / data]
    prompt = None
    if kernel == "int8-prompt":
        prompt = prompt_path(path)
        model = _with_metadata(build_decoder(graph, structure, config, accuracy_level, int8_linears=True), metadata)
        _share_weights(model, path)
        onnx.save_model(model, str(prompt))
        del model
        files.append(prompt)
    (directory / "genai_config.json").write_text(
        json.dumps(genai_config(structure, config, path.name, prompt and prompt.name), indent=4) + "\n")
    files.append(directory / "genai_config.json")
    for src in [config_json] + [tokenizer_dir / name for name in TOKENIZER_FILES]:
        if src.is_file() and not (directory / src.name).exists():
            shutil.copyfile(src, directory / src.name)
            files.append(directory / src.name)
    return files


def write_genai_folder(graph: gs.Graph, structure, folder, config_json, *, tokenizer_dir=None,
                       accuracy_level: int = 4, check: bool = True) -> pathlib.Path:
    """Write `folder` (new or empty): model.onnx + model.onnx.data, genai_config.json, config.json and
    the tokenizer files (tokenizer.json, tokenizer_config.json, chat template, ...) from
    `tokenizer_dir` (default: config_json's directory).

    graph: the optimum export as perq-onnx rewrote it (any of R1/R2/P3/R3 applied; weights float or
    INT4 blocked DequantizeLinear from QuantizeWeights; embedding float or QuantizeEmbedding's INT8
    form); structure: ``analyze`` of that graph *before* the rewrites (the passes keep node names).
    accuracy_level: MatMulNBits' attribute (4: int8 activations inside the kernel, 0: float).
    With check, the model is loaded in onnxruntime before the folder is published. Everything is
    written into a staging folder beside `folder` and renamed into place."""
    folder = pathlib.Path(folder)
    config_json = pathlib.Path(config_json)
    tokenizer_dir = pathlib.Path(tokenizer_dir) if tokenizer_dir else config_json.parent
    if folder.exists() and any(folder.iterdir()):
        raise GenaiError(f"{folder}: exists and is not empty")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_genai_files(graph, structure, staging / "model.onnx", config_json, tokenizer_dir, accuracy_level)
        if check:
            import onnxruntime as ort
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            try:
                ort.InferenceSession(str(staging / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises several types
                raise GenaiError(f"onnxruntime cannot load the genai model: {str(exc).splitlines()[0]}") from None
        umask = os.umask(0)
        os.umask(umask)
        for f in staging.iterdir():  # mkdtemp and onnx's external data file are private (0700 / 0600)
            f.chmod(0o666 & ~umask)
        staging.chmod(0o777 & ~umask)
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def genai_from_model(model, source, folder, *, config_json=None, tokenizer_dir=None, accuracy_level: int = 4,
                     check: bool = True) -> pathlib.Path:
    """Standalone driver: the genai folder of a perq-onnx output file `model` (e.g. ``perq-onnx
    optimize smollm2 --target ort --residual-rotation full``: the decoder folds R1; an online R1 is
    refused naming its node), given the optimum export `source` it was made from (analysed
    for the structure: a rewritten graph is not what the analysis recognises, its node names are
    the source's). config.json and the tokenizer default to the files beside `model`, else
    beside `source`."""
    from .analysis import analyze
    from .graph import load_graph
    model, source = pathlib.Path(model), pathlib.Path(source)
    if config_json is None:
        config_json = next((d / "config.json" for d in (model.parent, source.parent) if (d / "config.json").is_file()),
                           model.parent / "config.json")
    structure = analyze(load_graph(source))
    return write_genai_folder(load_graph(model), structure, folder, config_json,
                              tokenizer_dir=tokenizer_dir or pathlib.Path(config_json).parent,
                              accuracy_level=accuracy_level, check=check)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="write the onnxruntime-genai folder of a perq-onnx output")
    ap.add_argument("model", help="the perq-onnx output (.onnx)")
    ap.add_argument("source", help="the optimum export it was optimized from (.onnx, or a recipe name)")
    ap.add_argument("folder", help="output folder (new or empty)")
    ap.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4))
    ap.add_argument("--config", help="config.json (default: beside the model, else beside the source)")
    args = ap.parse_args(argv)
    source = args.source
    if not source.endswith(".onnx"):
        from .models import resolve
        source = resolve(source)
    try:
        out = genai_from_model(args.model, source, args.folder, config_json=args.config,
                               accuracy_level=args.accuracy_level)
    except PerqError as exc:
        print(f"perq-onnx: {exc}")
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
