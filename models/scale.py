"""Random-weight Llama models of Llama-3.2-1B's shape, exported to ONNX with external data, for the
scale benchmark (benchmarks/scale.py).

``onnx_path(layers)`` builds (once) and returns ``$PERQ_CACHE/scale/L{layers}/model.onnx``
(default cache ``~/.cache/perq-onnx``). The model has Llama-3.2-1B's configuration except for the
number of layers: hidden 2048, intermediate 8192, 32 query heads and 8 key/value heads (head_dim
64), vocab 128256, RoPE theta 500000 with Llama 3's rope scaling, RMSNorm eps 1e-5, tied word
embeddings, fp32. Parameters: 262.7M (embedding) + 60.8M per layer, so 4 / 8 / 16 layers are
2.0 / 3.0 / 4.9 GB of float32 weights.

The weights are random, made a little realistic the way models/tiny.py does it: the usual init
(normal, std 0.02, seeded), every RMSNorm weight ``1 + 0.3 * randn``, and four outlier hidden
channels (their embedding columns x8, the o_proj/down_proj rows that write them x4), so the
calibration statistics are not flat.

Export: optimum ``main_export(task="text-generation", no_post_process=True, do_validation=False)``
like the other recipes (inputs ``input_ids, attention_mask, position_ids``, output ``logits``),
with ``FORCE_ONNX_EXTERNAL_DATA=1``. torch's exporter writes one file per tensor for models over
2 GB, and optimum then gathers them into one external data file ``model.onnx_data`` next to
``model.onnx``; the variable forces the same layout for a smaller model, so no re-save is needed.
The ONNX graph stores lm_head as its own transposed copy of the tied embedding (a MatMul
initializer; the embedding is a Gather), so the export is 1.05 GB bigger than the torch weights:
3.07 / 4.05 / 6.0 GB for 4 / 8 / 16 layers. The byte-level tokenizer of models/tiny.py is saved
next to the model (ids < 259, far below the vocab; ``model_max_length`` raised to 131072), so
``--calib-data FILE --tokenizer DIR`` works.

Memory. Each step runs in its own Python child process, so nothing of the torch model outlives it:

* ``hf``: build the model in torch (no_grad) and ``save_pretrained`` it (safetensors) together with
  the tokenizer. L4: 47 s, peak RSS 3.5 GB; L8: 83 s, 4.4 GB; L16: 102 s, 6.4 GB.
* ``export``: optimum loads that directory and exports it; torch's exporter holds the model and
  its tensors, then optimum (still holding the torch model) loads the whole ONNX with its data to
  write the single data file. L4: 172 s, peak RSS 6.7 GB; L8: 310 s, 8.6 GB; L16: 424 s, 9.2 GB
  (2.2x, 2.1x, 1.5x the ONNX bytes).

Before each step the build waits until ``MemAvailable`` covers an estimate of the step's peak
(``STEP_PEAK`` x the ONNX bytes; the machine is shared). The wall time and peak RSS of both steps
are written to ``build.json`` next to the model. Everything is built in a temp dir under
``$PERQ_CACHE/scale`` and moved into place at the end (the HF safetensors copy is deleted), so a
``L{n}/model.onnx`` is a complete export.

    python -m perq_onnx.models.scale --layers 4 8 16     # build (or reuse) and print the paths
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perq_onnx.errors import PerqError
from perq_onnx.models import quiet_export
from perq_onnx.models.tiny import _copy_tokenizer_files, _publish, build_tokenizer

NAME = "scale"
HIDDEN = 2048
INTERMEDIATE = 8192
HEADS = 32
KV_HEADS = 8
HEAD_DIM = 64
VOCAB = 128256
MAX_POS = 131072
ROPE_THETA = 500000.0
ROPE_SCALING = {  # Llama-3.2-1B's config.json
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
RMS_EPS = 1e-5
N_OUTLIERS = 4
EMBED_PARAMS = VOCAB * HIDDEN
LAYER_PARAMS = (
    2 * HIDDEN * HEADS * HEAD_DIM  # q_proj, o_proj
    + 2 * HIDDEN * KV_HEADS * HEAD_DIM  # k_proj, v_proj
    + 3 * HIDDEN * INTERMEDIATE  # gate, up, down
    + 2 * HIDDEN  # input / post-attention RMSNorm
)
# peak RSS of a build step as a multiple of the ONNX export's bytes, for the wait-for-memory check
# (measured: L4, 3.07 GB: hf 3.5 GB, export 6.7 GB; L8, 4.05 GB: hf 4.4 GB, export 8.6 GB)
STEP_PEAK = {"hf": 1.3, "export": 2.2}


def _log(msg: str) -> None:
    print(f"perq-onnx [{NAME}]: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$PERQ_CACHE/scale``, default ``~/.cache/perq-onnx/scale`` (not created here)."""
    root = os.environ.get("PERQ_CACHE") or "~/.cache/perq-onnx"
    return Path(root).expanduser() / NAME


def n_params(layers: int) -> int:
    """Parameter count of the ``layers``-layer model (tied embeddings counted once)."""
    return EMBED_PARAMS + layers * LAYER_PARAMS + HIDDEN


