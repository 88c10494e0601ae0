"""onnxruntime's own INT4 weight quantizer, run as the peer baseline of the benchmarks (never a
dependency of perq-onnx itself)."""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import onnx

from perq_onnx import pipeline

PEER_CONFIGS = ("rtn-sym", "rtn-asym", "hqq")


def peer_quantize(src: pathlib.Path, dst: pathlib.Path, block: int, acc: int, config: str = "rtn-sym",
                  exclude: tuple[str, ...] = ()) -> None:
    """onnxruntime's own MatMulNBitsQuantizer on every MatMul with a constant weight except the
    nodes named in `exclude`. config: "rtn-sym" (its default algorithm, DefaultWeightOnlyQuantConfig,
    symmetric), "rtn-asym" (the same with zero points) or "hqq" (HQQWeightOnlyQuantConfig:
    asymmetric, float zero points, no accuracy_level attribute, i.e. level 0)."""
    import logging
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)
    if config not in PEER_CONFIGS:
        raise ValueError(f"peer config {config!r}: choose from {', '.join(PEER_CONFIGS)}")
    symmetric = config == "rtn-sym"
    if config == "hqq":
        cfg = HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    else:
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, accuracy_level=acc or None,
                                           quant_format=QuantFormat.QOperator, bits=4)
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block, is_symmetric=symmetric, accuracy_level=acc or None,
                             nodes_to_exclude=list(exclude), algo_config=cfg)
    q.process()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".peer-") as tmp:
        staged = pathlib.Path(tmp) / dst.name
        q.model.save_model_to_file(str(staged), use_external_data_format=True)
        for f in sorted(pathlib.Path(tmp).iterdir(), key=lambda p: p.name == dst.name):  # model file last
            os.replace(f, dst.parent / f.name)
    for name in pipeline.SIDECAR_FILES:  # so that the directory is a complete model directory
        if (src.parent / name).is_file() and not (dst.parent / name).exists():
            shutil.copyfile(src.parent / name, dst.parent / name)
