"""Weights kept out of memory: read one tensor at a time, written tensor by tensor.

A model is loaded without its external data. Every initializer stays an onnx-graphsurgeon
``LazyValues`` (gs exports those as the TensorProto they hold, without loading them); those
whose bytes live in a file become ``FileValues``, which know their file and read through a
read-only memory map. A pass reads a weight with ``read(tensor)`` (never ``Constant.values``,
which would pin the loaded array in the graph) and writes a new one with
``WeightStore.constant(name, array)``: the bytes go straight to a scratch file in the staging
directory next to the output, and the graph holds only a reference to them. Nothing holds a
second copy of the model.

``WeightStore.write_model`` streams every live initializer into the output: embedded in the
.onnx when the model is small, else into ``<name>.data`` beside it (4 KiB aligned, so
onnxruntime can map it). ``WeightStore.session_path`` writes the graph as rewritten so far into
the staging directory so that onnxruntime can run it (the input's external data files are
hard-linked or copied beside it, each under its own name: onnxruntime only reads external data
below the model's folder).
"""
from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data
from onnx_graphsurgeon.ir.tensor import LazyValues

from .errors import PerqError
from .inputs import external_extent

EMBED_LIMIT = 1_800_000_000   # bytes of initializers above which outputs use external data
ALIGN = 4096
SCRATCH = "perq-scratch.bin"
SUB_BYTE = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1)


class FileValues(LazyValues):
    """A tensor whose bytes are at (offset, length) in a file; loads as a read-only memory map."""

    def __init__(self, tensor: onnx.TensorProto, path: pathlib.Path, offset: int, length: int):
        super().__init__(tensor)
        self.path, self.offset, self.length = pathlib.Path(path), offset, length

    def load(self) -> np.ndarray:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        shape = tuple(self.tensor.dims)
        if dtype.itemsize * int(np.prod(shape, dtype=np.int64)) == self.length:
            return np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset, shape=shape)
        # packed sub-byte types (int4): decode through onnx from the raw bytes
        proto = onnx.TensorProto()
        proto.CopyFrom(self.tensor)
        del proto.external_data[:]
        proto.data_location = onnx.TensorProto.DEFAULT
        proto.raw_data = self.raw_bytes()
        return numpy_helper.to_array(proto)

    def raw_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:  # the file shrank after it was mapped
            raise PerqError(f"{self.path}: truncated: tensor '{self.tensor.name}' needs bytes "
                            f"{self.offset}..{self.offset + self.length}, the file ends at {self.offset + len(data)}")
        return data


def read(tensor: gs.Constant) -> np.ndarray:
    """The value of a constant without caching it in the graph (a memory map for file-backed
    tensors: cheap until its elements are touched)."""
    values = tensor._values
    return values.load() if isinstance(values, LazyValues) else values


def nbytes(tensor: gs.Constant) -> int:
    values = tensor._values
    if isinstance(values, FileValues):
        return values.length
    if isinstance(values, LazyValues):
        return len(values.tensor.raw_data) if values.tensor.HasField("raw_data") else values.tensor.ByteSize()
    return values.nbytes


def input_files(graph: gs.Graph) -> set[pathlib.Path]:
    """The external data files the graph's initializers are read from."""
    return {t._values.path.resolve() for t in graph.tensors().values()
            if isinstance(t, gs.Constant) and isinstance(t._values, FileValues)}


def map_external(graph: gs.Graph, base: pathlib.Path) -> None:
    """Turn every external-data initializer of an imported graph into FileValues; tensors in
    node attributes (Constant nodes: shapes and scalars) are read into memory."""
    def mapped(tensor: gs.Constant) -> FileValues | None:
        if not isinstance(tensor._values, LazyValues) or isinstance(tensor._values, FileValues) \
                or not uses_external_data(tensor._values.tensor):
            return None
        proto = tensor._values.tensor
        path, offset, length = external_extent(proto, base)
        return FileValues(proto, path, offset, length)

    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and (values := mapped(tensor)) is not None:
            tensor._values = values
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Constant) and (values := mapped(value)) is not None:
                value._values = np.array(values.load())
                value.data_location = None  # else gs would export it as external data


def _raw(array: np.ndarray) -> tuple[onnx.TensorProto, memoryview | bytes]:
    """A data-less TensorProto (name, type, dims) for array and the bytes to store: the array's
    own buffer (no copy) for byte-sized types, packed bytes for sub-byte ones (int4)."""
    array = np.ascontiguousarray(array)
    proto = onnx.TensorProto()
    proto.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    proto.dims.extend(array.shape)
    if proto.data_type in SUB_BYTE:
        return proto, numpy_helper.from_array(array).raw_data
    return proto, memoryview(array.reshape(-1).view(np.uint8))


