"""The PeRQ compiler, top to bottom:

    load       the graph, weights left on disk (weights.py)
    analyze    decoder structure and permutation-equivariant regions (analysis.py)
    calibrate  channel statistics of the input model, when a permutation needs them (calibration.py)
    plan       every rotation and permutation, validated against the structure (plan.py)
    apply      the float rewrites as passes with checked contracts (passes/):
               fold gammas -> R1 residual (or the online residual rotation) -> R2 heads
               -> P3 MLP permutation -> R3 online rotation
    lower      the target's quantization passes and op form (targets/: one file per target)
    save       streamed to a staging directory, checked (onnx.checker, onnxruntime), renamed
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from . import calibration, publish, rotation_choice
from .analysis import DecoderStructure, analyze
from .calibration import Calibrator
from .errors import InternalError, PerqError
from .graph import check_model_file, load_graph
from .passes.base import Context, Pass, PassManager
from .passes.fold_norm_gammas import FoldNormGammas
from .passes.online_rotation import InsertOnlineRotation
from .passes.permute_mlp import PermuteMLP
from .passes.permute_residual import PermuteResidual
from .passes.rotate_heads import RotateHeads
from .passes.rotate_residual import RotateResidual
from .passes.rotate_residual_online import RotateResidualOnline
from .passes.tie_lm_head import is_tied
from .plan import ModelShape, Plan, check_blocks, make_plan
from .runtime import session
from .settings import Embedding, Kernel, NumberFormat, OnlineRotation, ResidualRotation, Rounding, Settings, TargetName
from .targets import Target, target
from .weights import WeightStore, input_files


@dataclass
class Phase:
    name: str
    seconds: float
    peak_rss_bytes: int            # this phase's peak resident set size (sampled, see _RssSampler)
    process_peak_rss_bytes: int    # the process's peak so far (VmHWM: /usr/bin/time's max RSS at exit)


@dataclass
class Report:
    summaries: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    permutations: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    seconds: float = 0.0

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase and record its peak resident memory (sampled while it runs) and the
        process's peak so far. The kernel's high-water mark is never reset: resetting it
        (/proc/self/clear_refs) would also reset what /usr/bin/time and getrusage report."""
        sampler, before = _RssSampler(), _peak_rss()
        start = time.perf_counter()
        try:
            yield
        finally:
            peak = sampler.stop()
        after = max(_peak_rss(), peak)  # the kernel's counters can lag the sampled RSS by a few pages
        if after > before:  # the process's high-water mark was set in this phase: exact
            peak = max(peak, after)
        self.phases.append(Phase(name, time.perf_counter() - start, peak, after))

    @property
    def peak_rss_bytes(self) -> int:
        """The process's peak resident set size (what /usr/bin/time reports as max RSS)."""
        return max([p.process_peak_rss_bytes for p in self.phases] or [_peak_rss()])

    def to_json(self) -> dict:
        return {"summaries": self.summaries, "seconds": self.seconds, "peak_rss_bytes": self.peak_rss_bytes,
                "phases": [vars(p) for p in self.phases],
                "permutations": {k: v.tolist() for k, v in self.permutations.items()},
                "metrics": self.metrics}


def _current_rss() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def _peak_rss() -> int:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler:
    """The peak resident set size over a phase, from /proc/self/statm read every `interval`
    seconds by a daemon thread (a spike shorter than that, or inside a C call that holds the
    GIL, can be missed; Report.phase takes the kernel's mark when the phase raised it)."""

    def __init__(self, interval: float = 0.01):
        import threading
        self.peak = _current_rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._done.wait(interval):
            self.peak = max(self.peak, _current_rss())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss())
        return self.peak


# ----------------------------------------------------------------------------------- stages

