"""perq_onnx.rotation_choice: the weight-only proxy that decides whether R1 / R2 / R3 pay.

The proxy computes the rotated side from Hessians of the *unrotated* graph; the first test checks
that algebra against the real thing: the same errors measured on the graph after the rotation
passes ran, with Hessians collected there."""
from __future__ import annotations

import numpy as np
import pytest

from perq_onnx import rotation_choice
from perq_onnx.analysis import analyze
from perq_onnx.calibration import Calibrator
from perq_onnx.graph import load_graph
from perq_onnx.passes.base import Context, PassManager
from perq_onnx.pipeline import float_passes, optimize
from perq_onnx.plan import ModelShape, make_plan
from perq_onnx.rounding import WeightQuant
from perq_onnx.settings import Settings
from perq_onnx.weights import WeightStore

from handmade import build_decoder

CALIB = dict(calib_samples=2, seq_len=32)


def _context(path, tmp_path, batches):
    graph = load_graph(path)
    tmp_path.mkdir()
    ctx = Context(graph, analyze(graph), WeightStore(tmp_path))
    ctx.calibrator = Calibrator(batches, progress=False)
    return ctx


def _measured(ctx, settings, form, kinds) -> float:
    """Sum of tr(dW^T H dW) over the layers' linears of `kinds`, Hessians from the graph as it is."""
    total = 0.0
    for layer in ctx.structure.layers:
        linears = [getattr(layer, k) for k in kinds]
        hessians = ctx.collect({ctx.node(lin.name).inputs[0].name: "xtx" for lin in linears})
        for lin in linears:
            h = hessians[ctx.node(lin.name).inputs[0].name]
            total += rotation_choice.rounding_error(ctx.weight(lin), h, form, settings)
    return total


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_proxy_equals_the_error_on_the_rotated_graph(tmp_path, rounding):
    path = build_decoder(tmp_path / "model.onnx")
    batches = np.random.default_rng(0).integers(0, 64, size=(4, 32))
    settings = Settings.parse(target="simulate", a_bits=16, rounding=rounding, w_clip="absmax", block="none",
                              permute="none")
    form = WeightQuant(4, None, True, "absmax", True)
    plan = make_plan(settings.replace(residual_rotation="full", block=16, permute="random"),
                     ModelShape.of(analyze(load_graph(path))))
    ctx = _context(path, tmp_path / "a", batches)
    errors = rotation_choice.weight_errors(ctx, settings, form, plan.residual, plan.heads,
                                           lambda layer: rotation_choice.down_input_transform(plan, layer.index),
                                           progress=False)

    all_kinds = ("q", "k", "v", "o", "gate", "up", "down")
    passes = float_passes(plan)  # FoldNormGammas, RotateResidual, RotateHeads, PermuteMLP, InsertOnlineRotation
    assert [p.name for p in passes[3:]] == ["PermuteMLP", "InsertOnlineRotation"]
    for name, kinds, passes in (("R1", all_kinds, passes[:2]), ("R2", ("v", "o"), passes[2:3]),
                                ("R3", ("down",), passes[3:])):
        plain = _context(path, tmp_path / f"{name}-plain", batches)
        rotated = _context(path, tmp_path / f"{name}-rotated", batches)
        PassManager(passes, False).run(rotated)
        off, on = errors[name]
        assert off == pytest.approx(_measured(plain, settings, form, kinds), rel=1e-6)
        assert on == pytest.approx(_measured(rotated, settings, form, kinds), rel=1e-3)
        assert on != pytest.approx(off, rel=1e-3)  # the rotation changes the error: the test can fail


def test_pipeline_chooses_only_unset_rotations_of_weight_only_settings(tmp_path):
    path = build_decoder(tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"
    report = optimize(path, out, Settings.parse(target="simulate", a_bits=16, w_clip="act", **CALIB), progress=False)
    lines = [s for s in report.summaries if s.startswith("weight-only:")]
    assert [line.split()[1] for line in lines] == ["R1", "R2", "R3"]
    for line in lines:  # what it chose is what the output was built with
        name, verdict = line.split()[1], "kept" if " kept (" in line else "off"
        pass_name = {"R1": "RotateResidual", "R2": "RotateHeads", "R3": "InsertOnlineRotation"}[name]
        applied = any(s.startswith(pass_name) for s in report.summaries)
        assert applied == (verdict == "kept"), line
    explicit = optimize(path, out, Settings.parse(target="simulate", a_bits=16, w_clip="act", residual_rotation="full",
                                                  head_rotation=True, block=16, **CALIB), progress=False)
    assert not [s for s in explicit.summaries if s.startswith("weight-only:")]
    w4a4 = optimize(path, out, Settings.parse(target="simulate", **CALIB), progress=False)
    assert not [s for s in w4a4.summaries if s.startswith("weight-only:")]
    gptq = optimize(path, out, Settings.parse(target="ort", **CALIB), progress=False)  # GPTQ keeps them
    assert not [s for s in gptq.summaries if s.startswith("weight-only:")]
    assert any(s.startswith("RotateResidual") for s in gptq.summaries)


def test_weight_only_gptq_takes_the_online_residual_rotation_by_default(tmp_path):
    """simulate and ort weight-only GPTQ builds default to the online R1 (no gamma fold), said in the
    report; an explicit --residual-rotation full folds R1 as before; W4A4 keeps the folded R1."""
    path = build_decoder(tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"

    def residual_passes(**options):
        report = optimize(path, out, Settings.parse(**CALIB, **options), progress=False)
        return [s.split(":")[0] for s in report.summaries if s.startswith("RotateResidual")], report.summaries

    for options in (dict(target="ort"), dict(target="simulate", a_bits=16, rounding="gptq")):
        applied, summaries = residual_passes(**options)
        assert applied == ["RotateResidualOnline"], options
        assert any("residual rotation online by default" in s for s in summaries)
    assert residual_passes(target="ort", residual_rotation="full")[0] == ["RotateResidual"]
    assert residual_passes(target="simulate")[0] == ["RotateResidual"]


def test_a_rotation_needs_a_clear_proxy_gain_to_stay(tmp_path, monkeypatch):
    """Kept only where the proxy's error falls below KEEP_BELOW (0.95) of the unrotated one: x0.97
    is within the proxy's error against the loss (SmolLM2 block 128: R2 at x0.97 cost 2.5%)."""
    path = build_decoder(tmp_path / "model.onnx")
    ratios = {"R1": 1.20, "R2": 0.97, "R3": 0.90}
    monkeypatch.setattr(rotation_choice, "weight_errors",
                        lambda *args, **kwargs: {name: (1.0, r) for name, r in ratios.items()})
    report = optimize(path, tmp_path / "out.onnx", Settings.parse(target="simulate", a_bits=16, w_clip="act", **CALIB),
                      progress=False)
    verdicts = {line.split()[1]: "kept" if " kept (" in line else "off"
                for line in report.summaries if line.startswith("weight-only:")}
    assert verdicts == {"R1": "off", "R2": "off", "R3": "kept"}
    assert not any(s.startswith("RotateHeads") for s in report.summaries)
    assert any(s.startswith("InsertOnlineRotation") for s in report.summaries)
