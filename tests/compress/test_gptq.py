"""GPTQ: codes on each group's grid, error feedback that cuts the layer's output error on the
calibration inputs, on a uniform grid or the weighted BCQ one, and compress.quantize choosing GPTQ
on the BCQ grid when calibration batches are given; BCQ weighted by the calibration inputs' energy
per column."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress.lowbit as lowbit
from fxpress.compress import quantize
from fxpress.compress.gptq import gptq


def _correlated_inputs(rows: int, features: int, seed: int, mix_seed: int = 0) -> torch.Tensor:
    """Samples (``seed``) of one distribution (``mix_seed``) whose features are strongly correlated."""
    mix = torch.randn(features, features, generator=torch.Generator().manual_seed(mix_seed))
    mix *= torch.logspace(0, -2, features)
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed)) @ mix


def test_without_correlations_each_weight_rounds_to_its_groups_grid():
    """With H = I no error reaches another column: every weight moves by at most half a step."""
    w = torch.randn(6, 70, generator=torch.Generator().manual_seed(0))
    q = gptq(w, torch.eye(70), bits=3, group_size=32)
    step = q.alpha[..., 0] * 2  # [out, groups]
    per_column = step.repeat_interleave(32, dim=1)[:, :70]
    assert ((q.dequantize() - w).abs() <= per_column / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_feedback_cuts_the_output_error_on_the_calibration_inputs(bits):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    x = _correlated_inputs(512, 96, seed=2)
    calibrated = gptq(w, x.T.double() @ x.double(), bits=bits, group_size=32)
    nearest = lowbit.rtn(w, bits, 32)
    error = lambda q: float(((q.dequantize() - w) @ x.T).norm())  # noqa: E731
    assert error(calibrated) < 0.8 * error(nearest)


def test_inputs_that_are_always_zero_do_not_break_it():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    x = _correlated_inputs(128, 64, seed=4)
    x[:, 10] = 0
    q = gptq(w, x.T @ x, bits=4, group_size=32)
    assert torch.isfinite(q.dequantize()).all()
    assert q.dequantize()[:, 10].abs().max() < 1e-6  # a weight no input reaches is dropped
    with pytest.raises(lowbit.QuantizeError, match=r"Gram matrix is \(63, 63\), the weight has 64 inputs"):
        gptq(w, torch.eye(63), bits=4, group_size=32)


def test_quantize_runs_gptq_when_asked_with_calibration_batches():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    batches = [_correlated_inputs(64, 64, seed=6 + i) for i in range(3)]
    calibrated = quantize(model, bits=3, group_size=32, method="gptq", calibration=batches)
    nearest = quantize(model, bits=3, group_size=32)
    x = _correlated_inputs(256, 64, seed=20)
    with torch.no_grad():
        error = lambda m: float((m(x) - model(x)).norm())  # noqa: E731
        assert error(calibrated.model) < error(nearest.model)
    with pytest.raises(lowbit.QuantizeError, match="GPTQ needs calibration batches"):
        quantize(model, bits=3, group_size=32, method="gptq")
    with pytest.raises(lowbit.QuantizeError, match="round-to-nearest does not use calibration"):
        quantize(model, bits=3, group_size=32, method="rtn", calibration=batches)


def test_the_result_tables_each_layer_with_its_output_error_on_the_calibration_inputs():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    batches = [_correlated_inputs(64, 64, seed=8 + i) for i in range(2)]
    result = quantize(model, bits=3, group_size=32, calibration=batches)
    x = torch.cat(batches).double()
    layer = result.model[0]
    q = torch.ops.fxpress.dequantize_planes(layer.planes, layer.alpha, layer.beta, 64, 32, layer.offset).double()
    w = model[0].weight.detach().double()
    direct = float(((q - w) @ x.T).norm() / (w @ x.T).norm())
    assert result.output_errors["0"] == pytest.approx(direct, rel=1e-6)
    assert set(result.output_errors) == {"0", "2"} and 0 < result.output_errors["2"] < 1
    table = str(result).splitlines()
    assert table[1].split() == ["layer", "shape", "weight", "err", "output", "err"]
    assert table[2].split()[:2] == ["0", "64x32"] and table[3].split()[:2] == ["2", "32x16"]
    assert str(quantize(model, bits=3, group_size=32)).splitlines()[2].split()[-1] == "-"  # no calibration


def _weighted_error(q: lowbit.BitPlaneWeight, w: torch.Tensor, h: torch.Tensor) -> float:
    return float((((q.dequantize() - w) ** 2) * h).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_bcq_lowers_the_weighted_error_from_the_uniform_grid(bits):
    w = torch.randn(12, 200, generator=torch.Generator().manual_seed(9))  # a ragged last group
    h = torch.logspace(2, -2, 200)[torch.randperm(200, generator=torch.Generator().manual_seed(10))]
    weighted = lowbit.bcq(w, bits, 64, importance=h)
    plain = lowbit.bcq(w, bits, 64)
    start = lowbit.rtn(w, bits, 64)
    assert _weighted_error(weighted, w, h) < 0.95 * _weighted_error(start, w, h)
    assert _weighted_error(weighted, w, h) < _weighted_error(plain, w, h)
    # the same weight on every column is plain BCQ
    torch.testing.assert_close(lowbit.bcq(w, bits, 64, importance=torch.full((200,), 3.0)).dequantize(),
                               plain.dequantize())
    with pytest.raises(lowbit.QuantizeError, match="one per input column"):
        lowbit.bcq(w, bits, 64, importance=torch.ones(199))


def test_quantize_weights_bcq_by_the_calibration_inputs():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    batches = [_correlated_inputs(64, 64, seed=12 + i) for i in range(3)]
    weighted = quantize(model, bits=3, group_size=32, method="bcq", calibration=batches)
    plain = quantize(model, bits=3, group_size=32, method="bcq")
    x = _correlated_inputs(256, 64, seed=30)
    with torch.no_grad():
        error = lambda m: float((m(x) - model(x)).norm())  # noqa: E731
        assert error(weighted.model) < error(plain.model)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_on_the_bcq_grid_keeps_its_values_and_cuts_the_output_error(bits):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(13))
    x = _correlated_inputs(512, 96, seed=14)
    h = x.T.double() @ x.double()
    on_grid = gptq(w, h, bits=bits, group_size=32, grid="bcq")
    weighted = lowbit.bcq(w, bits, 32, importance=torch.diagonal(h))
    torch.testing.assert_close(on_grid.alpha, weighted.alpha)  # the grid is weighted BCQ's
    values = (weighted.beta.unsqueeze(-1) + weighted.alpha @ lowbit.sign_table(bits).T).repeat_interleave(32, 1)
    assert ((on_grid.dequantize().unsqueeze(-1) - values).abs().min(-1).values < 1e-5).all()  # every weight on it
    error = lambda q: float(((q.dequantize() - w) @ x.T).norm())  # noqa: E731
    assert error(on_grid) < 0.9 * error(weighted)
    with pytest.raises(lowbit.QuantizeError, match="grid='nf4'"):
        gptq(w, h, bits=bits, group_size=32, grid="nf4")


def test_quantize_with_batches_defaults_to_gptq_on_the_bcq_grid():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    batches = [_correlated_inputs(64, 64, seed=16 + i) for i in range(3)]
    default = quantize(model, bits=3, group_size=32, calibration=batches)
    explicit = quantize(model, bits=3, group_size=32, method="gptq-bcq", calibration=batches)
    assert torch.equal(default.model[0].planes, explicit.model[0].planes)
    assert not default.equalized  # no Llama-style layers to scale
    with pytest.raises(lowbit.QuantizeError, match="GPTQ needs calibration batches"):
        quantize(model, bits=3, group_size=32, method="gptq-bcq")