def onnx_bytes(layers: int) -> int:
    """Approximate bytes of the export: the fp32 weights plus lm_head, which the ONNX export stores
    as its own transposed copy of the tied embedding."""
    return 4 * (n_params(layers) + EMBED_PARAMS)


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        rope_theta=ROPE_THETA,
        rope_scaling=dict(ROPE_SCALING),
        rms_norm_eps=RMS_EPS,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype="float32",
    )


def build_model(layers: int, seed: int = 0):
    """The random fp32 PyTorch model (eval mode) described in the module docstring."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config(layers), dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed + 1)
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(1.0 + 0.3 * torch.randn(mod.weight.shape, generator=gen))
        outliers = torch.randperm(HIDDEN, generator=gen)[:N_OUTLIERS]
        model.model.embed_tokens.weight[:, outliers] *= 8.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[outliers, :] *= 4.0
            layer.mlp.down_proj.weight[outliers, :] *= 4.0
    model.tie_weights()
    model.eval()
    return model


def onnx_path(layers: int, seed: int = 0) -> Path:
    """``model.onnx`` of the ``layers``-layer model (weights in ``model.onnx_data``); built when missing."""
    out_dir = cache_dir() / f"L{layers}"
    onnx_file = out_dir / "model.onnx"
    if onnx_file.is_file():
        return onnx_file
    _log(f"building L{layers}: {n_params(layers) / 1e6:.0f}M params, "
         f"{4 * n_params(layers) / 1e9:.2f} GB fp32, ~{onnx_bytes(layers) / 1e9:.2f} GB as ONNX")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".L{layers}-", dir=out_dir.parent) as tmp:
        hf, staging = Path(tmp) / "hf", Path(tmp) / "onnx"
        stats = {"layers": layers, "params": n_params(layers), "seed": seed}
        for step, args in (("hf", ["--hf", str(hf), "--seed", str(seed)]),
                           ("export", ["--hf", str(hf), "--out", str(staging)])):
            _wait_for_memory(STEP_PEAK[step] * onnx_bytes(layers), step)
            stats[step] = _run_step(step, layers, args)
            _log(f"L{layers} {step}: {stats[step]['seconds']:.0f} s, "
                 f"peak RSS {stats[step]['peak_rss_bytes'] / 1e9:.1f} GB")
        if not (staging / "model.onnx").is_file():
            raise PerqError(f"scale L{layers}: optimum wrote no model.onnx into {staging}")
        _copy_tokenizer_files(hf, staging)
        stats["files"] = {p.name: p.stat().st_size for p in sorted(staging.iterdir())}
        (staging / "build.json").write_text(json.dumps(stats, indent=1) + "\n")
        _publish(staging, out_dir)
    _log(f"{onnx_file} ready")
    return onnx_file


def build_info(layers: int) -> dict:
    """The ``build.json`` written next to an existing build (steps' seconds and peak RSS, files)."""
    path = cache_dir() / f"L{layers}" / "build.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _run_step(step: str, layers: int, args: list[str]) -> dict:
    """Run one build step in a child Python; return its wall seconds and peak RSS."""
    cmd = [sys.executable, "-m", "perq_onnx.models.scale", "--step", step, *args, "--layers", str(layers)]
    env = dict(os.environ, FORCE_ONNX_EXTERNAL_DATA="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise PerqError(f"scale L{layers}: step {step!r} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return {"seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}


def _wait_for_memory(need: float, step: str) -> None:
    """Block (with a message a minute) until /proc/meminfo's MemAvailable is at least ``need`` bytes."""
    waited = 0
    while (avail := _mem_available()) < need:
        if waited % 60 == 0:
            _log(f"step {step} needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available: waiting")
        time.sleep(10)
        waited += 10


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _step_hf(layers: int, hf: Path, seed: int) -> None:
    import torch

    t0 = time.perf_counter()
    model = build_model(layers, seed)
    _log(f"L{layers}: torch model built in {time.perf_counter() - t0:.0f} s, saving {hf} ...")
    with torch.no_grad():
        model.save_pretrained(hf)
    tok = build_tokenizer()
    tok.model_max_length = MAX_POS
    tok.save_pretrained(hf)


def _step_export(hf: Path, staging: Path) -> None:
    from optimum.exporters.onnx import main_export

    _log(f"exporting {hf} to ONNX (optimum, fp32, external data) ...")
    with quiet_export():
        main_export(
            str(hf),
            output=staging,
            task="text-generation",
            no_post_process=True,
            do_validation=False,
            local_files_only=True,
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build the scale-benchmark models (Llama-3.2-1B shape, N layers).")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--step", choices=["hf", "export"], help=argparse.SUPPRESS)  # internal: one child step
    p.add_argument("--hf", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = p.parse_args(argv)
    if args.step == "hf":
        _step_hf(args.layers[0], args.hf, args.seed)
    elif args.step == "export":
        _step_export(args.hf, args.out)
    else:
        for n in args.layers:
            path = onnx_path(n, args.seed)
            size = sum(f.stat().st_size for f in path.parent.glob("model.onnx*"))
            print(f"L{n}: {path} ({size / 1e9:.2f} GB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
