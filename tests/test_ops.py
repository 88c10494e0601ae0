"""The perq custom-op library (runtime_ops/, perq_onnx.ops): CPU kernels against an independent
numpy reference, and against the model-local function bodies that onnxruntime runs without the
library. The library is built once per session; a missing cmake or compiler fails the tests.

How the quantized op is checked: the rotation is a fast Walsh-Hadamard butterfly in the library
and a MatMul with H_b in the function body, so the float32 rotated values may differ in the last
bit. Codes can then only differ where the value before rounding sits at a rounding tie (up to
that noise). Two checks follow from this:
* dyadic inputs (small integers / 8) with b a power of 4 make every rotation exact (H_b entries
  are powers of two, all sums exact), so the outputs must be bit-identical, ties included;
* random normal inputs for every b: the integer codes of both outputs (read on the reference
  grid) must agree everywhere except where the reference value before rounding lies within
  1e-3 of a .5 tie, and such exceptions must be rare.
"""
from __future__ import annotations

import itertools
import os
import pathlib
import shutil
import subprocess
import sys
import zlib

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from perq_onnx import ops
from perq_onnx.errors import PerqError
from perq_onnx.formats import MXFP4, NVFP4
from perq_onnx.functions import (BLOCK_HADAMARD, BLOCK_HADAMARD_QUANTIZE, BLOCK_HADAMARD_QUANTIZE_FP4, DOMAIN, EPS,
                                 single_op_model)
from perq_onnx.hadamard import hadamard

BLOCKS = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
POWERS_OF_FOUR = [4, 16, 64, 256, 1024]
QUANT = [(4, 0), (4, 1), (8, 0), (8, 1)]  # (bits, symmetric)
DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
TIE_TOL = 1e-3


@pytest.fixture(scope="session")
def library():
    try:
        return ops.build_library(verbose=False)
    except PerqError as exc:
        pytest.fail(f"building the op library failed: {exc}")


def rng_for(*key) -> np.random.Generator:
    """A generator per test case: fresh data in every case, reproducible across runs."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_session(model, library, with_library=True, threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if with_library:
        so.register_custom_ops_library(str(library))
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def node_model(op_type, rank, channels, dtype=np.float32, **attrs):
    """One perq node, no function body: runs only with the library."""
    elem = DTYPES[dtype]
    dims = [f"d{i}" for i in range(rank - 1)] + [channels]
    node = helper.make_node(op_type, ["X"], ["Y"], domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], op_type, [helper.make_tensor_value_info("X", elem, dims)],
                              [helper.make_tensor_value_info("Y", elem, dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    return model


def run_poisoned(sess, x):
    """Run with the output bound to a NaN-filled buffer; the kernel must overwrite all of it."""
    y = np.full(x.shape, np.nan, dtype=x.dtype)
    binding = sess.io_binding()
    binding.bind_cpu_input("X", x)
    binding.bind_output("Y", "cpu", 0, x.dtype, list(x.shape), y.ctypes.data)
    sess.run_with_iobinding(binding)
    assert not np.isnan(y).any(), "output left partly unwritten"
    return y


def random_shape(rng, rank, channels, max_rows=96):
    lead = []
    for _ in range(rank - 1):
        lead.append(int(rng.integers(1, 6)))
    while lead and np.prod(lead) > max_rows:
        lead[int(np.argmax(lead))] -= 1
    return tuple(lead) + (channels,)


def random_input(rng, shape, block, dtype):
    """Normal data at a random scale, with a zero row, a row whose rotation is all positive
    (one positive value per block) and a row with an outlier."""
    x = rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 20.0])
    rows = x.reshape(-1, shape[-1])
    specials = rng.permutation(rows.shape[0])[:3]
    for kind, r in zip(("zero", "delta", "outlier"), specials):
        if kind == "zero":
            rows[r] = 0.0
        elif kind == "delta":
            rows[r] = 0.0
            rows[r, ::block] = np.abs(rng.standard_normal(shape[-1] // block)) + 0.1
        else:
            rows[r, rng.integers(shape[-1])] *= 100.0
    return rows.reshape(shape).astype(dtype)


def dyadic_input(rng, shape, dtype=np.float32):
    """Integers in [-8, 8] divided by 8: every rotation by a power-of-4 Hadamard is exact."""
    return (rng.integers(-8, 9, size=shape) / 8.0).astype(dtype)


# ------------------------------------------------------------------------------------------------
# numpy reference, written from the specification in perq_onnx/functions.py

def ref_rotate(x, block):
    """Blockwise x @ H_b in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    return (x64.reshape(-1, block) @ hadamard(block)).reshape(x64.shape)