def float_passes(plan: Plan) -> list[Pass]:
    """The function-preserving rewrites the plan asks for, in their required order."""
    passes: list[Pass] = []
    if plan.residual is not None:
        passes += [FoldNormGammas(), RotateResidual(plan.residual, plan.residual_description)]
    if plan.residual_permutation is not None:
        passes.append(PermuteResidual(plan.residual_permutation, str(plan.settings.rotation.permute)))
    if plan.residual_online is not None:
        passes.append(RotateResidualOnline(plan.residual_online, plan.residual_online_block))
    if plan.heads is not None:
        passes.append(RotateHeads(plan.heads))
    if plan.mlp_permutations:
        passes.append(PermuteMLP(plan.mlp_permutations, str(plan.settings.rotation.permute)))
    if plan.online is not None:
        passes.append(InsertOnlineRotation(plan.online, plan.online_block))
    return passes


def _note(report: Report, note: str) -> None:
    print(f"perq-onnx: {note}")
    report.summaries.append(note)


def _fit_rotations(settings: Settings, structure: DecoderStructure, report: Report) -> Settings:
    """Resolve unset R1/R2. With NVFP4 activations both default to off: its fine E4M3-scaled
    blocks of 16 already isolate an outlier, and a full (or per-head) rotation spreads a massive
    activation over every block instead; the online block rotation, aligned with the format's
    blocks, stays. MXFP4's power-of-two scales over 32 values gain from all three rotations. Chosen
    on held-out valid windows (benchmarks/fp4.py --choose, results/fp4_choice.json). MXFP4's R1
    defaults to the online residual rotation (no gamma fold into the weights; chosen on valid
    windows at W4A4 + GPTQ, see below), and so does weight-only GPTQ on the simulate and ort
    targets (`_weight_only_gptq`). Then `_fit_residual_rotation`."""
    fp4 = settings.activations_quantized and settings.activations.format is NumberFormat.NVFP4
    off = {}
    if fp4 and settings.rotation.residual is None:
        off["residual_rotation"] = ResidualRotation.NONE
    if fp4 and settings.rotation.heads is None:
        off["head_rotation"] = False
    mx = settings.activations_quantized and settings.activations.format is NumberFormat.MXFP4
    if mx and settings.rotation.residual is None:
        # the online residual rotation leaves the gammas unfolded: W4A4 PeRQ + GPTQ on SmolLM2's
        # held-out valid windows 16-31 (calibration 0-15) 31.10 with the full R1, 24.09 online
        settings = settings.replace(residual_rotation=ResidualRotation.ONLINE)
        _note(report, "--format mxfp4: residual rotation online by default (block Hadamards at the residual's "
                      "readers; --residual-rotation full gives the folded R1)")
    if (_weight_only_gptq(settings) and settings.rotation.residual is None and settings.rotation.residual_block_size
            and structure.residual_blocker is None):  # post-norm models: measured at W4A4 only, R1 skipped here
        # no gamma fold into the weights: weight-only GPTQ on SmolLM2's held-out valid windows 32-47
        # (calibration 0-31), no rotation / full R1 / online R1: 26.73 / 25.26 / 24.71 per channel,
        # 25.17 / 24.74 / 24.12 at block 128, 24.40 / 24.59 / 24.04 at block 64
        settings = settings.replace(residual_rotation=ResidualRotation.ONLINE)
        _note(report, "weight-only GPTQ: residual rotation online by default (block Hadamards at the residual's "
                      "readers, gammas unfolded; --residual-rotation full gives the folded R1)")
    if settings.target is TargetName.GENAI and settings.kernel is Kernel.NBITS and not settings.rotation.online.given \
            and settings.rotation.online.block is not None:
        # SmolLM2, benchmarks/deploy.py: in front of MatMulNBits the online rotation (a Reshape +
        # MatMul + Reshape per layer and token) bought, at blocks of 32, a test ppl of 26.756 vs
        # 26.755 (valid windows 32-47: 24.63 with it, 24.71 without) for og decode 105.1 vs 108.1,
        # 96.2 vs 100.8 and 109.2 vs 109.0 tok/s in three runs; at the default 64, 26.81 vs 26.79
        # for 97.4 vs 102.3 tok/s (perq-genai-R3). The INT8 kernels keep it: it spreads the
        # outliers of down_proj's input before its per-token int8 quantization
        settings = settings.replace(block=OnlineRotation(None, False, given=False))
        _note(report, "genai: no online block rotation (R3) in front of MatMulNBits by default (it costs decode "
                      "for no measured gain); --block 16 keeps it")
    if off:
        settings = settings.replace(**off)
        names = " and ".join(name for key, name in (("residual_rotation", "R1"), ("head_rotation", "R2")) if key in off)
        _note(report, f"--format {settings.activations.format}: {names} off by default (a full rotation spreads massive "
                      "activations over every one of its fine scale blocks); the online rotation stays at the "
                      "format's block (--residual-rotation full / --head-rotation turn them on)")
    return _fit_residual_rotation(settings, structure, report)


