"""What every deployment target has in common: filling in its defaults, and lowering.

A ``Target`` owns everything that differs between runtimes: its defaults and limits (weight
blocks, activation bits, rounding, clip rule, code range), the passes that turn the rewritten
float graph into its quantized op form (``lower``: weights, activations, embedding, how the
``perq`` run-time ops appear), the session settings its runtime needs, and the checker its
output must pass (``check_output``). The float rewrites (R1, R2, P3, R3) are the same for every
target and run before ``lower``. Adding a target is one new file in this package plus its line
in ``TARGETS`` (``__init__.py``).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass

from ..errors import PerqError
from ..formats import format_for
from ..graph import export_structure
from ..passes.base import Context, Pass, PassManager, PassResult, register_functions
from ..passes.quantize_weights import QuantizeWeights
from ..rounding import WeightQuant
from ..settings import Clip, Embedding, Kernel, NumberFormat, Rounding, Settings

OPSET = 21  # int4 and blocked DequantizeLinear


@dataclass(frozen=True)
class Target:
    name: str
    default_w_groups: tuple[int, ...] = ()   # the first that divides every linear's input wins
    default_a_bits: int = 16
    default_rounding: Rounding = Rounding.GPTQ
    default_w_clip: Clip = Clip.ACT
    full_range: bool = True                  # symmetric codes use all 16 levels (negative scales)
    ragged_groups: bool = True               # an INT group need not divide K (the last one is shorter)
    dynamic_int_activations: bool = False    # quantizes activations per token in the graph (--a-clip)
    formats: tuple[NumberFormat, ...] = (NumberFormat.INT,)  # the number formats it can express
    embeddings: tuple[Embedding, ...] = ()   # the quantized embedding forms it writes, its default first
                                             # (TIED, where listed, is the default for a tied model)
    kernels: tuple[Kernel, ...] = ()         # the INT4 matmul kernels it can write, its default first
    float_target_w4a4: bool = False          # --float-target by default for quantized INT weights and activations

    # ------------------------------------------------------------------------------ settings
    def resolve(self, settings: Settings, in_features: dict[str, int], tied: bool = False) -> Settings:
        """Settings with the target's defaults filled in and checked against what it supports and
        against the model's linears (in_features: a linear's name -> its input channels; tied:
        lm_head is the embedding table transposed)."""
        if settings.embedding is not None and settings.embedding not in self.embeddings:
            kept = f"writes {', '.join(map(str, self.embeddings))}" if self.embeddings else "keeps the embedding float"
            raise PerqError(f"--embedding {settings.embedding}: the {self.name} target {kept}")
        if settings.embedding is not None and settings.float_embeddings:
            raise PerqError(f"--embedding {settings.embedding} with --float-embeddings: choose one")
        if settings.embedding is None and self.embeddings and settings.quantize and not settings.float_embeddings:
            settings = dataclasses.replace(settings, embedding=Embedding.TIED if tied and Embedding.TIED in self.embeddings
                                           else self.embeddings[0])
        if settings.kernel is not None and settings.kernel not in self.kernels:
            raise PerqError(f"--kernel {settings.kernel}: the {self.name} target "
                            + (f"writes {', '.join(map(str, self.kernels))}" if self.kernels else "has no kernel choice"))
        if settings.kernel is not None and not settings.weights_quantized:
            raise PerqError(f"--kernel {settings.kernel} multiplies by INT4 weights; these weights stay float")
        if settings.kernel is None and self.kernels and settings.weights_quantized:
            settings = dataclasses.replace(settings, kernel=self.kernels[0])
        w = settings.weights
        if w.float_target is None:
            a_bits = settings.activations.bits if settings.activations.bits is not None else self.default_a_bits
            settings = settings.replace(float_target=self.float_target_w4a4 and w.format is NumberFormat.INT
                                        and settings.weights_quantized and w.bits == 4 and a_bits == 4
                                        and not settings.activations.fused)
            w = settings.weights
        if settings.quantize and w.format not in self.formats:
            raise PerqError(f"--format {w.format}: the {self.name} target expresses "
                            f"{', '.join(map(str, self.formats))} only")
        if settings.quantize and w.format is not NumberFormat.INT:  # its blocks are the format's
            bad = next((name for name, n in in_features.items() if n % w.format.block), None)
            if bad is not None:
                raise PerqError(f"--format {w.format}: its blocks of {w.format.block} do not divide the "
                                f"{in_features[bad]} input channels of node '{bad}'")
            self.check(settings)
            return settings.replace(a_bits=settings.activations.bits or 4,  # the format is W4A4 unless --a-bits 16
                                    rounding=w.rounding or self.default_rounding, w_clip=w.clip or self.default_w_clip)
        group = w.group
        if group is None and self.default_w_groups and settings.weights_quantized:
            group = next((g for g in self.default_w_groups if all(n % g == 0 for n in in_features.values())), None)
            if group is None:
                raise PerqError(f"the {self.name} target's weight blocks ({', '.join(map(str, self.default_w_groups))}) "
                                f"divide no common input size of this model ({sorted(set(in_features.values()))})")
        a_bits = settings.activations.bits
        settings = settings.replace(w_group=group, a_bits=a_bits if a_bits is not None else self.default_a_bits,
                                    rounding=w.rounding or self.default_rounding, w_clip=w.clip or self.default_w_clip)
        if settings.weights_quantized and group is not None and not self.ragged_groups:
            bad = next((name for name, n in in_features.items() if n % group), None)
            if bad is not None:
                raise PerqError(f"--w-group {group} does not divide the {in_features[bad]} input channels of "
                                f"node '{bad}'")
        if settings.activations.clip != 1.0 and not self.dynamic_int_activations:
            raise PerqError(f"--a-clip: the {self.name} target has no dynamic INT activation quantizer to clip")
        if settings.weights.float_target and not (
                self.name == "simulate" and settings.weights_quantized and settings.activations_quantized
                and not settings.activations.fused):
            raise PerqError("--float-target refits the weights toward the float output of quantized activations: "
                            "it needs the simulate target, quantized weights and activations and no --fused-ops")
        self.check(settings)
        return settings

    def check(self, settings: Settings) -> None:
        """Refuse settings this target cannot express (a PerqError naming the option)."""

    def check_model(self, source_dir: pathlib.Path, structure, graph) -> None:
        """Refuse, before any work, a model this target cannot write (a PerqError naming why);
        `source_dir` holds the input model's config and tokenizer files, `graph` is the input
        as analysed."""

    def needs_calibration(self, settings: Settings) -> bool:
        """Whether lowering needs calibration data beyond what the settings ask for (static
        activation scales)."""
        return False

    # ------------------------------------------------------------------------------ lowering
    def passes(self, settings: Settings) -> list[Pass]:  # pragma: no cover - interface
        raise NotImplementedError

    def lower(self, ctx: Context, settings: Settings, progress: bool = True) -> list[tuple[Pass, PassResult]]:
        """Turn the rewritten float graph into this target's op form: its quantization passes,
        then the op form of what remains (``finalize``)."""
        results = PassManager(self.passes(settings), progress).run(ctx)
        self.finalize(ctx)
        return results

    def finalize(self, ctx: Context) -> None:
        """Give every perq op left in the graph its model-local function body, set the opset the
        graph's types need, and record the session settings in the model's metadata."""
        if register_functions(ctx) or ctx.min_opset:
            ctx.min_opset = max(ctx.min_opset or 0, OPSET)
        if self.session_config():
            ctx.metadata["perq.ort.session_config"] = json.dumps(self.session_config())

    def session_config(self) -> dict[str, str]:
        """onnxruntime session config entries the output must run with (recorded in metadata)."""
        return {}

    def write(self, ctx: Context, path: pathlib.Path, source_dir: pathlib.Path,
              settings: Settings) -> list[pathlib.Path]:
        """Write the lowered graph at `path` (in the staging folder; `source_dir` holds the input
        model's config and tokenizer files; `settings` as resolved); the files written, the model first."""
        model = export_structure(ctx.graph, ctx.functions.values(), ctx.min_opset, ctx.metadata)
        return ctx.store.write_model(model, ctx.graph, path)

    def runs_in_onnxruntime(self, settings: Settings) -> bool:
        """Whether onnxruntime can load the output (the pipeline then loads it before publishing)."""
        return True

    def check_output(self, model) -> list:
        """Violations of the target's documented form in a written model (a path or ModelProto);
        the pipeline refuses to publish an output with any."""
        return []

    # ------------------------------------------------------------------------------ helpers
    def weight_form(self, settings: Settings) -> WeightQuant:
        w = settings.weights
        if w.format is not NumberFormat.INT:
            return WeightQuant(format=format_for(w.format), clip=str(w.clip))
        return WeightQuant(w.bits, w.group, w.symmetric, str(w.clip), self.full_range and w.symmetric)

    def table_form(self, settings: Settings) -> WeightQuant:
        """lm_head's and an INT4 embedding's form: the weights', with the weight-error clip rule
        where the weights' rule needs activations."""
        form = self.weight_form(settings)
        return dataclasses.replace(form, clip="mse" if form.clip == "act" else form.clip)

    def quantize_weights(self, settings: Settings, lm_head: bool, emit=None) -> QuantizeWeights:
        """The weight pass in the weight form ``emit`` (passes/quantize_weights.py); lm_head is
        rounded like the decoder's linears (GPTQ against its own input Hessian where the target
        rounds by GPTQ) with the weight-error clip rule where the form's rule needs activations."""
        form = self.weight_form(settings)
        head = self.table_form(settings) if lm_head and not settings.float_embeddings else None
        return QuantizeWeights(form, settings.weights.rounding, lm_head=head, gptq=settings.weights.gptq, emit=emit,
                               float_target=settings.weights.float_target)
