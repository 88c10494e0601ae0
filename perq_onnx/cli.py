"""perq-onnx command line: optimize, inspect, eval, verify, build-ops."""
from __future__ import annotations

import argparse
import contextlib
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
    derived = dict(head_rotation=False if args.no_head_rotation else (True if args.head_rotation else None),
                   quantize=not args.no_quant,
                   gptq_act_order=not args.gptq_no_act_order, w_symmetric=not args.w_asymmetric)
    options = {key: getattr(args, key) for key in (*OPTIONS, "format", "target", "float_embeddings", "embedding", "kernel", "seed")
               if key not in derived}
    options.update(derived)
    return Settings.parse(**options)  # an unset --block is the format's scale block


def _outputs(args, model: pathlib.Path) -> list:
    """The files `optimize` will write, named by option: -o with its external data file (and the
    tokenizer/config files copied beside it when its folder differs from the model's), --report."""
    from .pipeline import SIDECAR_FILES
    from .publish import Output
    out = Output.model(args.output)
    folder = pathlib.Path(args.output).parent
    copied = folder.resolve() != model.parent.resolve() and not any((folder / n).exists() for n in SIDECAR_FILES)
    if copied:  # as pipeline._copy_sidecar_files: only into a folder without such files of its own
        out = Output(out.option, out.path, out.companions + tuple(out.path.parent / n for n in SIDECAR_FILES))
    return [out] + ([Output("--report", pathlib.Path(args.report))] if args.report is not None else [])


def _inputs(model: pathlib.Path, *others) -> list[pathlib.Path]:
    """The files a run reads, which no output may replace: the model (checked: see inputs.py),
    its external data, its tokenizer and config files, and the other files named."""
    from .inputs import check_model
    from .pipeline import SIDECAR_FILES
    files = [model, *sorted(check_model(model) - {model.resolve()})]
    files += [model.parent / n for n in SIDECAR_FILES if (model.parent / n).is_file()]
    return files + [pathlib.Path(o) for o in others if o]


def cmd_optimize(args) -> int:
    import json
    from .pipeline import SIDECAR_FILES, optimize
    from .publish import check_outputs, write_text
    settings = settings_from(args)
    model = _model(args.model)
    tokenizer = [f for n in SIDECAR_FILES if (f := pathlib.Path(args.tokenizer) / n).is_file()] if args.tokenizer else []
    check_outputs(_outputs(args, model), _inputs(model, args.calib_data, *tokenizer))  # before any work
    report = optimize(model, args.output, settings)
    for line in report.summaries:
        print(f"  {line}")
    for phase in report.phases:
        print(f"  phase {phase.name:<10} {phase.seconds:7.1f} s, peak RSS {phase.peak_rss_bytes / 2**20:8.0f} MiB "
              f"in the phase, {phase.process_peak_rss_bytes / 2**20:8.0f} MiB so far")
    size = sum(p.stat().st_size for p in (pathlib.Path(args.output), pathlib.Path(args.output + ".data"))
               if p.is_file())
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB) in {report.seconds:.1f} s, peak RSS "
          f"{report.peak_rss_bytes / 2**20:.0f} MiB (the process's maximum resident set size)")
    if args.report is not None:
        write_text(args.report, json.dumps(report.to_json(), indent=1))
    return 0


def _describe_output(path: pathlib.Path, model) -> bool:
    """Print what a perq-onnx output is (its metadata: target, options; the ops it uses); False
    when the model is not one."""
    import collections
    import json
    meta = {p.key: p.value for p in model.metadata_props}
    if "perq.target" not in meta:
        return False
    print(f"{path}: a perq-onnx output, target {meta['perq.target']}")
    try:
        options = json.loads(meta.get("perq.options", "{}"))
    except ValueError:
        options = {}
    if options:
        print("options: " + ", ".join(f"{k}={v}" for k, v in options.items() if v is not None))
    ops = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)
    shown = {k: n for k, n in ops.items() if k[0] != "ai.onnx" or "quant" in k[1].lower() or "MatMul" in k[1]}
    print(f"{len(model.graph.node)} nodes; quantization, matmul and non-standard ops: "
          + ", ".join(f"{op} x{n}" if d == "ai.onnx" else f"{d}.{op} x{n}"
                      for (d, op), n in sorted(shown.items(), key=lambda kv: (-kv[1], kv[0]))))
    if model.functions:
        print("model-local functions: " + ", ".join(sorted({f"{f.domain}.{f.name}" for f in model.functions})))
    if "perq.ort.session_config" in meta:
        print(f"onnxruntime session settings: {meta['perq.ort.session_config']}")
    return True