def ref_qdq(r, bits, symmetric):
    """Per-row quantize-dequantize of float32 r in float32, operation by operation.
    Returns y, the value before rounding v, the codes q, scale and zero point (per row)."""
    f = np.float32
    r = np.asarray(r, dtype=f)
    if symmetric:
        qmax = f(2 ** (bits - 1) - 1)
        scale = np.maximum(np.abs(r).max(-1, keepdims=True) / qmax, f(EPS))
        zp = np.zeros_like(scale)
        v = r / scale
        q = np.clip(np.rint(v), -qmax - 1, qmax) + f(0)  # integer codes: no -0
        y = q * scale
    else:
        qmax = f(2 ** bits - 1)
        lo = np.minimum(r.min(-1, keepdims=True), f(0))
        hi = np.maximum(r.max(-1, keepdims=True), f(0))
        scale = np.maximum((hi - lo) / qmax, f(EPS))
        zp = np.rint(-lo / scale)
        v = r / scale + zp
        q = np.clip(np.rint(v), f(0), qmax) + f(0)
        y = (q - zp) * scale
    return y.astype(f), v, q, scale, zp


def check_codes(y, r_ref, bits, symmetric, grid_tol=1e-3):
    """y (the op's output) must carry the reference codes, except near rounding ties."""
    _, v, q_ref, scale, zp = ref_qdq(r_ref, bits, symmetric)
    assert np.isfinite(y).all()
    t = y.astype(np.float64) / scale + zp
    q = np.rint(t)
    off_grid = np.abs(t - q).max() if t.size else 0.0
    assert off_grid < grid_tol, f"output is off the quantization grid by {off_grid:.3g} codes"
    near_tie = np.abs(np.abs(v - np.floor(v)) - 0.5) < TIE_TOL
    differ = q != q_ref
    bad = differ & ~near_tie
    assert not bad.any(), (f"{int(bad.sum())} codes differ away from rounding ties, e.g. code "
                           f"{q[bad][0]} vs {q_ref[bad][0]} at v={v[bad][0]}")
    assert differ.mean() <= 2 * TIE_TOL + 1e-9
    return differ


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    view = np.uint32 if a.dtype == np.float32 else np.uint16
    differ = a.view(view) != b.view(view)
    n = int(differ.sum())
    assert n == 0, (f"{n} of {a.size} elements differ in their bits, e.g. {a[differ][0]!r} vs {b[differ][0]!r}")


# ------------------------------------------------------------------------------------------------
# build and library plumbing

def test_build_produces_library(library):
    assert pathlib.Path(library).is_file()
    assert ops.library_path() == pathlib.Path(library)
    so = ops.session_options()
    assert isinstance(so, ort.SessionOptions)


def test_cuda_kernels_compiled_when_nvcc_present(library):
    marker = (ops.BUILD_DIR / "perq_ops_build.txt").read_text()
    assert marker.strip() == f"cuda={'ON' if ops.cuda_available() else 'OFF'}"
    if shutil.which("nvcc") or os.environ.get("CUDACXX"):
        assert ops.cuda_available(), "nvcc is present but the library holds no CUDA kernels"


