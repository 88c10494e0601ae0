"""Pass infrastructure: a context over the graph being rewritten, passes with pre- and
postconditions that are checked on the graph, and a manager that runs them in order.

A ``Condition`` is a named check of the graph (``check(ctx)`` returns None when it holds, else
the reason, naming a node). A pass lists the conditions it ``requires`` before it runs and those
it ``ensures`` afterwards; ``PassManager`` checks both and raises ``InternalError`` naming the
pass and the condition when one fails, so a misordered pipeline (P3 after R3, a rotation after
weight quantization, ...) is caught instead of producing a wrong model. Analysis results are
frozen and name nodes; passes look nodes up through the context and never change them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from perq_onnx.analysis import DecoderStructure, Fold, Linear
from perq_onnx.calibration import Calibrator, tensor_names, with_outputs
from perq_onnx.errors import InternalError, PerqError
from perq_onnx.functions import DOMAIN, PER_NODE_ATTRIBUTES, function_for
from perq_onnx.fused_ops import fused_gamma_input
from perq_onnx.graph import export_structure
from perq_onnx.shapes import constant_shape, constant_value
from perq_onnx.transforms import Transform, fold_consumed, fold_produced
from perq_onnx.weights import WeightStore


@dataclass
class Context:
    graph: gs.Graph
    structure: DecoderStructure
    store: WeightStore
    functions: dict[str, onnx.FunctionProto] = field(default_factory=dict)   # model-local functions
    metadata: dict[str, str] = field(default_factory=dict)                   # -> model.metadata_props
    min_opset: int | None = None
    calibrator: Calibrator | None = None      # runs the graph as rewritten so far
    inserted: dict[str, set[str]] = field(default_factory=dict)  # kind -> tensors passes inserted
    _nodes: dict[str, gs.Node] = field(default_factory=dict)

    def session(self, outputs=()):
        """The graph as rewritten so far, as a file onnxruntime can open, with the named tensors
        exposed as extra outputs (perq ops get their function bodies)."""
        register_functions(self)
        model = export_structure(self.graph, self.functions.values(), max(self.min_opset or 0, 21)
                                 if self.functions else self.min_opset)
        return self.store.session_path(with_outputs(model, outputs), self.graph)

    def collect(self, requests: dict) -> dict:
        """Statistics (see Calibrator) of tensors of the graph as rewritten so far."""
        if self.calibrator is None:
            raise InternalError("a pass asked for calibration statistics but no calibrator was set up")
        return self.calibrator.collect(self.session(tensor_names(requests)), requests)

    def record(self, kind: str, tensor: str) -> None:
        """Note that a pass inserted `tensor` as a `kind` (ONLINE_ROTATED, QUANTIZED_ACTIVATION):
        pass contracts check these records, never names."""
        self.inserted.setdefault(kind, set()).add(tensor)

    def recorded(self, kind: str) -> set[str]:
        return self.inserted.get(kind, set())

    def node(self, name: str) -> gs.Node:
        if name not in self._nodes:
            self._nodes = {n.name: n for n in self.graph.nodes}
        try:
            return self._nodes[name]
        except KeyError:
            raise InternalError(f"node '{name}' is no longer in the graph") from None

    def add(self, node: gs.Node) -> gs.Node:
        self.graph.nodes.append(node)
        self._nodes[node.name] = node
        return node

    # ---------------------------------------------------------------------------- constants
    def constant(self, node: str, index: int) -> np.ndarray:
        value = constant_value(self.node(node).inputs[index])
        if value is None:
            raise InternalError(f"input {index} of node '{node}' is not a constant")
        return value

    def set_constant(self, node: str, index: int, value: np.ndarray, name: str) -> None:
        """Give input `index` of `node` a new constant of its own (a shared initializer is never
        changed behind another reader's back)."""
        n = self.node(node)
        n.inputs[index] = self.store.replace(n.inputs[index], name, value)

    def weight(self, lin: Linear) -> np.ndarray:
        return self.constant(lin.name, 1)

    def fold(self, fold: Fold, t: Transform) -> None:
        """Fold transform t into the weight slice `fold` (and its bias)."""
        w = self.constant(fold.node, fold.input)
        folder = fold_produced if fold.axis == 1 else fold_consumed
        self.set_constant(fold.node, fold.input, folder(w, t, fold.start, fold.stop), f"{fold.node}.weight")
        if fold.axis == 1 and fold.bias is not None:
            b = self.constant(fold.bias, fold.bias_index)
            self.set_constant(fold.bias, fold.bias_index, fold_produced(b[None, :], t, fold.start, fold.stop)[0],
                              f"{fold.node}.bias")


def register_functions(ctx: Context) -> bool:
    """Give every perq node its model-local function body; whether the graph has any. A body is
    specialised to its node's attributes (functions.py), so all nodes of one op must share them,
    except those the body reads by reference (PER_NODE_ATTRIBUTES)."""
    found, attrs = False, {}
    for node in ctx.graph.nodes:
        if node.domain == DOMAIN:
            found = True
            shared = {k: v for k, v in node.attrs.items() if k not in PER_NODE_ATTRIBUTES}
            if attrs.setdefault(node.op, shared) != shared:
                raise InternalError(f"node '{node.name}': perq.{node.op} with {shared}, but another node of "
                                    f"that op has {attrs[node.op]}; one model-local function serves them all")
            if node.op not in ctx.functions:
                ctx.functions[node.op] = function_for(node.op, node.attrs)
    for op in set(ctx.functions) - set(attrs):  # a pass replaced every node of this op
        del ctx.functions[op]
    return found


@dataclass
class PassResult:
    summary: str = ""
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    name: str
    check: Callable[[Context], str | None]


class Pass:
    """A graph pass. Subclasses set ``requires``/``ensures`` and implement ``run``."""
    requires: tuple[Condition, ...] = ()
    ensures: tuple[Condition, ...] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, ctx: Context) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError


class PassManager:
    """Runs passes in order, checking each pass's conditions on the graph before and after."""

    def __init__(self, passes: list[Pass], progress: bool = True):
        self.passes = passes
        self.progress = progress

    @staticmethod
    def _check(p: Pass, conditions, ctx: Context, when: str) -> None:
        for condition in conditions:
            reason = condition.check(ctx)
            if reason is not None:
                raise InternalError(f"pass {p.name}: {when} '{condition.name}' does not hold: {reason}")

    def run(self, ctx: Context) -> list[tuple[Pass, PassResult]]:
        results = []
        for p in tqdm(self.passes, desc="passes", unit="pass", leave=False, disable=not self.progress):
            self._check(p, p.requires, ctx, "precondition")
            try:
                result = p.run(ctx)
            except (PerqError, InternalError):
                raise
            except Exception as exc:
                raise InternalError(f"pass {p.name} failed: {type(exc).__name__}: {exc}") from exc
            self._check(p, p.ensures, ctx, "postcondition")
            results.append((p, result))
        return results


# ------------------------------------------------------------------------------ conditions

def decoder_linears(ctx: Context):
    for layer in ctx.structure.layers:
        yield from layer.linears().values()


def gamma_input(node: gs.Node) -> int:
    """The input index of an RMSNorm's gamma: the scale input of onnxruntime's fused norms, or
    the constant operand of the decomposed form's Mul."""
    index = fused_gamma_input(node)
    if index is None:
        index = next((i for i, t in enumerate(node.inputs) if constant_value(t) is not None), None)
    if index is None:
        raise InternalError(f"RMSNorm gamma node '{node.name}' has no constant input")
    return index


def _gammas_folded(ctx: Context) -> str | None:
    names = {n.name for n in ctx.graph.nodes}
    for norm in ctx.structure.norms:
        if norm.gamma in names:
            node = ctx.node(norm.gamma)
            if not np.all(constant_value(node.inputs[gamma_input(node)]) == 1):
                return f"RMSNorm gamma of '{norm.gamma}' is not folded (not all ones)"
    return None