def cmd_inspect(args) -> int:
    from .analysis import AnalysisError, analyze
    from .graph import load_graph
    from .inputs import check_model, load_skeleton
    path = _model(args.model)
    skeleton = load_skeleton(path)
    check_model(path, skeleton)
    output = _describe_output(path, skeleton)
    del skeleton
    try:
        structure = analyze(load_graph(path))
    except (AnalysisError, PerqError) as exc:
        reason = f"at node '{exc.node}': {exc.reason}" if isinstance(exc, AnalysisError) else str(exc)
        if output:  # rewritten and lowered: its structure is the target's, not a source decoder's
            print(f"decoder structure: not analysed (already rewritten for its target): {reason}")
            return 0
        if not isinstance(exc, AnalysisError):
            raise
        from .analysis import refusals
        found = refusals(load_graph(path)) or [exc]
        for r in found:  # every reason the analysis finds, not only the first
            print(f"{path}: refused " + (f"at node '{r.node}': {r.reason}" if isinstance(r, AnalysisError) else str(r)))
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
        print(f"no residual region (R1 is not exact; quantized activations get the online residual rotation "
              f"instead): {s.residual_blocker}")
    if args.grid:
        from .shapes import constant_value
        from .weight_grid import grid_report
        graph = load_graph(path)
        nodes = {n.name: n for n in graph.nodes}
        weights = (constant_value(nodes[lin.name].inputs[1]) for layer in s.layers for lin in layer.linears().values())
        print(f"weights: {grid_report(w for w in weights if w is not None)}")
    return 0


def _at_least(option: str, value, low: int) -> None:
    if value is not None and value < low:
        raise PerqError(f"{option} {value}: must be at least {low}")


def _is_perq_output(path) -> bool:
    from .inputs import load_skeleton
    return any(p.key == "perq.target" for p in load_skeleton(path).metadata_props)


def cmd_eval(args) -> int:
    from .calibration import load_tokenizer, tokenize_file, windows
    from .evaluate import perplexity
    _at_least("--seq-len", args.seq_len, 2)  # one prediction needs two tokens
    _at_least("--max-windows", args.max_windows, 1)
    _at_least("--skip-windows", args.skip_windows, 0)
    path = _model(args.model)
    _inputs(path)
    reference = _model(args.reference) if args.reference else None
    if reference is not None:
        _inputs(reference)
    tokenizer = load_tokenizer(args.tokenizer or path.parent)
    tokens = tokenize_file(args.text, tokenizer)[args.skip_windows * args.seq_len:]
    wins = windows(tokens, args.seq_len, args.max_windows, f"{args.text} after {args.skip_windows} windows"
                   if args.skip_windows else str(args.text))
    result = perplexity(path, wins, args.threads)
    print(f"perplexity {result.ppl:.4f} over {result.tokens} predicted tokens "
          f"({result.windows} windows x {args.seq_len}) in {result.seconds:.1f} s")
    if reference is not None:
        ref = perplexity(reference, wins, args.threads)
        if ref.vocab != result.vocab:
            raise PerqError(f"--reference {reference}: a vocabulary of {ref.vocab}, {path} has {result.vocab}; "
                            "perplexities over different vocabularies do not compare")
        print(f"reference perplexity {ref.ppl:.4f} ({reference}, the same windows): "
              f"{result.ppl / ref.ppl:.3f}x the reference")
    elif _is_perq_output(path):
        print("(no float baseline: give --reference FLOAT_MODEL to print its perplexity on the same windows)")
    return 0