def test_library_path_errors(library, monkeypatch, tmp_path):
    monkeypatch.setenv(ops.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(PerqError, match="no such file"):
        ops.library_path()
    monkeypatch.delenv(ops.LIBRARY_ENV)
    monkeypatch.setattr(ops, "BUILD_DIR", tmp_path)
    with pytest.raises(PerqError, match="perq-onnx build-ops"):
        ops.library_path()


def test_env_override_is_used(library, monkeypatch, tmp_path):
    copy = tmp_path / pathlib.Path(library).name
    shutil.copy(library, copy)
    monkeypatch.setenv(ops.LIBRARY_ENV, str(copy))
    assert ops.library_path() == copy
    sess = ops.session(single_op_model(BLOCK_HADAMARD, 32, block_size=32))
    x = np.ones((1, 2, 32), np.float32)
    np.testing.assert_allclose(sess.run(None, {"X": x})[0][0, 0, 0], np.sqrt(32), rtol=1e-6)


def test_kernel_replaces_function_body(library):
    """With the library registered, the node runs as one kernel (not the inlined body), and the
    output shape is inferred with its symbolic dimensions."""
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "perq_ops_profile")
    sess = ops.session(single_op_model(BLOCK_HADAMARD_QUANTIZE, 64, block_size=16, bits=4, symmetric=0),
                       sess_options=so)
    sess.run(None, {"X": np.ones((1, 3, 64), np.float32)})
    import json
    profile = pathlib.Path(sess.end_profiling())
    try:
        ops_run = {e["args"]["op_name"] for e in json.loads(profile.read_text())
                   if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    finally:
        profile.unlink(missing_ok=True)
    assert ops_run == {BLOCK_HADAMARD_QUANTIZE}
    assert sess.get_outputs()[0].shape == ["batch", "tokens", 64]


def test_shape_inference_with_unknown_dims(library):
    """Shapes the op cannot pass on (unknown rank, unnamed unknown dimensions) are left unset:
    downstream Shape / Reshape / MatMul nodes must still load and run as with the function body."""
    from perq_onnx.functions import block_hadamard_quantize_function
    C = 64
    nodes = [
        # X has no shape at all: the first perq node sees an unknown rank
        helper.make_node(BLOCK_HADAMARD_QUANTIZE, ["X"], ["q0"], domain=DOMAIN, block_size=16, bits=8, symmetric=0),
        helper.make_node("MatMul", ["q0", "W"], ["m0"]),
        # Reshape to [-1, C]: an unknown dimension without a name
        helper.make_node("Reshape", ["m0", "flat"], ["f"]),
        helper.make_node(BLOCK_HADAMARD_QUANTIZE, ["f"], ["q1"], domain=DOMAIN, block_size=16, bits=8, symmetric=0),
        helper.make_node("Shape", ["q1"], ["s1"]),
        helper.make_node("Reshape", ["q1", "s1"], ["Y"]),
    ]
    w = np.eye(C, dtype=np.float32)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, [C, C], w.ravel()),
                     helper.make_tensor("flat", TensorProto.INT64, [2], [-1, C])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
                              functions=[block_hadamard_quantize_function(16, 8, False)])
    model.ir_version = 10
    x = random_input(rng_for("unknown-dims"), (2, 5, C), 16, np.float32)
    y, y_fn = run_both(model, x, library)
    assert y.shape == y_fn.shape == (10, C)
    np.testing.assert_allclose(y, y_fn, rtol=1e-5, atol=0.02 * np.abs(y_fn).max())


# ------------------------------------------------------------------------------------------------
# kernels against the numpy reference (models without function bodies: library only)

@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block", BLOCKS)
def test_block_hadamard_vs_numpy(library, block, dtype):
    rng = rng_for("bh", block, dtype.__name__)
    for rank in (1, 2, 3, 4):
        channels = block * int(rng.integers(1, 5 if block < 512 else 3))
        shape = random_shape(rng, rank, channels)
        x = random_input(rng, shape, block, dtype)
        sess = make_session(node_model(BLOCK_HADAMARD, rank, channels, dtype, block_size=block), library)
        y = run_poisoned(sess, x)
        assert y.dtype == dtype and y.shape == x.shape
        ref = ref_rotate(x, block)
        if dtype == np.float32:
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * max(np.abs(ref).max(), 1e-30))
        else:  # one float16 rounding of a float32 result
            atol = max(2.0 ** -24, 1e-6 * np.abs(ref).max())
            assert (np.abs(y.astype(np.float64) - ref) <= 2.0 ** -10 * np.abs(ref) + atol).all()


@pytest.mark.parametrize("bits,symmetric", QUANT, ids=[f"{b}bit-{'sym' if s else 'asym'}" for b, s in QUANT])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block", BLOCKS)
def test_block_hadamard_quantize_vs_numpy(library, block, dtype, bits, symmetric):
    rng = rng_for("bhq", block, dtype.__name__, bits, symmetric)
    for rank in (1, 2, 3, 4):
        channels = block * int(rng.integers(1, 5 if block < 512 else 3))
        shape = random_shape(rng, rank, channels)
        x = random_input(rng, shape, block, dtype)
        model = node_model(BLOCK_HADAMARD_QUANTIZE, rank, channels, dtype, block_size=block, bits=bits,
                           symmetric=symmetric)
        sess = make_session(model, library)
        y = run_poisoned(sess, x)
        assert y.dtype == dtype and y.shape == x.shape
        r_ref = ref_rotate(x, block).astype(np.float32)
        check_codes(y, r_ref, bits, symmetric, grid_tol=1e-3 if dtype == np.float32 else 0.25)
        # exact rotations: bit-identical to the reference, rounding ties included
        if block in POWERS_OF_FOUR:
            xd = dyadic_input(rng, shape, dtype)
            yd = run_poisoned(sess, xd)
            ref = ref_qdq(ref_rotate(xd, block).astype(np.float32), bits, symmetric)[0].astype(dtype)
            assert_same_bits(yd, ref)


