"""The PeRQ pipeline: analyse, calibrate, then run the graph passes in order.

    load -> analyse (regions) -> calibrate (channel |x| means, original model)
         -> fold gammas -> R1 residual rotation -> R2 head rotation
         -> P3 MLP permutation -> R3 online rotation -> INT weights -> INT activations -> save
"""
from __future__ import annotations

import json
import pathlib
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from . import calibration, permutation
from .analysis import DecoderStructure, analyze
from .errors import PerqError
from .graph import export_model, import_graph, load_model, save_model
from .hadamard import block_diagonal, hadamard, orthogonal
from .passes.base import Context
from .passes.fold_norm_gammas import FoldNormGammas
from .passes.online_rotation import InsertOnlineRotation
from .passes.permute_mlp import PermuteMLP
from .passes.quantize_activations import QuantizeActivations
from .passes.quantize_weights import QuantizeWeights
from .passes.rotate_heads import RotateHeads
from .passes.rotate_residual import RotateResidual


@dataclass
class Options:
    block: str = "16"                 # power of two | "full" | "none"
    permute: str = "massdiff"         # massdiff | zigzag | random | none
    residual_rotation: str = "full"   # full | block | none
    residual_block: int | None = None  # block size of a block residual rotation (default: --block)
    head_rotation: bool = True
    quantize: bool = True
    w_bits: int = 4
    w_group: int | None = None
    a_bits: int = 4
    a_symmetric: bool = False
    fused_ops: bool = False
    random_orthogonal: bool = False   # seeded random orthogonal where no Hadamard exists
    seed: int = 0
    calib_data: str | None = None
    tokenizer: str | None = None
    calib_samples: int | None = None  # default: 32 from text, 8 data-free
    seq_len: int | None = None        # default: 512 from text, 128 data-free
    threads: int | None = None

    @property
    def block_size(self) -> int | None:
        return int(self.block) if self.block not in ("full", "none") else None


@dataclass
class Report:
    summaries: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    permutations: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0


def _validate(options: Options, s: DecoderStructure) -> None:
    if options.permute not in permutation.METHODS:
        raise PerqError(f"--permute {options.permute}: choose from {', '.join(permutation.METHODS)}")
    if options.residual_rotation not in ("full", "block", "none"):
        raise PerqError(f"--residual-rotation {options.residual_rotation}: choose full, block or none")
    if options.block not in ("full", "none"):
        try:
            b = int(options.block)
        except ValueError:
            raise PerqError(f"--block {options.block}: give a power of two, 'full' or 'none'") from None
        if b < 2 or b > 1024 or b & (b - 1):
            raise PerqError(f"--block {b}: block sizes are powers of two from 2 to 1024 (or 'full', 'none')")
        if s.intermediate_size % b:
            raise PerqError(f"--block {b} does not divide the MLP intermediate size {s.intermediate_size} "
                            f"(node '{s.layers[0].down.name}')")
    if options.residual_rotation == "block":
        rb = residual_block(options)
        if s.hidden_size % rb:
            raise PerqError(f"residual block size {rb} does not divide the hidden size {s.hidden_size} "
                            f"(node '{s.lm_head.name}')")


def residual_block(options: Options) -> int:
    rb = options.residual_block or options.block_size
    if rb is None:
        raise PerqError("--residual-rotation block needs a block size: give --block N or --residual-block N")
    return rb


def _needs_stats(options: Options) -> bool:
    stats_methods = options.permute in ("massdiff", "zigzag")
    return stats_methods and (options.block_size is not None or options.residual_rotation == "block")


def calibration_batches(model, model_path, options: Options) -> np.ndarray:
    """Token windows for calibration: from --calib-data, else sampled by the model itself."""
    if options.calib_data:
        tok_dir = options.tokenizer or pathlib.Path(model_path).parent
        tokens = calibration.tokenize_file(options.calib_data, calibration.load_tokenizer(tok_dir))
        return calibration.windows(tokens, options.seq_len or 512, options.calib_samples or 32, "calibration text")
    print("perq-onnx: no --calib-data given: data-free calibration on sequences the model samples "
          f"itself (seed {options.seed})")
    return calibration.generate(model, options.calib_samples or 8, options.seq_len or 128, options.seed, options.threads)


