"""The one error type perq-onnx raises for anything it refuses: the CLI prints its message on
one line and exits non-zero."""


class PerqError(Exception):
    """A user-facing error: the message names the file, node or option and the reason."""