class WeightStore:
    """A staging directory with an append-only scratch file for rewritten tensors."""

    def __init__(self, staging: pathlib.Path):
        self.staging = pathlib.Path(staging)
        self.scratch = self.staging / SCRATCH
        self.scratch.touch()
        self._names: set[str] = set()
        self._linked: dict[pathlib.Path, str] = {}  # input data file -> its name below staging

    def _append(self, data) -> int:
        with open(self.scratch, "ab") as f:
            offset = f.seek(0, os.SEEK_END)
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            f.write(data)
        return offset + pad

    def unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._names:
            n += 1
            candidate = f"{name}.{n}"
        self._names.add(candidate)
        return candidate

    def constant(self, name: str, array: np.ndarray) -> gs.Constant:
        """A new constant holding array; large arrays go to the scratch file at once."""
        name = self.unique(name)
        array = np.asarray(array)
        if array.nbytes < 1024:
            if onnx.helper.np_dtype_to_tensor_dtype(array.dtype) in SUB_BYTE:  # gs would not pack it
                return gs.Constant(name, LazyValues(numpy_helper.from_array(np.ascontiguousarray(array), name)))
            return gs.Constant(name, np.ascontiguousarray(array))
        proto, data = _raw(array)
        proto.name = name
        offset = self._append(data)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", SCRATCH), ("offset", str(offset)), ("length", str(len(data)))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return gs.Constant(name, FileValues(proto, self.scratch, offset, len(data)))

    def replace(self, old: gs.Constant, name: str, array: np.ndarray) -> gs.Constant:
        """A constant holding array that takes old's place: old's bytes in the scratch file are
        overwritten when only one node reads old and the sizes match (a chain of passes then
        rewrites a weight in place instead of appending a copy per pass)."""
        values = old._values if isinstance(old, gs.Constant) else None
        array = np.ascontiguousarray(array)
        if isinstance(values, FileValues) and values.path == self.scratch and len(old.outputs) <= 1 \
                and onnx.helper.np_dtype_to_tensor_dtype(array.dtype) == values.tensor.data_type \
                and array.nbytes == values.length:
            with open(self.scratch, "r+b") as f:
                f.seek(values.offset)
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
            values.tensor.dims[:] = array.shape
            values.shape = tuple(array.shape)
            return old
        return self.constant(name, array)

    # ----------------------------------------------------------------------------- writing out

    def write_model(self, model: onnx.ModelProto, graph: gs.Graph, path: pathlib.Path,
                    external: bool | None = None) -> list[pathlib.Path]:
        """Write model (exported from graph) to path, streaming each initializer's bytes from
        wherever it lives. Returns the files written (the model first)."""
        constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        if external is None:
            external = sum(nbytes(constants[i.name]) for i in model.graph.initializer
                           if i.name in constants) > EMBED_LIMIT
        data_name = path.name + ".data"
        files = [path]
        if external:
            files.append(path.parent / data_name)
            with open(files[1], "wb") as out:
                for init in model.graph.initializer:
                    raw = _bytes_of(init, constants.get(init.name))
                    if len(raw) < 1024:
                        _embed(init, raw)
                        continue
                    offset = out.seek(0, os.SEEK_END)
                    out.write(b"\0" * (-offset % ALIGN))
                    offset += -offset % ALIGN
                    out.write(raw)
                    _externalize(init, data_name, offset, len(raw))
        else:
            for init in model.graph.initializer:
                _embed(init, _bytes_of(init, constants.get(init.name)))
        try:
            onnx.save_model(model, str(path))
        except ValueError as exc:  # protobuf's 2 GB limit
            raise PerqError(f"cannot write {path}: {exc}") from None
        return files

    def session_path(self, model: onnx.ModelProto, graph: gs.Graph) -> pathlib.Path:
        """Write model (exported from graph) into the staging directory so that onnxruntime can
        open it: scratch tensors are already there; the input's external files are hard-linked
        (or copied) beside it."""
        constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        for init in model.graph.initializer:
            values = constants[init.name]._values if init.name in constants else None
            if not isinstance(values, FileValues) or values.path == self.scratch:
                continue
            name = self._linked.get(values.path)
            if name is None:  # one name per input file: two files may share a base name
                name = self._linked[values.path] = f"input/{len(self._linked)}-{values.path.name}"
                target = self.staging / name
                target.parent.mkdir(exist_ok=True)
                try:
                    os.link(values.path, target)
                except OSError:
                    shutil.copyfile(values.path, target)
            _externalize(init, name, values.offset, values.length)
        path = self.staging / "session.onnx"
        onnx.save_model(model, str(path))
        return path


def _bytes_of(init: onnx.TensorProto, constant: gs.Constant | None) -> bytes:
    values = constant._values if constant is not None else None
    if isinstance(values, FileValues):
        return values.raw_bytes()
    if uses_external_data(init):
        raise PerqError(f"initializer '{init.name}' refers to external data perq-onnx did not map")
    if init.HasField("raw_data"):
        return init.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(init), init.name).raw_data


def _embed(init: onnx.TensorProto, raw: bytes) -> None:
    del init.external_data[:]
    init.data_location = onnx.TensorProto.DEFAULT
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        init.ClearField(field)
    init.raw_data = raw


def _externalize(init: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    init.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        init.ClearField(field)
    del init.external_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
