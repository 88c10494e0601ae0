"""What perq-onnx reads, checked before any work, each refusal one line naming the file:

* the model file: not empty, a readable ONNX protobuf;
* its model-local functions: no function calls itself (directly or through others), nesting at
  most MAX_FUNCTION_DEPTH deep, and at most MAX_INLINED_NODES nodes once every call is inlined
  (shape inference and the TensorRT check inline them: a crafted model of nested functions
  would otherwise hang them or exhaust the stack);
* its external data: every file exists and holds the bytes its tensors name (offset + length
  inside the file, the length the tensor's type and shape need).

``check_model`` returns the files the model is read from (the model and its external data), the
paths no output may replace.
"""
from __future__ import annotations

import math
import pathlib

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .errors import PerqError

MAX_FUNCTION_DEPTH = 16          # calls of model-local functions inside each other
MAX_INLINED_NODES = 2_000_000    # nodes of the graph with every function call inlined
SUB_BYTE_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4,
                 getattr(onnx.TensorProto, "FLOAT4E2M1", -1): 4}


def load_skeleton(path) -> onnx.ModelProto:
    """The model without its external data, or a one-line PerqError."""
    path = pathlib.Path(path)
    if not path.exists():
        raise PerqError(f"{path}: no such file")
    if path.is_dir():
        raise PerqError(f"{path}: is a directory, not an ONNX file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PerqError(f"{path}: {exc.strerror}") from None
    if size == 0 and path.is_file():
        raise PerqError(f"{path}: the file is empty (0 bytes), not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise several types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PerqError(f"{path}: not a readable ONNX model ({reason})") from None
    if not model.graph.node:
        raise PerqError(f"{path}: not an ONNX model (no graph nodes; truncated or another file type?)")
    return model


def check_functions(model: onnx.ModelProto, path) -> None:
    """Refuse recursive, too deeply nested or exponentially expanding model-local functions."""
    functions = {(f.domain, f.name, getattr(f, "overload", "")): f for f in model.functions}
    if not functions:
        return
    by_name = {key[:2]: key for key in functions}
    size: dict[tuple, tuple[int, int]] = {}   # function -> (inlined nodes, depth)
    active: list[tuple] = []

    def callee(node):
        key = (node.domain, node.op_type, getattr(node, "overload", ""))
        return key if key in functions else by_name.get((node.domain, node.op_type))

    def measure(nodes) -> tuple[int, int]:
        total, depth = 0, 0
        for node in nodes:
            key = callee(node)
            if key is None:
                total += 1
                for attr in node.attribute:  # If/Loop/Scan bodies
                    for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                        t, d = measure(g.node)
                        total, depth = total + t, max(depth, d)
            else:
                t, d = expand(key)
                total, depth = total + t, max(depth, d + 1)
            if total > MAX_INLINED_NODES:
                raise PerqError(f"{path}: its model-local functions expand to more than {MAX_INLINED_NODES:,} "
                                f"nodes when inlined (at node '{node.name or node.op_type}'); refused")
        return total, depth

    def expand(key) -> tuple[int, int]:
        if key in size:
            return size[key]
        if key in active:
            cycle = " -> ".join(f"{d}.{n}" if d else n for d, n, _ in active[active.index(key):] + [key])
            raise PerqError(f"{path}: model-local function {key[0]}.{key[1]} calls itself ({cycle}); refused")
        if len(active) >= MAX_FUNCTION_DEPTH:
            raise PerqError(f"{path}: model-local functions nested more than {MAX_FUNCTION_DEPTH} deep "
                            f"(at {key[0]}.{key[1]}); refused")
        active.append(key)
        size[key] = measure(functions[key].node)
        active.pop()
        return size[key]

    measure(model.graph.node)


def expected_bytes(tensor: onnx.TensorProto) -> int | None:
    count = math.prod(tensor.dims)
    bits = SUB_BYTE_BITS.get(tensor.data_type)
    if bits:
        return (count * bits + 7) // 8
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # noqa: BLE001 - strings and unknown types: no fixed size
        return None


def _tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def external_extent(tensor: onnx.TensorProto, base: pathlib.Path) -> tuple[pathlib.Path, int, int]:
    """(file, offset, length) of an external-data tensor, checked: the file exists and holds
    the bytes the tensor's type and shape need at that offset (else a PerqError naming it)."""
    info = ExternalDataInfo(tensor)
    file = (pathlib.Path(base) / info.location).resolve() if info.location else None
    if file is None or not file.is_file():
        raise PerqError(f"tensor '{tensor.name}': external data file {file or '(none named)'} does not exist")
    size, offset = file.stat().st_size, int(info.offset or 0)
    length = int(info.length) if info.length else size - offset
    expected = expected_bytes(tensor)
    if expected is not None and length != expected:
        raise PerqError(f"tensor '{tensor.name}': external data in {file} is {length} bytes, its type and "
                        f"shape {list(tensor.dims)} need {expected} (corrupt model or data file)")
    if offset < 0 or offset + length > size:
        raise PerqError(f"{file}: truncated or not this model's data: tensor '{tensor.name}' needs bytes "
                        f"{offset}..{offset + length} of a {size}-byte file")
    return file, offset, length


def check_external_data(model: onnx.ModelProto, path) -> set[pathlib.Path]:
    """Every external data file exists and holds the bytes its tensors name; returns them."""
    base = pathlib.Path(path).parent
    return {external_extent(t, base)[0] for t in _tensors(model) if uses_external_data(t)}


def check_model(path, model: onnx.ModelProto | None = None) -> set[pathlib.Path]:
    """Check the model file at path (see the module docstring; `model`: its skeleton, when
    already loaded); return the files it is read from: the model and its external data files."""
    model = load_skeleton(path) if model is None else model
    check_functions(model, path)
    return {pathlib.Path(path).resolve()} | check_external_data(model, path)