def _has_tokenizer(directory: pathlib.Path) -> bool:
    return any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _verify_ids(args, a: pathlib.Path):
    """The token ids verify compares on, and a line saying what they are: windows of --text;
    else, with a tokenizer (--tokenizer or beside model a), windows of a built-in English sample;
    else (or with --random-tokens) random ids."""
    from .calibration import load_tokenizer, tokenize_file, tokenize_text, windows
    from .evaluate import SAMPLE_TEXT
    tok_dir = pathlib.Path(args.tokenizer) if args.tokenizer else a.parent
    if args.text:
        tokens = tokenize_file(args.text, load_tokenizer(tok_dir))
        ids = windows(tokens, args.seq_len, args.batch, str(args.text))
        return ids, f"{len(ids)} windows x {args.seq_len} tokens of {args.text}"
    if args.random_tokens or not (args.tokenizer or _has_tokenizer(tok_dir)):
        why = "as asked" if args.random_tokens else f"no tokenizer in {tok_dir}; --text FILE compares on text"
        return None, f"{args.batch} x {args.seq_len} random token ids ({why})"
    tokens = tokenize_text(SAMPLE_TEXT, load_tokenizer(tok_dir), "the built-in sample text")
    if len(tokens) < args.seq_len:
        return None, (f"{args.batch} x {args.seq_len} random token ids (the built-in sample text has only "
                      f"{len(tokens)} tokens; --text FILE compares on your text)")
    ids = windows(tokens, args.seq_len, args.batch, "the built-in sample text")
    return ids, (f"{len(ids)} windows x {args.seq_len} tokens of the built-in English sample text "
                 f"(tokenizer in {tok_dir}; --text FILE for your own, --random-tokens for random ids)")


def cmd_verify(args) -> int:
    from .evaluate import compare_logits
    _at_least("--batch", args.batch, 1)
    _at_least("--seq-len", args.seq_len, 1)
    a, b = _model(args.a), _model(args.b)
    _inputs(a), _inputs(b)
    ids, source = _verify_ids(args, a)
    d = compare_logits(a, b, args.batch, args.seq_len, args.seed, args.threads, ids)
    print(f"compared on {source}")
    print(f"top-1 agreement {d.top1:.2%}, KL(a||b) {d.kl:.4f} nats/token, logit cosine {d.cosine:.5f}")
    if args.tolerance is None:
        return 0
    ok = d.relative <= args.tolerance
    print(f"max |logit difference| {d.max_abs:.3e}, relative {d.relative:.3e} "
          f"({'within' if ok else 'ABOVE'} tolerance {args.tolerance:g})")
    return 0 if ok else 1


def cmd_check(args) -> int:
    from .check import check_tensorrt, summary
    from .inputs import check_model
    path = _model(args.model)
    check_model(path)
    violations = check_tensorrt(path)
    print(summary(violations))
    return 1 if violations else 0


def cmd_generate(args) -> int:
    from .generate import stream
    stream(args.model, args.prompt, args.max_new_tokens, args.chat, threads=args.threads)
    return 0


def cmd_build_ops(args) -> int:
    from .ops import build_library
    print(f"built {build_library(verbose=True)}")
    return 0