def _weight_only_gptq(settings: Settings) -> bool:
    """Weights quantized by GPTQ, activations float, on a target whose graph takes an online
    residual rotation (simulate, ort; not genai's fused decoder, not TensorRT's INT4 form)."""
    return (settings.weights_quantized and not settings.activations_quantized
            and settings.weights.rounding is Rounding.GPTQ and settings.target in (TargetName.SIMULATE, TargetName.ORT))


def _fit_residual_rotation(settings: Settings, structure: DecoderStructure, report: Report) -> Settings:
    """Resolve an unset residual rotation: full where R1 is exact; where the structure says it is
    not (output norms with per-channel gammas: Gemma 2/3, OLMo2; see post_norms.py), the online
    residual rotation (passes/rotate_residual_online.py) when activations are quantized and an
    online block (or full) rotation is asked for, else none; either with one line in the report
    (R2, P3 and R3 still apply). An explicit full/block there is a PerqError; an explicit online
    applies to any model, but not to the genai target (its decoder has no rotation at q/k/v)."""
    blocker, asked, r = structure.residual_blocker, settings.rotation.residual, settings.rotation
    if asked is ResidualRotation.ONLINE and settings.target is TargetName.GENAI:
        raise PerqError("--residual-rotation online: the genai target's decoder has no online rotation in front "
                        "of q/k/v and gate/up; use --target simulate, ort or tensorrt")
    if blocker is None or asked in (ResidualRotation.NONE, ResidualRotation.ONLINE):
        return settings.replace(residual_rotation=r.residual_or_full)
    if asked is not None:
        raise PerqError(f"--residual-rotation {asked}: R1 would not be exact on this model: {blocker} "
                        "(leave --residual-rotation unset, or give 'online' or 'none')")
    rotation = (f"block Hadamard b={r.residual_block_size}" if r.residual_block_size
                else f"full Hadamard of {structure.hidden_size}" if r.online.full else None)
    if settings.activations_quantized and rotation and settings.target is not TargetName.GENAI:
        _note(report, f"residual rotation online (R1 would not be exact: {blocker}): {rotation} at each "
                      "pre-norm's output, its transpose folded into q/k/v and gate/up; the residual stream "
                      "stays unrotated")
        return settings.replace(residual_rotation=ResidualRotation.ONLINE)
    _note(report, f"residual rotation skipped (R1 would not be exact): {blocker}")
    return settings.replace(residual_rotation=ResidualRotation.NONE)


def calibration_batches(model_path, settings: Settings, vocab: int | None = None) -> np.ndarray:
    """Token windows for calibration: from --calib-data, else sampled by the model itself."""
    c = settings.calibration
    if c.data:
        tok_dir = c.tokenizer or pathlib.Path(model_path).parent
        tokenizer = calibration.load_tokenizer(tok_dir)
        tokens = calibration.tokenize_file(c.data, tokenizer)
        if vocab is not None:
            calibration.check_ids(tokens, vocab, f"tokenizer in {tok_dir} on {c.data}",
                                  tokenizer_vocab=len(tokenizer))
        return calibration.windows(tokens, c.seq_len or 512, c.samples or 32, "calibration text")
    print("perq-onnx: no --calib-data given: data-free calibration on sequences the model samples "
          f"itself (seed {settings.seed})")
    return calibration.generate(model_path, c.samples or 8, c.seq_len or 128, settings.seed, c.threads)