def _weights_float(ctx: Context) -> str | None:
    for lin in decoder_linears(ctx):
        meta = constant_shape(ctx.node(lin.name).inputs[1])
        if meta is None or not np.issubdtype(meta[1], np.floating):
            return f"'{lin.name}' does not read a float constant weight"
    return None


def _weights_quantized(ctx: Context) -> str | None:
    for lin in decoder_linears(ctx):
        if ctx.node(lin.name).inputs[1].name not in ctx.recorded(QUANTIZED_WEIGHT):
            return f"'{lin.name}' does not read a quantized weight"
    return None


def _down_input_is_original(ctx: Context) -> str | None:
    for layer in ctx.structure.layers:
        if ctx.node(layer.down.name).inputs[0].name != layer.down.input:
            return f"'{layer.down.name}' no longer reads its MLP intermediate directly"
    return None


# kinds of tensors that passes record as inserted (Context.record)
ONLINE_ROTATED = "online rotation output"
QUANTIZED_WEIGHT = "dequantized weight"
QUANTIZED_ACTIVATION = "quantized activation"


def _online_rotation_present(ctx: Context) -> str | None:
    for layer in ctx.structure.layers:
        if ctx.node(layer.down.name).inputs[0].name not in ctx.recorded(ONLINE_ROTATED):
            return f"'{layer.down.name}' does not read an online rotation"
    return None


def online_rotation_node(lin: Linear) -> str:
    """The name of the online rotation node in front of lin (R3: down_proj; the online residual
    rotation: the first reader of a norm)."""
    return f"{lin.name}/OnlineRotation"


def _linear_inputs_unquantized(ctx: Context) -> str | None:
    for lin in decoder_linears(ctx):
        if ctx.node(lin.name).inputs[0].name in ctx.recorded(QUANTIZED_ACTIVATION):
            return f"'{lin.name}' already reads a quantized activation"
    return None


def _linear_inputs_quantized(ctx: Context) -> str | None:
    for lin in decoder_linears(ctx):
        if ctx.node(lin.name).inputs[0].name not in ctx.recorded(QUANTIZED_ACTIVATION):
            return f"'{lin.name}' does not read a quantized activation"
    return None


def _embedding_table(ctx: Context) -> np.dtype | None:
    meta = constant_shape(ctx.node(ctx.structure.embedding).inputs[0])
    return None if meta is None else np.dtype(meta[1])


def _embedding_float(ctx: Context) -> str | None:
    dtype = _embedding_table(ctx)
    if dtype is None or not np.issubdtype(dtype, np.floating):
        return f"the embedding '{ctx.structure.embedding}' does not gather from a float constant table"
    return None


def _embedding_quantized(ctx: Context) -> str | None:
    table = ctx.node(ctx.structure.embedding).inputs[0]
    producer = table.inputs[0] if table.inputs else None
    if producer is not None and producer.op == "Transpose" and producer.inputs[0].name in ctx.recorded(QUANTIZED_WEIGHT):
        return None  # tied: gathers from lm_head's quantized weight
    dtype = _embedding_table(ctx)
    if dtype is None or not np.issubdtype(dtype, np.integer):
        return f"the embedding '{ctx.structure.embedding}' gathers neither an integer table nor a quantized weight"
    return None


GAMMAS_FOLDED = Condition("RMSNorm gammas folded", _gammas_folded)
WEIGHTS_FLOAT = Condition("decoder weights are float constants", _weights_float)
WEIGHTS_QUANTIZED = Condition("decoder weights are quantized", _weights_quantized)
NO_ONLINE_ROTATION = Condition("no online rotation at down_proj yet", _down_input_is_original)
ONLINE_ROTATION = Condition("online rotation at every down_proj", _online_rotation_present)
ACTIVATIONS_FLOAT = Condition("decoder linear inputs not quantized yet", _linear_inputs_unquantized)
ACTIVATIONS_QUANTIZED = Condition("every decoder linear reads a quantized activation", _linear_inputs_quantized)
EMBEDDING_FLOAT = Condition("the token embedding table is float", _embedding_float)
EMBEDDING_QUANTIZED = Condition("the token embedding gathers integer codes", _embedding_quantized)
