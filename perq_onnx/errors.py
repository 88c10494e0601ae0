"""perq-onnx's two error types: PerqError for what the user can fix (the CLI prints its message
on one line and exits 2), InternalError for a broken invariant of perq-onnx itself (a bug: the
CLI says so, names the pass, and exits 3)."""


class PerqError(Exception):
    """A user-facing error: the message names the file, node or option and the reason."""


class InternalError(Exception):
    """perq-onnx broke one of its own contracts (e.g. a pass's pre- or postcondition)."""
