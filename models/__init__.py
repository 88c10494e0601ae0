"""Model recipes: a name the CLI accepts in place of an .onnx path, built and cached on first use.

``resolve("smollm2")`` builds (once) and returns the fp32 ONNX export of SmolLM2-135M-Instruct
(``"smollm2-with-past"``: the export with KV-cache inputs and outputs, for generation);
``"gemma3-270m"`` / ``"gemma3-270m-with-past"`` likewise for Gemma 3 270M (``gemma3.py``);
``resolve("path/to/model.onnx")`` returns that path unchanged. Both recipes are declarations of
``gguf_recipe.GGUFRecipe`` (the shared GGUF -> Hugging Face -> ONNX steps and cache layout). ``tiny`` holds the random-weight
test models (not a recipe: they are exported into a directory the caller chooses).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from perq_onnx.errors import PerqError

RECIPES = ("smollm2", "smollm2-with-past", "gemma3-270m", "gemma3-270m-with-past")


def resolve(name_or_path: str) -> Path:
    """An existing ``.onnx`` file as given, or the built ``model.onnx`` of a recipe name."""
    arg = str(name_or_path)
    path = Path(arg).expanduser()
    if path.suffix.lower() == ".onnx":
        if path.is_file():
            return path
        raise PerqError(f"model {arg!r}: no such ONNX file")
    if arg in RECIPES and arg.startswith("gemma3-270m"):
        from perq_onnx.models import gemma3

        return gemma3.onnx_path(with_past=arg.endswith("-with-past"))
    if arg in RECIPES:
        from perq_onnx.models import smollm2

        return smollm2.onnx_path(with_past=arg.endswith("-with-past"))
    if path.is_dir() and (path / "model.onnx").is_file():
        hint = f" (did you mean {path / 'model.onnx'}?)"
    elif path.exists():
        hint = " (it exists but is not an .onnx file)"
    else:
        hint = ""
    raise PerqError(
        f"model {arg!r} is neither an existing .onnx file nor a recipe name "
        f"({', '.join(RECIPES)}){hint}"
    )


@contextlib.contextmanager
def quiet_export():
    """Hide the warnings, info logs and progress bars of transformers/optimum/torch.onnx."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from optimum.utils import logging as opt_logging
    except ImportError:  # pragma: no cover
        opt_logging = None
    opt_verbosity = opt_logging.get_verbosity() if opt_logging else None
    if opt_logging:
        opt_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if opt_logging:
            opt_logging.set_verbosity(opt_verbosity)
