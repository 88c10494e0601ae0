"""The perq custom-op library: build it, find it, and open onnxruntime sessions with it.

The library (runtime_ops/, C++ with CUDA kernels when nvcc is present) implements
``perq.BlockHadamard`` and ``perq.BlockHadamardQuantize`` as onnxruntime kernels. Models do not
need it (every perq node carries a model-local function made of standard ops); registering it
replaces those function bodies by the fast kernels.

    from perq_onnx import ops
    ops.build_library()                 # once: cmake configure + build into runtime_ops/build/
    sess = ops.session("model.onnx")    # an InferenceSession with the library registered
"""
from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import subprocess
import sys

from .errors import PerqError

SOURCE_DIR = pathlib.Path(__file__).resolve().parent.parent / "runtime_ops"
BUILD_DIR = SOURCE_DIR / "build"
LIBRARY_ENV = "PERQ_OPS_LIBRARY"


def _library_name() -> str:
    if sys.platform == "win32":
        return "perq_ops.dll"
    if sys.platform == "darwin":
        return "libperq_ops.dylib"
    return "libperq_ops.so"


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() or "fatal" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"


def _run(cmd: list[str], verbose: bool) -> tuple[int, str]:
    """Run cmd; echo its output when verbose; return (exit code, output)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as exc:
        return 127, str(exc)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if verbose:
            sys.stdout.write(line)
            sys.stdout.flush()
    return proc.wait(), "".join(lines)


def build_library(verbose: bool = True) -> pathlib.Path:
    """Configure and build runtime_ops/ into runtime_ops/build/ (Release; CUDA kernels when nvcc
    is found); return the library's path. The onnxruntime headers are fetched at configure time
    (npm package com.github.asus4.onnxruntime) unless ORT_INCLUDE_DIR names a directory holding
    onnxruntime_c_api.h. Parallel jobs: PERQ_OPS_JOBS (default 2). Raises PerqError on failure."""
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        raise PerqError(f"{SOURCE_DIR}: no CMakeLists.txt (the op library's sources are missing)")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise PerqError("cmake not found on PATH: install CMake >= 3.18 and a C++17 compiler to build the op library")
    configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release"]
    if os.environ.get("ORT_INCLUDE_DIR"):
        configure.append(f"-DORT_INCLUDE_DIR={os.environ['ORT_INCLUDE_DIR']}")
    jobs = os.environ.get("PERQ_OPS_JOBS", "2")
    build = [cmake, "--build", str(BUILD_DIR), "--config", "Release", "-j", jobs]
    for step, cmd in (("configure", configure), ("build", build)):
        code, output = _run(cmd, verbose)
        if code != 0:
            raise PerqError(f"op library {step} failed (cmake exit {code}): {_last_error_line(output)}")
    path = BUILD_DIR / _library_name()
    if not path.is_file():
        candidates = sorted(BUILD_DIR.rglob(_library_name()))
        if not candidates:
            raise PerqError(f"op library build produced no {_library_name()} under {BUILD_DIR}")
        path = candidates[0]
    return path


def library_path() -> pathlib.Path:
    """The built library: $PERQ_OPS_LIBRARY if set, else runtime_ops/build/<lib>."""
    env = os.environ.get(LIBRARY_ENV)
    if env:
        path = pathlib.Path(env)
        if not path.is_file():
            raise PerqError(f"{LIBRARY_ENV}={env}: no such file")
        return path
    path = BUILD_DIR / _library_name()
    if not path.is_file():
        raise PerqError(f"{path}: the perq op library is not built; run `perq-onnx build-ops`")
    return path


def cuda_available() -> bool:
    """True when the built library holds the CUDA kernels (it was compiled with nvcc). Says
    nothing about whether a GPU or onnxruntime's CUDA execution provider is present."""
    lib = ctypes.CDLL(str(library_path()))
    fn = getattr(lib, "perq_ops_has_cuda", None)
    if fn is None:
        return False
    fn.restype = ctypes.c_int
    return bool(fn())


def session_options(options=None):
    """onnxruntime.SessionOptions (the given ones, or new) with the op library registered."""
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    try:
        so.register_custom_ops_library(str(library_path()))
    except Exception as exc:  # onnxruntime raises its own exception types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PerqError(f"{library_path()}: onnxruntime could not register the op library ({reason})") from None
    return so


def session(model, providers=None, sess_options=None, **kwargs):
    """An onnxruntime.InferenceSession of `model` (a path, serialized bytes or an onnx.ModelProto)
    with the op library registered. providers defaults to ["CPUExecutionProvider"]; other keyword
    arguments go to InferenceSession (provider_options, ...)."""
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, pathlib.PurePath):
        model = str(model)
    so = session_options(sess_options)
    return ort.InferenceSession(model, sess_options=so, providers=providers or ["CPUExecutionProvider"], **kwargs)