def stat_points(structure: DecoderStructure) -> dict[str, tuple[str, ...]]:
    """Region name -> the tensors whose mean |x| describe it (the residual averages its points).
    Where R1 is not exact, 'residual_readers': what q/k/v and gate/up read (the pre-norms' outputs,
    gamma applied), for the online residual rotation's permutation."""
    points = {r.name: r.stats for r in structure.regions() if r.kind in ("residual", "mlp")}
    if structure.residual_blocker is not None:
        points["residual_readers"] = tuple(norm.readers[0].input for layer in structure.layers
                                           for norm in (layer.input_norm, layer.mlp_norm))
    return points


def collect_stats(ctx: Context) -> dict[str, np.ndarray]:
    """Mean |x| per channel of each region ('residual': averaged over the layers' norm outputs)."""
    points = stat_points(ctx.structure)
    means = ctx.collect({t: "mean_abs" for ts in points.values() for t in ts})
    return {region: np.mean([means[t] for t in ts], axis=0) for region, ts in points.items()}


def calibrate(model_path, batches: np.ndarray, threads: int | None = None, progress: bool = True) -> dict:
    """Region statistics of the unmodified model at model_path (to share one calibration
    between several optimize() calls)."""
    graph = load_graph(model_path)
    with tempfile.TemporaryDirectory(prefix="perq-calibrate-") as tmp:
        ctx = Context(graph, analyze(graph), WeightStore(pathlib.Path(tmp)),
                      calibrator=Calibrator(batches, threads, progress))
        return collect_stats(ctx)


SIDECAR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def _copy_sidecar_files(src: pathlib.Path, dst: pathlib.Path, staging: pathlib.Path) -> list[tuple]:
    """(staged copy, destination) of the tokenizer and config files next to the input model,
    when the output's directory has none of its own (so `perq-onnx eval OUT` finds them)."""
    if src.resolve() == dst.resolve() or any((dst / name).exists() for name in SIDECAR_FILES):
        return []
    moves = []
    for name in SIDECAR_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, staging / name)
            moves.append((staging / name, dst / name))
    return moves


def _check_paths(model_path: pathlib.Path, output_path: pathlib.Path, graph) -> None:
    publish.check_outputs([publish.Output.model(output_path)], [model_path, *sorted(input_files(graph))])


def verify_written(path: pathlib.Path, tgt: Target, settings: Settings) -> None:
    """The written model passes onnx.checker (full check), its target's own checker, and loads
    in onnxruntime (with the session settings its target deploys it with) where onnxruntime can
    run the target's form."""
    try:
        check_model_file(path)  # onnx.checker, full; onnxruntime's own ops as a custom domain
    except Exception as exc:  # checker raises several types
        raise InternalError(f"the output fails onnx.checker: {str(exc).splitlines()[0]}") from None
    violations = tgt.check_output(path)
    if violations:
        v = violations[0]
        raise InternalError(f"the {tgt.name} output breaks its target's rule [{v.rule}] at node '{v.node}': "
                            f"{v.reason} ({len(violations)} violation(s))")
    if tgt.runs_in_onnxruntime(settings):
        session(path, config=tgt.session_config())


def optimize(model_path, output_path, settings: Settings, stats: dict | None = None, progress: bool = True,
             batches: np.ndarray | None = None) -> Report:
    """Run PeRQ on model_path and write output_path. `stats` (from calibrate) skips calibration,
    e.g. when one calibration serves many configurations; `batches` replaces the calibration
    windows that settings describe. File system failures (read-only, full, size limits) are user
    errors naming the output; nothing is left behind."""
    try:
        return _optimize(model_path, output_path, settings, stats, progress, batches)
    except OSError as exc:
        where = exc.filename or output_path
        raise PerqError(f"{where}: {exc.strerror or exc}") from None


