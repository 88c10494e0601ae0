"""Stream tokens from a genai model folder (``--target genai``) through onnxruntime-genai."""
from __future__ import annotations

import json
import pathlib
import sys

from .errors import PerqError


def genai_folder(path) -> pathlib.Path:
    """The folder holding genai_config.json (given the folder or its model file)."""
    path = pathlib.Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / "genai_config.json").is_file():
        raise PerqError(f"{path}: no genai_config.json beside the model (write the folder with "
                        "'perq-onnx optimize MODEL --target genai -o FOLDER/model.onnx')")
    return folder


def stream(path, prompt: str, max_new_tokens: int = 128, chat: bool = False, out=None,
           threads: int | None = None) -> list[int]:
    """Greedy generation from `prompt` (wrapped in the folder's chat template with `chat`),
    printing each token's text as it comes; the generated token ids. threads: onnxruntime's
    intra-op threads (None: onnxruntime-genai's default, which is one thread on a 2-vCPU machine
    without SMT such as this project's; the folder's genai_config.json is not changed)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise PerqError("perq-onnx generate runs models with onnxruntime-genai: "
                        "pip install 'perq-onnx[genai]' (or onnxruntime-genai)") from None
    if max_new_tokens < 1:
        raise PerqError(f"--max-new-tokens {max_new_tokens}: must be a positive integer")
    out = out or sys.stdout
    folder = genai_folder(path)
    try:
        config = og.Config(str(folder))
        if threads is not None:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        model = og.Model(config)
    except Exception as exc:  # onnxruntime-genai raises its own error types
        raise PerqError(f"{folder}: onnxruntime-genai cannot load it: {str(exc).splitlines()[0]}") from None
    tokenizer = og.Tokenizer(model)
    if chat:
        prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                               add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    decoder, tokens = tokenizer.create_stream(), []
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        tokens.append(token)
        out.write(decoder.decode(token))
        out.flush()
    out.write("\n")
    return tokens
