"""Shared fixtures: tiny random-weight models exported by optimum, once per test session."""
from __future__ import annotations

import numpy as np
import pytest

from perq_onnx.models.tiny import export_tiny
from perq_onnx.runtime import logits, session

MODELS = [(arch, past, tied) for arch in ("llama", "mistral", "qwen2") for past in (False, True)
          for tied in (False, True)]


def model_id(m):
    arch, past, tied = m
    return f"{arch}-{'past' if past else 'nopast'}-{'tied' if tied else 'untied'}"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch="llama", past=False, tied=False):
        key = (arch, past, tied)
        if key not in cache:
            cache[key] = export_tiny(arch, root / model_id(key), with_past=past, tied=tied)
        return cache[key]
    return get


def family_id(model) -> str:
    """Test id of an (arch, past) pair."""
    return f"{model[0]}-{'past' if model[1] else 'nopast'}"


def family_exporter(root, tied: dict, extra=None):
    """get(arch, past=False): a tiny model of arch exported once into root (tied[arch]: tied
    embeddings); with `extra`, (path, extra(path)) computed once per model."""
    cache = {}

    def get(arch, past=False):
        if (arch, past) not in cache:
            path = export_tiny(arch, root / family_id((arch, past)), with_past=past, tied=tied[arch])
            cache[arch, past] = path if extra is None else (path, extra(path))
        return cache[arch, past]
    return get


def random_ids(vocab=512, batch=2, seq=24, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def relative_difference(a_path, b_path, ids) -> float:
    la, lb = logits(session(a_path), ids), logits(session(b_path), ids)
    return float(np.abs(la - lb).max() / np.abs(la).max())
