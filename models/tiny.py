"""Tiny random-weight decoder-only LLMs exported to ONNX, for the test-suite.

``export_tiny(arch, out_dir, with_past, tied)`` builds a Llama, Mistral or Qwen2 model (or one of
``FAMILY_ARCHS``: Gemma 1/2/3 text, OLMo2, see ``_family_config``; or of ``PHI3_GRANITE_ARCHS``:
Phi-3, Granite, see ``_phi3_granite_config``) from its
transformers config with hidden 128, intermediate 256, 2 layers, 4 query heads and 2 key/value
heads (grouped-query attention, head_dim 32), vocab 512 and 256 positions, and exports it with
optimum exactly as the real recipes are exported (fp32, unoptimized, no post-processing:
task ``text-generation``, or ``text-generation-with-past`` for a graph with KV-cache inputs and
``present.*`` outputs). Qwen2 has biases on the q/k/v projections (set to ``0.1 * randn``:
left at their zero init, the exporter would merge them into one initializer); Mistral is exported with its
config's default sliding window (4096, longer than any sequence here, so it never masks).

The weights are random but not trivial: after the usual init (seeded by ``seed``) every RMSNorm
weight is set to ``1 + 0.3 * randn`` (different per norm), and four hidden channels are made
outliers (their embedding columns x8, and the rows of every o_proj/down_proj that write them x4),
so per-channel calibration statistics are far from flat, as in trained models.

A tokenizer is saved next to model.onnx (``tokenizer.json`` + config; load it with
``AutoTokenizer.from_pretrained(out_dir)``). It is a byte-level tokenizer made in code, offline:
ids 0, 1, 2 are ``<|endoftext|>`` (unk), ``<|im_start|>`` (bos) and ``<|im_end|>`` (eos, pad),
ids 3..258 are the 256 bytes in GPT-2's byte-to-unicode alphabet, with no merges, so every UTF-8
byte of the text is one token. It adds no BOS/EOS (like the SmolLM2 recipe's tokenizer); ids
259..511 are never produced by it (they still exist in the model).

The build runs in a temporary Hugging Face directory and the output directory is filled at once
(written to a sibling temp dir, then renamed); an existing ``out_dir`` with a ``model.onnx`` is
reused as-is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from perq_onnx.errors import PerqError
from perq_onnx.models import quiet_export

ARCHS = ("llama", "mistral", "qwen2")
# Post-norm and Gemma-style families, tested on their own (tests/test_family_gemma_olmo.py) so that
# the suites parametrized over ARCHS stay as fast as they were.
FAMILY_ARCHS = ("gemma", "gemma2", "gemma3", "olmo2")
# Fused projections (Phi-3: qkv_proj, gate_up_proj) and scalar multipliers (Granite), tested on
# their own too (tests/test_family_phi3_granite.py); see ``_phi3_granite_config``.
PHI3_GRANITE_ARCHS = ("phi3", "granite")

HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
VOCAB = 512
MAX_POS = 256
N_OUTLIERS = 4


def _config(arch: str, tied: bool):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype="float32",
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch in FAMILY_ARCHS:
        return _family_config(arch, common)
    if arch in PHI3_GRANITE_ARCHS:
        return _phi3_granite_config(arch, common)
    raise PerqError(f"export_tiny: arch {arch!r} is not one of {', '.join(ARCHS)}")


def build_model(arch: str, tied: bool, seed: int = 0):
    """The tiny PyTorch model (eval mode, fp32) that ``export_tiny`` exports."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(arch, tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod).__name__.endswith("RMSNorm"):
                # Gemma norms scale by (1 + weight), zero at init: randomize the weight itself
                offset = 0.0 if arch.startswith("gemma") else 1.0
                mod.weight.copy_(offset + 0.3 * torch.randn(mod.weight.shape, generator=gen))
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # Qwen2's q/k/v biases: zero after init, which the
                # exporter would fold into one shared initializer; make each one distinct
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        outliers = torch.randperm(HIDDEN, generator=gen)[:N_OUTLIERS]
        model.model.embed_tokens.weight[:, outliers] *= 8.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[outliers, :] *= 4.0
            layer.mlp.down_proj.weight[outliers, :] *= 4.0
        _post_norm_outliers(arch, model, outliers)
    if tied:
        model.tie_weights()
    model.eval()
    return model