def parser() -> argparse.ArgumentParser:
    from .settings import Clip, Embedding, Kernel, NumberFormat, Permute, ResidualRotation, Rounding, TargetName
    p = argparse.ArgumentParser(prog="perq-onnx", description="PeRQ low-bit quantization of ONNX decoder LLMs")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="rotate, permute and quantize a model")
    o.add_argument("model", help="ONNX file, or the recipe name 'smollm2'")
    o.add_argument("-o", "--output", required=True, help="output ONNX file (written atomically)")
    o.add_argument("--block", help="online rotation at down_proj: block size (power of two), 'full' "
                                   "(full-vector) or 'none' (default: the --format's scale block, else 16; the genai target's "
                                   "MatMulNBits folder: none)")
    o.add_argument("--permute", default="massdiff", choices=Permute.values())
    o.add_argument("--residual-rotation", choices=ResidualRotation.values(),
                   help="R1: default full where it is exact; on post-norm models (Gemma 2/3, OLMo2), where it is "
                        "not, online (a block Hadamard at each pre-norm's output, folded into q/k/v and gate/up) "
                        "when activations are quantized, else none; an explicit full/block on those is an error")
    o.add_argument("--residual-block", type=int,
                   help="block size of --residual-rotation block or online (default --block)")
    heads = o.add_mutually_exclusive_group()
    heads.add_argument("--no-head-rotation", action="store_true", help="skip the per-head v/o rotation (R2)")
    heads.add_argument("--head-rotation", action="store_true",
                       help="apply R2 also with --format nvfp4/mxfp4 (default there: off)")
    o.add_argument("--no-quant", action="store_true", help="emit the rotated and permuted float model")
    o.add_argument("--w-bits", type=int, default=4, choices=[4, 8, 16])
    o.add_argument("--w-group", type=int, help="weight scales per group of this many input rows (default: per "
                                                "output channel for simulate, 32 for ort, 64 for genai, 128 for "
                                                "tensorrt; the largest of the target's that divides every "
                                                "linear's input)")
    o.add_argument("--w-asymmetric", action="store_true",
                   help="INT weights with a zero point per scale (uint4 codes; ort, genai and simulate; default symmetric)")
    o.add_argument("--float-embeddings", action="store_true",
                   help="keep the embedding and lm_head float (ort and tensorrt quantize them by default)")
    o.add_argument("--embedding", choices=Embedding.values(),
                   help="the quantized embedding: int4 (its own INT4 blocks; genai's default for an untied model), "
                        "int8 (one scale per token; ort's), tied (gathered from lm_head's INT4 codes, one table for "
                        "both; genai's default where the model ties them)")
    o.add_argument("--kernel", choices=Kernel.values(),
                   help="genai: how the INT4 decoder weights are multiplied: nbits (MatMulNBits; the default), "
                        "int8 (widened to INT8 when the model loads; int8 activations, one scale per call, per "
                        "token at down_proj; lm_head stays MatMulNBits: faster prompts where MatMulNBits has no "
                        "int8 kernel, e.g. x86 without AVX2; decode reads twice the bytes; the file stays INT4) or "
                        "int8-prompt (both graphs on one weight file: int8 for prompts, nbits for each generated "
                        "token; the INT8 copy costs memory, not file size)")
    o.add_argument("--rounding", choices=Rounding.values(),
                   help="weight rounding: round-to-nearest or GPTQ with Hessians from calibration data "
                        "(default: rtn for simulate, gptq for ort and tensorrt)")
    o.add_argument("--w-clip", choices=Clip.values(),
                   help="weight scale rule: mse (weight error), absmax, act (output error, calibration data; "
                        "default: mse for simulate, act for ort and tensorrt)")
    o.add_argument("--a-bits", type=int, choices=[4, 8, 16],
                   help="activation bits (default: 4 for simulate; ort leaves activations to onnxruntime)")
    o.add_argument("--a-symmetric", action="store_true", help="symmetric activation quantization (default asymmetric)")
    o.add_argument("--a-clip", type=float, default=1.0,
                   help="INT activations: each token's quantization range as a fraction of its extremes (default 1)")
    o.add_argument("--format", default="int", choices=NumberFormat.values(),
                   help="4-bit number format of weights and activations: int (--w-bits/--a-bits), or microscaling "
                        "FP4: nvfp4 (E2M1, E4M3 scale per 16, fp32 tensor scale) or mxfp4 (E2M1, E8M0 scale per 32)")
    o.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ damping, a fraction of mean(diag H) (default 0.01)")
    o.add_argument("--gptq-block", type=int, default=128, help="GPTQ lazy-update block in rows (default 128)")
    o.add_argument("--gptq-no-act-order", action="store_true", help="GPTQ in natural row order (default: act order)")
    target_fit = o.add_mutually_exclusive_group()
    target_fit.add_argument("--float-target", action="store_true", default=None,
                            help="simulate W4A4: each weight is refitted toward the float model's output from its "
                                 "quantized input, then rounded (RTN or GPTQ), so that the weights also compensate "
                                 "the activation quantization's error (default for INT weights and activations)")
    target_fit.add_argument("--no-float-target", dest="float_target", action="store_false",
                            help="round the weights themselves (the paper's recipe)")
    o.add_argument("--fused-ops", action="store_true", help="emit perq.BlockHadamardQuantize, or perq.BlockHadamardQuantizeFP4 with --format "
                   "nvfp4/mxfp4 (rotation + activation QDQ at down_proj)")
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
    i.add_argument("--grid", action="store_true", help="also measure how much of the decoder weights sit on a "
                                                       "4-bit block grid (a model dequantized from a GGUF file)")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="perplexity on a text file (non-overlapping windows)")
    e.add_argument("model")
    e.add_argument("text")
    e.add_argument("--tokenizer")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-windows", type=int)
    e.add_argument("--skip-windows", type=int, default=0,
                   help="start after this many windows (e.g. those a --calib-data run read from the same file)")
    e.add_argument("--reference", help="also the perplexity of this model (e.g. the float model the evaluated one "
                                       "was made from) on the same windows")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("verify", help="compare two models' logits on the same tokens (text when there is a "
                                      "tokenizer, else random)")
    v.add_argument("a")
    v.add_argument("b")
    v.add_argument("--tolerance", type=float,
                   help="fail (exit 1) when max |logit difference| / max |logit| exceeds this (exact rewrites: 1e-4)")
    v.add_argument("--text", help="compare on windows of this text file (default: a built-in English sample "
                                  "when a tokenizer is found, else random tokens)")
    v.add_argument("--tokenizer", help="tokenizer directory (default: model a's directory)")
    v.add_argument("--random-tokens", action="store_true", help="compare on random token ids")
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--seq-len", type=int, default=16)
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=cmd_verify)

    c = sub.add_parser("check", help="check a model against a deployment target's documented constraints")
    c.add_argument("model")
    c.add_argument("--target", default="tensorrt", choices=["tensorrt"])
    c.set_defaults(func=cmd_check)

    g = sub.add_parser("generate", help="stream a greedy completion from a --target genai folder (onnxruntime-genai)")
    g.add_argument("model", help="the folder (or its model.onnx) written by --target genai")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("build-ops", help="build the BlockHadamard custom-op library (CPU, CUDA if nvcc)")
    b.set_defaults(func=cmd_build_ops)
    return p