def _optimize(model_path, output_path, settings, stats, progress, batches) -> Report:
    start = time.perf_counter()
    tgt = target(settings)
    model_path, output_path = pathlib.Path(model_path), pathlib.Path(output_path)
    if not model_path.is_file():
        raise PerqError(f"{model_path}: no such file")
    report = Report()
    with report.phase("load"):
        graph = load_graph(model_path)
    _check_paths(model_path, output_path, graph)
    with report.phase("analyze"):
        structure = analyze(graph)
    linears = [lin for layer in structure.layers for lin in layer.linears().values()] + [structure.lm_head]
    tied = (Embedding.TIED in tgt.embeddings and settings.embedding is None and settings.quantize
            and not settings.float_embeddings and is_tied(graph, structure))
    given_group, settings = settings.weights.group, tgt.resolve(settings, {lin.name: lin.in_features for lin in linears}, tied)
    if given_group is None and len(tgt.default_w_groups) > 1 and settings.weights.group is not None:
        _note(report, f"{tgt.name}: INT{settings.weights.bits} blocks of {settings.weights.group} (the largest of "
                      f"{'/'.join(map(str, tgt.default_w_groups))} that divides every linear's input; --w-group chooses)")
    tgt.check_model(model_path.parent, structure, graph)
    asked, settings = settings, _fit_rotations(settings, structure, report)
    check_blocks(settings, ModelShape.of(structure))  # before the calibration make_plan needs
    choose = rotation_choice.applies(asked, settings)  # weight-only: do the rotations pay? (measured)
    with publish.staging(output_path.parent) as tmp:
        ctx = Context(graph, structure, WeightStore(pathlib.Path(tmp)))
        if settings.needs_calibration(stats is not None) or tgt.needs_calibration(settings) or choose:
            with report.phase("calibrate"):
                if batches is None:
                    batches = calibration_batches(model_path, settings, structure.vocab_size)
                ctx.calibrator = Calibrator(batches, settings.calibration.threads, progress)
                if stats is None and settings.needs_statistics:
                    stats = collect_stats(ctx)
        report.stats = stats or {}
        if choose:
            with report.phase("choose rotations"):
                settings, lines = rotation_choice.choose_rotations(
                    ctx, asked, settings, tgt.weight_form(settings), make_plan(settings, ModelShape.of(structure), stats),
                    progress)
                for line in lines:
                    _note(report, line)
        with report.phase("plan"):
            plan = make_plan(settings, ModelShape.of(structure), stats)
            report.permutations = plan.permutations
        with report.phase("apply"):
            results = PassManager(float_passes(plan), progress).run(ctx)
        with report.phase("lower"):
            results += tgt.lower(ctx, settings, progress)
        for p, result in results:
            report.summaries.append(f"{p.name}: {result.summary}")
            report.metrics.update(result.metrics)
        with report.phase("save"):
            ctx.metadata["perq.options"] = json.dumps(settings.to_json())
            ctx.metadata["perq.target"] = tgt.name
            staged = pathlib.Path(tmp) / "out" / output_path.name
            staged.parent.mkdir()
            files = tgt.write(ctx, staged, model_path.parent, settings)
            for written_model in (f for f in files if f.suffix == ".onnx"):  # a genai folder may hold two graphs
                verify_written(written_model, tgt, settings)
            written = {f.name for f in files}
            moves = [m for m in _copy_sidecar_files(model_path.parent, output_path.parent, staged.parent)
                     if m[0].name not in written]
            moves += [(f, output_path.parent / f.name) for f in files[1:]] + [(files[0], output_path)]
            publish.move(moves)  # sidecars and external data first, the model file last
    report.seconds = time.perf_counter() - start
    return report
