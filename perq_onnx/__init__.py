"""perq-onnx: PeRQ (permute, rotate, then quantize) for transformer LLMs exported to ONNX."""

__version__ = "0.1.0"