class _Tolerant:
    """A text stream that never fails the run: once its reader is gone (EPIPE) or the stream is
    closed, what is written is dropped (the file descriptor then points at /dev/null, so that
    the interpreter's final flush is quiet too)."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        self._stream = open(os.devnull, "w")

    def write(self, text):
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # EPIPE, EBADF, write to a closed file
            self._gone()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self._gone()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _robust_streams():
    """Standard streams that cannot end the run: descriptors 0-2 open (a closed one is opened on
    /dev/null first, so no file the run opens takes its number and receives log lines), and
    stdout/stderr wrapped in _Tolerant."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.close(opened)
    saved = sys.stdout, sys.stderr
    sys.stdout = _Tolerant(sys.stdout or open(os.devnull, "w"))
    sys.stderr = _Tolerant(sys.stderr or open(os.devnull, "w"))
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def _signals_unwind():
    """Every terminating signal unwinds like Ctrl-C (publish.Interrupted) while a command runs;
    the previous handlers come back afterwards (embedded use)."""
    import signal
    from .publish import TERMINATING, install_handlers
    saved = {}
    for sig in TERMINATING:
        with contextlib.suppress(ValueError, OSError):
            saved[sig] = signal.getsignal(sig)
    install_handlers()
    try:
        yield
    finally:
        for sig, handler in saved.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)


def main(argv=None) -> int:
    with _robust_streams():
        args = parser().parse_args(argv)
        with _signals_unwind():
            return _run(args)


def _run(args) -> int:
    from .publish import Interrupted
    try:
        if args.threads is not None:
            from .runtime import check_threads
            check_threads(args.threads)
        return args.func(args)
    except PerqError as exc:
        print(f"perq-onnx: error: {exc}", file=sys.stderr)
        return 2
    except InternalError as exc:
        if os.environ.get("PERQ_DEBUG"):
            raise
        print(f"perq-onnx: internal error (a bug in perq-onnx): {exc}", file=sys.stderr)
        return 3
    except Interrupted as exc:
        print(f"perq-onnx: interrupted ({exc.name}); no partial output left behind", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("perq-onnx: interrupted; no partial output left behind", file=sys.stderr)
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
