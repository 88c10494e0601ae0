"""Deployment targets (see base.py): one file per target, registered here."""
from __future__ import annotations

from ..settings import TargetName
from .base import Target
from .genai import Genai
from .ort import Ort
from .simulate import Simulate
from .tensorrt import TensorRT

TARGETS: dict[TargetName, Target] = {TargetName.SIMULATE: Simulate(), TargetName.ORT: Ort(),
                                     TargetName.GENAI: Genai(), TargetName.TENSORRT: TensorRT()}


def target(name) -> Target:
    """The target for a TargetName, its string, or Settings (its ``target``)."""
    name = getattr(name, "target", name)
    return TARGETS[TargetName(name)]


__all__ = ["TARGETS", "Genai", "Ort", "Simulate", "Target", "TensorRT", "target"]
