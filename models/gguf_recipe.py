"""The steps every GGUF recipe shares: GGUF -> float32 Hugging Face dir -> optimum ONNX export.

A recipe (``smollm2.py``, ``gemma3.py``) declares only what differs: where its GGUF file comes
from, how its tokenizer is built from the GGUF, the ``model_type`` transformers must load it as,
and which tokenizer files travel with the exports. Everything else lives here:

* cache ``$PERQ_CACHE/<name>`` (default ``~/.cache/perq-onnx/<name>``);
* ``hf/``: ``AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=..., dtype=float32)``
  (the loader's tqdm bar, which ignores transformers' progress-bar switch, is captured and only
  shown on failure), generation config's bos/eos/pad taken from the recipe's tokenizer, saved
  with ``save_pretrained`` next to the tokenizer;
* ``onnx/model.onnx`` (``text-generation``) and ``onnx-with-past/model.onnx``
  (``text-generation-with-past``): optimum ``main_export(hf/, no_post_process=True,
  do_validation=False)``, the tokenizer files copied beside them.

Each step is skipped when its output exists; each output is written into a temp dir and renamed
into place, so a present directory is a complete one. A recipe that sets ``tokenizer_version``
also stamps its tokenizer files (``TOKENIZER_STAMP``): cached dirs whose stamp differs get the
tokenizer rebuilt and re-copied (the weights and exports are kept).
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from perq_onnx.errors import PerqError
from perq_onnx.models import quiet_export as _quiet

TOKENIZER_STAMP = "perq_tokenizer_version.txt"


@contextlib.contextmanager
def staging(final: Path):
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


@dataclass(frozen=True)
class GGUFRecipe:
    name: str                                # cache folder and log prefix
    gguf_path: Callable[[], Path]            # the GGUF file (located or assembled; PerqError if missing)
    build_tokenizer: Callable[[Path], Any]   # GGUF path -> checked PreTrainedTokenizerFast
    tokenizer_files: tuple[str, ...]         # copied from hf/ into the ONNX dirs
    model_type: str | None = None            # what transformers must load the GGUF as (None: no check)
    tokenizer_version: str | None = None     # stamp of the tokenizer build (None: no stamp, no refresh)
    slow_note: str = ""                      # appended to the "dequantizing" log line

    def log(self, msg: str) -> None:
        print(f"perq-onnx [{self.name}]: {msg}", file=sys.stderr, flush=True)

    def cache_dir(self) -> Path:
        """``$PERQ_CACHE/<name>``, default ``~/.cache/perq-onnx/<name>`` (not created here)."""
        root = os.environ.get("PERQ_CACHE") or "~/.cache/perq-onnx"
        return Path(root).expanduser() / self.name

    # -- tokenizer stamp ------------------------------------------------------------------------
    def _stale(self, directory: Path) -> bool:
        if self.tokenizer_version is None:
            return False
        stamp = directory / TOKENIZER_STAMP
        return not stamp.is_file() or stamp.read_text().strip() != self.tokenizer_version

    def _save_tokenizer(self, tok, directory: Path) -> None:
        tok.save_pretrained(directory)
        if self.tokenizer_version is not None:
            (directory / TOKENIZER_STAMP).write_text(self.tokenizer_version + "\n")

    def _copy_tokenizer(self, src: Path, dst: Path, overwrite: bool) -> None:
        """The tokenizer files of src into dst (keeping what the export wrote unless overwrite)."""
        for name in (*self.tokenizer_files, TOKENIZER_STAMP):
            if (src / name).is_file() and (overwrite or not (dst / name).exists()):
                shutil.copy2(src / name, dst / name)

    def _refresh_tokenizer(self, hf: Path) -> None:
        """Rebuild a stale cached tokenizer in place (the model files stay)."""
        self.log(f"rebuilding the tokenizer in {hf} (version {self.tokenizer_version}) ...")
        tok = self.build_tokenizer(self.gguf_path())
        for name in self.tokenizer_files:
            (hf / name).unlink(missing_ok=True)
        self._save_tokenizer(tok, hf)

    # -- steps ----------------------------------------------------------------------------------
    def hf_dir(self) -> Path:
        """The float32 Hugging Face directory (model + tokenizer); built from the GGUF when missing."""
        final = self.cache_dir() / "hf"
        if (final / "config.json").is_file():
            if self._stale(final):
                self._refresh_tokenizer(final)
            return final
        gguf = self.gguf_path()
        import torch
        from transformers import AutoModelForCausalLM

        self.log(f"dequantizing {gguf.name} to a float32 Hugging Face dir {final}{self.slow_note} ...")
        t0 = time.perf_counter()
        with _quiet(), staging(final) as tmp:
            tok = self.build_tokenizer(gguf)
            captured = io.StringIO()
            try:
                with contextlib.redirect_stderr(captured):
                    model = AutoModelForCausalLM.from_pretrained(
                        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
                    )
            except BaseException:
                sys.stderr.write(captured.getvalue())
                raise
            if self.model_type and model.config.model_type != self.model_type:
                raise PerqError(f"recipe {self.name!r}: the GGUF loaded as {model.config.model_type!r}, "
                                f"not {self.model_type}")
            model.generation_config.bos_token_id = tok.bos_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
            model.generation_config.pad_token_id = tok.pad_token_id
            model.save_pretrained(tmp)
            self._save_tokenizer(tok, tmp)
            del model
        if not (final / "config.json").is_file():
            raise PerqError(f"recipe {self.name!r}: {final} exists but holds no config.json; delete it and retry")
        self.log(f"hf dir ready in {time.perf_counter() - t0:.1f} s")
        return final

    def onnx_path(self, with_past: bool = False) -> Path:
        """``model.onnx`` of the fp32, unoptimized optimum export (KV-cache I/O when ``with_past``)."""
        final = self.cache_dir() / ("onnx-with-past" if with_past else "onnx")
        onnx_file = final / "model.onnx"
        if onnx_file.is_file():
            if self._stale(final):
                self._copy_tokenizer(self.hf_dir(), final, overwrite=True)
            return onnx_file
        hf = self.hf_dir()
        from optimum.exporters.onnx import main_export

        task = "text-generation-with-past" if with_past else "text-generation"
        self.log(f"exporting {task} to ONNX fp32 in {final} ...")
        t0 = time.perf_counter()
        with _quiet(), staging(final) as tmp:
            main_export(str(hf), output=tmp, task=task, no_post_process=True, do_validation=False,
                        local_files_only=True)
            if not (tmp / "model.onnx").is_file():
                raise PerqError(f"recipe {self.name!r}: optimum wrote no model.onnx into {tmp}")
            self._copy_tokenizer(hf, tmp, overwrite=False)
        if not onnx_file.is_file():
            raise PerqError(f"recipe {self.name!r}: {final} exists but holds no model.onnx; delete it and retry")
        self.log(f"{onnx_file} ready in {time.perf_counter() - t0:.1f} s")
        return onnx_file

    def tokenizer(self):
        """The recipe's tokenizer, from the cached hf dir."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.hf_dir()))
