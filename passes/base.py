"""Pass infrastructure: each pass declares the facts it requires and ensures, runs on a shared
context, and returns what it changed."""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from perq_onnx.analysis import DecoderStructure
from perq_onnx.errors import PerqError


@dataclass
class Context:
    graph: gs.Graph
    structure: DecoderStructure
    functions: dict[str, onnx.FunctionProto] = field(default_factory=dict)   # model-local functions
    facts: set[str] = field(default_factory=set)
    metadata: dict[str, str] = field(default_factory=dict)                   # -> model.metadata_props
    min_opset: int | None = None


@dataclass
class PassResult:
    modified: bool
    summary: str = ""
    metrics: dict = field(default_factory=dict)


class Pass:
    """A graph pass. Subclasses set ``requires``/``ensures`` and implement ``run``."""
    requires: frozenset[str] = frozenset()
    ensures: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, ctx: Context) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, ctx: Context) -> PassResult:
        missing = self.requires - ctx.facts
        if missing:
            raise PerqError(f"pass {self.name} needs {', '.join(sorted(missing))} first")
        result = self.run(ctx)
        ctx.facts |= self.ensures
        return result