def collect_stats(model, structure: DecoderStructure, batches: np.ndarray, threads=None) -> dict[str, np.ndarray]:
    """Channel means at every region's rotation point: 'residual' (mean over the layers' norm
    outputs) and 'layers.i.mlp' (down_proj input)."""
    residual = [n.normalized.name for layer in structure.layers for n in (layer.input_norm, layer.post_norm)]
    mlp = {f"layers.{layer.index}.mlp": layer.down.input.name for layer in structure.layers}
    means = calibration.channel_means(model, residual + list(mlp.values()), batches, threads)
    stats = {"residual": np.mean([means[t] for t in residual], axis=0)}
    stats.update({region: means[t] for region, t in mlp.items()})
    return stats


def build_passes(options: Options, structure: DecoderStructure, stats: dict | None, report: Report):
    seed = options.seed if options.random_orthogonal else None
    passes = []
    if options.residual_rotation != "none":
        d = structure.hidden_size
        if options.residual_rotation == "full":
            q, what = orthogonal(d, seed), f"full {d}"
        else:
            rb = residual_block(options)
            mass = stats["residual"] if stats else np.zeros(d)
            p = permutation.permutation(options.permute, mass, rb, options.seed)
            report.permutations["residual"] = p
            q, what = np.eye(d)[:, p] @ block_diagonal(hadamard(rb), d), f"{options.permute} + block {rb}"
        passes += [FoldNormGammas(), RotateResidual(q, what)]
    if options.head_rotation:
        passes.append(RotateHeads(seed))
    b = options.block_size
    if b is not None and options.permute != "none":
        perms = {}
        for layer in structure.layers:
            mass = stats[f"layers.{layer.index}.mlp"] if stats else np.zeros(layer.down.shape[0])
            perms[layer.index] = permutation.permutation(options.permute, mass, b, options.seed + layer.index)
        report.permutations.update({f"layers.{i}.mlp": p for i, p in perms.items()})
        passes.append(PermuteMLP(perms, options.permute))
    if options.block != "none":
        passes.append(InsertOnlineRotation(b, seed))
    if options.quantize and options.w_bits < 16:
        passes.append(QuantizeWeights(options.w_bits, options.w_group))
    if options.quantize and options.a_bits < 16:
        passes.append(QuantizeActivations(options.a_bits, options.a_symmetric, options.fused_ops))
    return passes


SIDECAR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def _copy_sidecar_files(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copy the tokenizer and config files that sit next to the input model (when the output's
    directory has none of its own) so that `perq-onnx eval OUT` finds the tokenizer."""
    if src.resolve() == dst.resolve() or any((dst / name).exists() for name in SIDECAR_FILES):
        return
    for name in SIDECAR_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def optimize(model_path, output_path, options: Options, stats: dict | None = None, progress: bool = True) -> Report:
    """Run PeRQ on model_path and write output_path. `stats` (from collect_stats) skips
    calibration, e.g. when one calibration serves many configurations."""
    start = time.perf_counter()
    model_path, output_path = pathlib.Path(model_path), pathlib.Path(output_path)
    if output_path.resolve() == model_path.resolve():
        raise PerqError("the output path is the input model; perq-onnx never overwrites its input")
    model = load_model(model_path)
    graph = import_graph(model)
    structure = analyze(graph)
    _validate(options, structure)
    report = Report()
    if stats is None and _needs_stats(options):
        stats = collect_stats(model, structure, calibration_batches(model, model_path, options), options.threads)
    report.stats = stats or {}
    ctx = Context(graph, structure)
    passes = build_passes(options, structure, stats, report)
    for p in tqdm(passes, desc="passes", unit="pass", leave=False, disable=not progress):
        result = p(ctx)
        report.summaries.append(f"{p.name}: {result.summary}")
        report.metrics.update(result.metrics)
    ctx.metadata["perq.options"] = json.dumps({k: v for k, v in asdict(options).items()
                                               if k not in ("threads",)})
    used = {n.op for n in graph.nodes if n.domain == "perq"}
    functions = [f for name, f in ctx.functions.items() if name in used]
    out = export_model(graph, functions, ctx.min_opset)
    for key, value in ctx.metadata.items():
        entry = out.metadata_props.add()
        entry.key, entry.value = key, value
    save_model(out, output_path)
    _copy_sidecar_files(model_path.parent, output_path.parent)
    report.seconds = time.perf_counter() - start
    return report
