"""perq-onnx command line: optimize, inspect, eval, verify, build-ops."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

from .errors import InternalError, PerqError


def _model(arg: str) -> pathlib.Path:
    from .models import resolve
    return resolve(arg)


def _add_calibration_args(p):
    p.add_argument("--calib-data", help="text file for calibration (default: data-free, model-sampled)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's directory)")
    p.add_argument("--calib-samples", type=int, help="calibration sequences (default 32 from text, 8 data-free)")
    p.add_argument("--seq-len", type=int, help="calibration sequence length (default 512 from text, 128 data-free)")


def settings_from(args):
    """Settings from the parsed `optimize` options (argparse's names are Settings' option names)."""
    from .settings import OPTIONS, Settings
    derived = dict(head_rotation=not args.no_head_rotation, quantize=not args.no_quant,
                   gptq_act_order=not args.gptq_no_act_order)
    options = {key: getattr(args, key) for key in (*OPTIONS, "format", "target", "float_embeddings", "seed")
               if key not in derived}
    options.update(derived)
    if args.block is None:  # the format's scale block, else 16
        from .settings import NumberFormat
        options["block"] = str(NumberFormat(args.format).block or 16)
    return Settings.parse(**options)


def cmd_optimize(args) -> int:
    import json
    from .pipeline import optimize
    settings = settings_from(args)
    report = optimize(_model(args.model), args.output, settings)
    for line in report.summaries:
        print(f"  {line}")
    for phase in report.phases:
        print(f"  phase {phase.name:<10} {phase.seconds:7.1f} s, peak RSS {phase.peak_rss_bytes / 2**20:8.0f} MiB")
    size = sum(p.stat().st_size for p in (pathlib.Path(args.output), pathlib.Path(args.output + ".data"))
               if p.is_file())
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB) in {report.seconds:.1f} s")
    if args.report:
        pathlib.Path(args.report).write_text(json.dumps(report.to_json(), indent=1))
    return 0


def cmd_inspect(args) -> int:
    from .analysis import AnalysisError, analyze
    from .graph import load_graph
    path = _model(args.model)
    graph = load_graph(path)
    try:
        structure = analyze(graph)
    except AnalysisError as exc:
        print(f"{path}: refused at node '{exc.node}': {exc.reason}")
        return 1
    s = structure
    layer = s.layers[0]
    print(f"{path}: {len(s.layers)} decoder layers, hidden {s.hidden_size}, MLP {s.intermediate_size}, "
          f"vocab {s.vocab_size}, heads {layer.num_heads} (kv {layer.num_kv_heads}) x {layer.head_dim}")
    print("permutation-equivariant regions:")
    for r in s.regions():
        print(f"  {r.name:<20} {r.kind:<8} dim {r.dim:<6} statistics at {r.stats[0]}"
              + (f" (+{len(r.stats) - 1} more)" if len(r.stats) > 1 else ""))
        print(f"  {'':<20} folds into: {r.description}")
    if s.residual_blocker:  # output norms (Gemma 2/3, OLMo2): see post_norms.py
        print(f"no residual region (R1 is skipped): {s.residual_blocker}")
    return 0


def cmd_eval(args) -> int:
    from .calibration import load_tokenizer, tokenize_file, windows
    from .evaluate import perplexity
    path = _model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or path.parent)
    wins = windows(tokenize_file(args.text, tokenizer), args.seq_len, args.max_windows, str(args.text))
    result = perplexity(path, wins, args.threads)
    print(f"perplexity {result.ppl:.4f} over {result.tokens} predicted tokens "
          f"({result.windows} windows x {args.seq_len}) in {result.seconds:.1f} s")
    return 0


def cmd_verify(args) -> int:
    from .evaluate import compare_logits
    ids = None
    if args.text:
        from .calibration import load_tokenizer, tokenize_file, windows
        tokenizer = load_tokenizer(args.tokenizer or _model(args.a).parent)
        ids = windows(tokenize_file(args.text, tokenizer), args.seq_len, args.batch, str(args.text))
    d = compare_logits(_model(args.a), _model(args.b), args.batch, args.seq_len, args.seed, args.threads, ids)
    print(f"top-1 agreement {d.top1:.2%}, KL(a||b) {d.kl:.4f} nats/token, logit cosine {d.cosine:.5f}")
    if args.tolerance is None:
        return 0
    ok = d.relative <= args.tolerance
    print(f"max |logit difference| {d.max_abs:.3e}, relative {d.relative:.3e} "
          f"({'within' if ok else 'ABOVE'} tolerance {args.tolerance:g})")
    return 0 if ok else 1


def cmd_check(args) -> int:
    from .check import check_tensorrt, summary
    violations = check_tensorrt(_model(args.model))
    print(summary(violations))
    return 1 if violations else 0


def cmd_build_ops(args) -> int:
    from .ops import build_library
    print(f"built {build_library(verbose=True)}")
    return 0


def parser() -> argparse.ArgumentParser:
    from .settings import Clip, NumberFormat, Permute, ResidualRotation, Rounding, TargetName
    p = argparse.ArgumentParser(prog="perq-onnx", description="PeRQ low-bit quantization of ONNX decoder LLMs")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="rotate, permute and quantize a model")
    o.add_argument("model", help="ONNX file, or the recipe name 'smollm2'")
    o.add_argument("-o", "--output", required=True, help="output ONNX file (written atomically)")
    o.add_argument("--block", help="online rotation at down_proj: block size (power of two), 'full' "
                                   "(full-vector) or 'none' (default: the --format's scale block, else 16)")
    o.add_argument("--permute", default="massdiff", choices=Permute.values())
    o.add_argument("--residual-rotation", choices=ResidualRotation.values(),
                   help="R1: default full where it is exact, none on post-norm models (Gemma 2/3, OLMo2); "
                        "an explicit full/block on those is an error")
    o.add_argument("--residual-block", type=int, help="block size of --residual-rotation block (default --block)")
    o.add_argument("--no-head-rotation", action="store_true", help="skip the per-head v/o rotation (R2)")
    o.add_argument("--no-quant", action="store_true", help="emit the rotated and permuted float model")
    o.add_argument("--w-bits", type=int, default=4, choices=[4, 8, 16])
    o.add_argument("--w-group", type=int, help="weight scales per group of this many input rows (default: per "
                                                "output channel for simulate, 32 for ort, 128 for tensorrt)")
    o.add_argument("--float-embeddings", action="store_true",
                   help="keep the embedding and lm_head float (ort and tensorrt quantize them by default)")
    o.add_argument("--rounding", choices=Rounding.values(),
                   help="weight rounding: round-to-nearest or GPTQ with Hessians from calibration data "
                        "(default: rtn for simulate, gptq for ort and tensorrt)")
    o.add_argument("--w-clip", choices=Clip.values(),
                   help="weight scale rule: mse (weight error), absmax, act (output error, calibration data; "
                        "default: mse for simulate, act for ort and tensorrt)")
    o.add_argument("--a-bits", type=int, choices=[4, 8, 16],
                   help="activation bits (default: 4 for simulate; ort leaves activations to onnxruntime)")
    o.add_argument("--a-symmetric", action="store_true", help="symmetric activation quantization (default asymmetric)")
    o.add_argument("--format", default="int", choices=NumberFormat.values(),
                   help="4-bit number format of weights and activations: int (--w-bits/--a-bits), or microscaling "
                        "FP4: nvfp4 (E2M1, E4M3 scale per 16, fp32 tensor scale) or mxfp4 (E2M1, E8M0 scale per 32)")
    o.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ damping, a fraction of mean(diag H) (default 0.01)")
    o.add_argument("--gptq-block", type=int, default=128, help="GPTQ lazy-update block in rows (default 128)")
    o.add_argument("--gptq-no-act-order", action="store_true", help="GPTQ in natural row order (default: act order)")
    o.add_argument("--fused-ops", action="store_true", help="emit perq.BlockHadamardQuantize (rotation + activation QDQ)")
    o.add_argument("--random-orthogonal", action="store_true",
                   help="use a seeded random orthogonal matrix where no Hadamard construction exists")
    o.add_argument("--target", default="simulate", choices=TargetName.values(),
                   help="output form (default simulate: the research W/A fake-quantization form)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--report", help="write a JSON report (pass summaries, phase times and peak memory) here")
    _add_calibration_args(o)
    o.set_defaults(func=cmd_optimize)

    i = sub.add_parser("inspect", help="print the decoder structure and permutation-equivariant regions")
    i.add_argument("model")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="perplexity on a text file (non-overlapping windows)")
    e.add_argument("model")
    e.add_argument("text")
    e.add_argument("--tokenizer")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-windows", type=int)
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("verify", help="compare two models' logits on the same random tokens")
    v.add_argument("a")
    v.add_argument("b")
    v.add_argument("--tolerance", type=float,
                   help="fail (exit 1) when max |logit difference| / max |logit| exceeds this (exact rewrites: 1e-4)")
    v.add_argument("--text", help="compare on windows of this text file (default: random tokens)")
    v.add_argument("--tokenizer")
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--seq-len", type=int, default=16)
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=cmd_verify)

    c = sub.add_parser("check", help="check a model against a deployment target's documented constraints")
    c.add_argument("model")
    c.add_argument("--target", default="tensorrt", choices=["tensorrt"])
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("build-ops", help="build the BlockHadamard custom-op library (CPU, CUDA if nvcc)")
    b.set_defaults(func=cmd_build_ops)
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temporary files are removed on the way out


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import signal
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (embedded use)
        pass
    try:
        return args.func(args)
    except PerqError as exc:
        print(f"perq-onnx: error: {exc}", file=sys.stderr)
        return 2
    except InternalError as exc:
        if os.environ.get("PERQ_DEBUG"):
            raise
        print(f"perq-onnx: internal error (a bug in perq-onnx): {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except KeyboardInterrupt:
        print("perq-onnx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line unless asked for the traceback
        if os.environ.get("PERQ_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"perq-onnx: internal error: {type(exc).__name__}: {first} (set PERQ_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