def _family_config(arch: str, common: dict):
    """Configs of FAMILY_ARCHS. Gemma needs an explicit head_dim (its default is 256) and uses
    tanh-GELU (GeGLU); Gemma 2/3 get a sliding window of 16 tokens (shorter than the tests'
    sequences, so it really masks) on alternating layers, with Gemma 2's attention and final logit
    soft-capping left at their defaults; Gemma 3 has q/k norms over each head; OLMo2 has
    post-norms only and q/k norms over the full projection width."""
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig, Olmo2Config

    head_dim = HIDDEN // HEADS
    sliding = dict(query_pre_attn_scalar=head_dim, sliding_window=16,
                   layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(LAYERS)])
    if arch == "gemma":
        return GemmaConfig(head_dim=head_dim, hidden_activation="gelu_pytorch_tanh", **common)
    if arch == "gemma2":
        return Gemma2Config(head_dim=head_dim, **sliding, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(head_dim=head_dim, rope_scaling=None, **sliding, **common)
    return Olmo2Config(**common)


def _post_norm_outliers(arch: str, model, outliers) -> None:
    """In post-norm layers (Gemma 2/3, OLMo2) the RMSNorm after o_proj/down_proj decides what is
    written to the residual stream: scale its effective gamma x4 on the outlier channels."""
    if arch not in ("gemma2", "gemma3", "olmo2"):
        return
    for layer in model.model.layers:
        for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
            if arch.startswith("gemma"):  # gamma = 1 + weight
                norm.weight[outliers] = 4.0 * (1.0 + norm.weight[outliers]) - 1.0
            else:
                norm.weight[outliers] *= 4.0


def _phi3_granite_config(arch: str, common: dict):
    """Configs of PHI3_GRANITE_ARCHS. Phi-3 (Phi-3-mini's layout: full rotary, SiLU gating
    ``up * silu(gate)`` with gate the first half of gate_up_proj, untied by default) fuses q/k/v
    and gate/up into one weight each; its module names keep o_proj and down_proj, so the outlier
    tweak applies unchanged. Granite gets Granite-3.0-like multipliers instead of its all-1.0
    defaults: the embedding x12, every o_proj/down_proj output x0.22 before its residual Add,
    attention scores x(1/32) instead of 1/sqrt(head_dim), logits / 8 (tied by default)."""
    from transformers import GraniteConfig, Phi3Config

    if arch == "phi3":
        return Phi3Config(original_max_position_embeddings=MAX_POS, **common)
    return GraniteConfig(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=1.0 / 32,
                         logits_scaling=8.0, **common)


def build_tokenizer():
    """The offline byte-level tokenizer described in the module docstring."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    assert len(vocab) == len(specials) + 256 <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        model_max_length=MAX_POS,
    )


def export_tiny(arch: str, out_dir: Path, with_past: bool, tied: bool, seed: int = 0,
                opset: int | None = None, dtype: str | None = None) -> Path:
    """Export the tiny ``arch`` model to ``out_dir/model.onnx`` (tokenizer beside it); return that path.

    ``opset`` is passed to optimum (default: optimum's choice, 14 for these architectures in
    optimum 2.x unless it raises it); ``dtype`` ("fp16", "bf16") to optimum's ``--dtype`` (optimum
    refuses fp16 on CPU, so it is only useful on a GPU machine; the tests convert fp32 exports
    with onnxruntime's float16 converter instead)."""
    if arch not in ARCHS + FAMILY_ARCHS + PHI3_GRANITE_ARCHS:
        raise PerqError(f"export_tiny: arch {arch!r} is not one of "
                        f"{', '.join(ARCHS + FAMILY_ARCHS + PHI3_GRANITE_ARCHS)}")
    out_dir = Path(out_dir)
    onnx_file = out_dir / "model.onnx"
    if onnx_file.exists():
        return onnx_file

    from optimum.exporters.onnx import main_export

    model = build_model(arch, tied, seed)
    tok = build_tokenizer()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-", dir=out_dir.parent) as tmp:
        hf = Path(tmp) / "hf"
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        staging = Path(tmp) / "onnx"
        with quiet_export():
            main_export(
                str(hf),
                output=staging,
                task="text-generation-with-past" if with_past else "text-generation",
                no_post_process=True,
                do_validation=False,
                local_files_only=True,
                **({"opset": opset} if opset is not None else {}),
                **({"dtype": dtype} if dtype is not None else {}),
            )
        if not (staging / "model.onnx").exists():
            raise PerqError(f"export_tiny: optimum wrote no model.onnx for {arch} in {staging}")
        _copy_tokenizer_files(hf, staging)
        _publish(staging, out_dir)
    return onnx_file


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished export into ``out_dir``: a rename when it does not exist yet, else file by
    file with model.onnx last, so a ``model.onnx`` in ``out_dir`` always means a complete export."""
    if not out_dir.exists():
        try:
            os.replace(staging, out_dir)
            return
        except OSError:
            if (out_dir / "model.onnx").exists():  # a concurrent writer won the race
                return
            if not out_dir.exists():
                raise
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    names.sort(key=lambda n: n == "model.onnx")
    for name in names:
        os.replace(staging / name, out_dir / name)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).exists() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