@pytest.mark.parametrize("op_type", [BLOCK_HADAMARD, BLOCK_HADAMARD_QUANTIZE])
def test_large_tensor_threads_and_streaming(library, op_type):
    """An output over 16 MiB (streaming stores) split over the thread pool, on 1 and 2 threads."""
    block, channels, shape = 128, 8192, (1, 520, 8192)
    attrs = dict(bits=4, symmetric=0) if op_type == BLOCK_HADAMARD_QUANTIZE else {}
    model = node_model(op_type, 3, channels, np.float32, block_size=block, **attrs)
    x = random_input(rng_for("large", op_type), shape, block, np.float32)
    y1 = run_poisoned(make_session(model, library, threads=1), x)
    y2 = run_poisoned(make_session(model, library, threads=2), x)
    assert_same_bits(y1, y2)
    r_ref = ref_rotate(x, block)
    if attrs:
        check_codes(y2, r_ref.astype(np.float32), **attrs)
    else:
        np.testing.assert_allclose(y2, r_ref, rtol=1e-5, atol=1e-6 * np.abs(r_ref).max())


def test_empty_and_single_block(library):
    sess = make_session(node_model(BLOCK_HADAMARD_QUANTIZE, 2, 8, block_size=8, bits=8, symmetric=1), library)
    y = sess.run(None, {"X": np.zeros((0, 8), np.float32)})[0]
    assert y.shape == (0, 8)
    x = np.array([[1, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    y = sess.run(None, {"X": x})[0]  # rotation of e_0: all 1/sqrt(8), one code (127) for all
    np.testing.assert_array_equal(y, np.full((1, 8), np.float32(1 / np.sqrt(8)) / 127 * 127, np.float32))


@pytest.mark.parametrize("attrs,message", [
    (dict(block_size=3), "power of two"),
    (dict(block_size=2048), "power of two"),
    (dict(block_size=16, bits=5, symmetric=0), "bits must be 4 or 8"),
    (dict(block_size=16, bits=8, symmetric=2), "symmetric must be 0 or 1"),
    (dict(block_size=16, bits=8), "symmetric"),
])
def test_invalid_attributes_are_refused(library, attrs, message):
    op = BLOCK_HADAMARD_QUANTIZE if "bits" in attrs else BLOCK_HADAMARD
    with pytest.raises(Exception, match=message):
        sess = make_session(node_model(op, 2, 48, **attrs), library)
        sess.run(None, {"X": np.ones((2, 48), np.float32)})


def test_channels_not_multiple_of_block(library):
    sess = make_session(node_model(BLOCK_HADAMARD, 2, 24, block_size=16), library)
    with pytest.raises(Exception, match="not a multiple of block_size"):
        sess.run(None, {"X": np.ones((2, 24), np.float32)})


def test_portable_build_gives_identical_bits(library, tmp_path_factory):
    """The portable code paths (no -march=native: scalar loops and float16 conversions instead of
    AVX2/F16C; no CUDA) compute bit-identical outputs."""
    cache = (ops.BUILD_DIR / "CMakeCache.txt").read_text()
    include = next(line.split("=", 1)[1] for line in cache.splitlines() if line.startswith("ORT_INCLUDE_DIR:"))
    build = tmp_path_factory.mktemp("portable-build")
    cmake = shutil.which("cmake")
    for cmd in ([cmake, "-S", str(ops.SOURCE_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DPERQ_OPS_NATIVE=OFF", "-DPERQ_OPS_CUDA=OFF", f"-DORT_INCLUDE_DIR={include}"],
                [cmake, "--build", str(build), "-j", os.environ.get("PERQ_OPS_JOBS", "2")]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    portable = next(build.glob("*perq_ops*.so")) if sys.platform.startswith("linux") else \
        next(p for p in build.rglob("*perq_ops*") if p.suffix in (".so", ".dylib", ".dll"))
    configs = [(BLOCK_HADAMARD, {})] + [(BLOCK_HADAMARD_QUANTIZE, dict(bits=b, symmetric=s)) for b, s in QUANT]
    for block, dtype, (op_type, attrs) in itertools.product(BLOCKS, [np.float32, np.float16], configs):
        rng = rng_for("portable", block, dtype.__name__, op_type, tuple(attrs.items()))
        channels = block * int(rng.integers(1, 4))
        model = node_model(op_type, 3, channels, dtype, block_size=block, **attrs)
        x = random_input(rng, (2, 7, channels), block, dtype)
        y_native = run_poisoned(make_session(model, library), x)
        y_portable = run_poisoned(make_session(model, portable), x)
        assert_same_bits(y_native, y_portable)


# ------------------------------------------------------------------------------------------------
# library vs the function bodies (the same single_op_model with and without the library)

def run_both(model, x, library):
    with_lib = make_session(model, library).run(None, {"X": x})[0]
    without = make_session(model, library, with_library=False).run(None, {"X": x})[0]
    return with_lib, without


@pytest.mark.parametrize("block", BLOCKS)
def test_block_hadamard_matches_function_body(library, block):
    rng = rng_for("fn-bh", block)
    channels = block * int(rng.integers(1, 5 if block < 512 else 3))
    model = single_op_model(BLOCK_HADAMARD, channels, block_size=block)
    for _ in range(2):
        x = random_input(rng, (2, int(rng.integers(1, 40)), channels), block, np.float32)
        y, y_fn = run_both(model, x, library)
        np.testing.assert_allclose(y, y_fn, rtol=1e-5, atol=1e-5 * max(np.abs(y_fn).max(), 1e-30))
    xd = dyadic_input(rng, (2, 7, channels))
    y, y_fn = run_both(model, xd, library)
    if block in POWERS_OF_FOUR:
        assert_same_bits(y, y_fn)
    else:
        np.testing.assert_allclose(y, y_fn, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,symmetric", QUANT, ids=[f"{b}bit-{'sym' if s else 'asym'}" for b, s in QUANT])
@pytest.mark.parametrize("block", BLOCKS)
def test_block_hadamard_quantize_matches_function_body(library, block, bits, symmetric):
    rng = rng_for("fn-bhq", block, bits, symmetric)
    channels = block * int(rng.integers(1, 5 if block < 512 else 3))
    model = single_op_model(BLOCK_HADAMARD_QUANTIZE, channels, block_size=block, bits=bits, symmetric=symmetric)
    x = random_input(rng, (2, int(rng.integers(1, 40)), channels), block, np.float32)
    y, y_fn = run_both(model, x, library)
    r_ref = ref_rotate(x, block).astype(np.float32)
    check_codes(y, r_ref, bits, symmetric)
    check_codes(y_fn, r_ref, bits, symmetric)  # the function body passes the same test
    same = np.isclose(y, y_fn, rtol=1e-5, atol=0)
    _, _, _, scale, _ = ref_qdq(r_ref, bits, symmetric)
    step_apart = np.isclose(np.abs(y - y_fn), np.broadcast_to(scale, y.shape), rtol=1e-4)
    assert (same | step_apart).all(), "outputs differ by other than one code step"
    assert (~same).mean() <= 2 * TIE_TOL
    if block in POWERS_OF_FOUR:  # exact rotations: identical outputs, ties included
        xd = dyadic_input(rng, (2, 9, channels))
        y, y_fn = run_both(model, xd, library)
        assert_same_bits(y, y_fn)


# ------------------------------------------------------------------------------------------------
# CUDA execution provider (only where onnxruntime has one and the library has CUDA kernels)

cuda_ep = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                             reason="onnxruntime has no CUDA execution provider here")


@cuda_ep
@pytest.mark.parametrize("op_type,attrs", [(BLOCK_HADAMARD, {})] + [
    (BLOCK_HADAMARD_QUANTIZE, dict(bits=b, symmetric=s)) for b, s in QUANT])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_cuda_kernels_match_cpu(library, op_type, attrs, dtype):
    if not ops.cuda_available():
        pytest.fail("onnxruntime has a CUDA execution provider but the library was built without CUDA")
    for block, channels in itertools.product([2, 16, 64, 128, 1024], [1024, 16384]):
        rng = rng_for("cuda", op_type, block, channels, dtype.__name__, tuple(attrs.items()))
        model = node_model(op_type, 3, channels, dtype, block_size=block, **attrs)
        x = random_input(rng, (2, 33, channels), block, dtype)
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(library))
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        y = sess.run(None, {"X": x})[0]
        r_ref = ref_rotate(x, block)
        if attrs:
            check_codes(y, r_ref.astype(np.float32), grid_tol=1e-3 if dtype == np.float32 else 0.25, **attrs)
        elif dtype == np.float32:
            np.testing.assert_allclose(y, r_ref, rtol=1e-5, atol=1e-6 * np.abs(r_ref).max())
        else:
            atol = max(2.0 ** -24, 1e-6 * np.abs(r_ref).max())
            assert (np.abs(y.astype(np.float64) - r_ref) <= 2.0 ** -10 * np.abs(r_ref) + atol).all()


# ------------------------------------------------------------------------------------------------
# BlockHadamardQuantizeFP4: the FP4 quantize-dequantize of the library's own rotation must equal
# the numpy reference (perq_onnx.formats) bit for bit, for every block size; with exact rotations
# (dyadic inputs, b a power of 4) the function body's output too.

FP4_FORMATS = ["nvfp4", "mxfp4"]


def fp4_case(rng, fmt_name, channels, rows=40, dtype=np.float32):
    """(input, attributes, numpy format): normal data at a random scale with special rows: zeros,
    values tiny enough for subnormal E4M3 scales, and an outlier; NVFP4's tensor scale from the
    data's amax as calibration sets it, or 64x smaller so that block scales saturate at 448."""
    x = rng.standard_normal((2, rows, channels)) * rng.choice([1e-3, 1.0, 20.0])
    flat = x.reshape(-1, channels)
    flat[0] = 0.0
    flat[1] *= 1e-6
    flat[2, rng.integers(channels)] *= 1000.0
    x = x.astype(dtype)
    if fmt_name == "mxfp4":
        return x, {"format": "mxfp4"}, MXFP4()
    amax = float(np.abs(x.astype(np.float32)).max()) / rng.choice([1.0, 64.0])
    fmt = NVFP4.from_amax(amax)
    return x, {"format": "nvfp4", "tensor_scale": float(fmt.tensor_scale)}, fmt


def fp4_reference(rotated, fmt):
    """The numpy reference on float32 rotated values, cast back to their type."""
    return fmt.qdq(rotated.astype(np.float32)).astype(rotated.dtype)


def assert_same_fp4(y, reference):
    """Bit for bit, except the sign of zero: a block whose scale rounds to zero gives the
    reference +0, and the kernel (like the function body) code * 0, which is -0 for a negative x."""
    zero = np.zeros((), y.dtype)
    assert_same_bits(y + zero, reference + zero)


def rotate_and_fp4(x, block, attrs, library, providers=("CPUExecutionProvider",)):
    """(BlockHadamard(x), BlockHadamardQuantizeFP4(x)), both run by the library on ``providers``."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library))
    outs = []
    for op_type, extra in ((BLOCK_HADAMARD, {}), (BLOCK_HADAMARD_QUANTIZE_FP4, attrs)):
        model = node_model(op_type, 3, x.shape[-1], x.dtype.type, block_size=block, **extra)
        outs.append(ort.InferenceSession(model.SerializeToString(), so, providers=list(providers)).run(None, {"X": x})[0])
    return outs


@pytest.mark.parametrize("fmt_name", FP4_FORMATS)
@pytest.mark.parametrize("block", BLOCKS)
def test_block_hadamard_quantize_fp4_vs_numpy(library, block, fmt_name):
    rng = rng_for("fp4", block, fmt_name)
    channels = max(block, 32) * int(rng.integers(1, 4))
    x, attrs, fmt = fp4_case(rng, fmt_name, channels)
    rotated, y = rotate_and_fp4(x, block, attrs, library)
    assert_same_fp4(y, fp4_reference(rotated, fmt))
    if fmt_name == "nvfp4":  # block scales saturate at 448 when the tensor scale is too small
        assert np.abs(y).max() <= 6 * 448 * fmt.tensor_scale * (1 + 1e-6)


@pytest.mark.parametrize("fmt_name", FP4_FORMATS)
@pytest.mark.parametrize("block", POWERS_OF_FOUR)
def test_block_hadamard_quantize_fp4_float16(library, block, fmt_name):
    """float16 in and out, computed in float32 and rounded once: exact rotations (dyadic inputs)
    so that the float32 reference sees the kernel's rotated values."""
    rng = rng_for("fp4-fp16", block, fmt_name)
    channels = max(block, 32) * 2
    _, attrs, fmt = fp4_case(rng, fmt_name, channels)
    x = dyadic_input(rng, (2, 9, channels), np.float16)
    model = node_model(BLOCK_HADAMARD_QUANTIZE_FP4, 3, channels, np.float16, block_size=block, **attrs)
    y = run_poisoned(make_session(model, library), x)
    assert_same_fp4(y, fp4_reference(ref_rotate(x, block).astype(np.float32), fmt).astype(np.float16))


@pytest.mark.parametrize("fmt_name", FP4_FORMATS)
@pytest.mark.parametrize("block", POWERS_OF_FOUR)
def test_block_hadamard_quantize_fp4_matches_function_body(library, block, fmt_name):
    """Exact rotations: the kernel and the model-local body give the same bits (NVFP4's
    tensor_scale reaches the body through its attribute reference)."""
    rng = rng_for("fn-fp4", block, fmt_name)
    channels = max(block, 32) * 2
    _, attrs, fmt = fp4_case(rng, fmt_name, channels)
    model = single_op_model(BLOCK_HADAMARD_QUANTIZE_FP4, channels, block_size=block, **attrs)
    x = dyadic_input(rng, (2, 9, channels)) * np.float32(rng.choice([1e-4, 1.0, 300.0]))
    y, y_fn = run_both(model, x, library)
    assert_same_fp4(y, y_fn)  # the body's MatMul can give -0 where the butterfly gives +0
    assert_same_fp4(y, fp4_reference(ref_rotate(x, block).astype(np.float32), fmt))


@pytest.mark.parametrize("attrs,channels,message", [
    (dict(format="int4"), 64, "format must be nvfp4 or mxfp4"),
    (dict(), 64, "missing string attribute 'format'"),
    (dict(format="nvfp4"), 64, "needs the float attribute 'tensor_scale'"),
    (dict(format="nvfp4", tensor_scale=0.0), 64, "tensor_scale must be positive"),
    (dict(format="mxfp4"), 48, "not a multiple of the format's block 32"),
])
def test_invalid_fp4_attributes_are_refused(library, attrs, channels, message):
    with pytest.raises(Exception, match=message):
        sess = make_session(node_model(BLOCK_HADAMARD_QUANTIZE_FP4, 2, channels, block_size=16, **attrs), library)
        sess.run(None, {"X": np.ones((2, channels), np.float32)})


@cuda_ep
@pytest.mark.parametrize("fmt_name", FP4_FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_cuda_fp4_kernel_matches_numpy(library, fmt_name, dtype):
    """On the GPU the FP4 op quantizes the GPU's own rotation exactly as the numpy reference does,
    including rows longer than one shared-memory tile (16384 channels)."""
    if not ops.cuda_available():
        pytest.fail("onnxruntime has a CUDA execution provider but the library was built without CUDA")
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    blocks = [2, 16, 32, 128, 1024] if dtype == np.float32 else POWERS_OF_FOUR
    for block, channels in itertools.product(blocks, [1024, 16384]):
        rng = rng_for("cuda-fp4", fmt_name, dtype.__name__, block, channels)
        x, attrs, fmt = fp4_case(rng, fmt_name, channels, rows=33)
        if dtype == np.float16:  # float16 holds no float32 rotation: exact ones, of dyadic inputs
            x = dyadic_input(rng, x.shape, np.float16)
            y = rotate_and_fp4(x, block, attrs, library, providers)[1]
            reference = fp4_reference(ref_rotate(x, block).astype(np.float32), fmt).astype(np.float16)
            assert_same_fp4(y, reference)
            continue
        rotated, y = rotate_and_fp4(x, block, attrs, library, providers)
        assert_same_fp4(y, fp4_reference(rotated, fmt))
        rotated_cpu = rotate_and_fp4(x, block, attrs, library)[0]
        np.testing.assert_allclose(rotated, rotated_cpu, rtol=1e-5, atol=1e-6 * float(np.abs(rotated_cpu).max()))
