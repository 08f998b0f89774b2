"""compress.svd's measured rank allocation (params_kept with calibration): it meets the global
budget, spends it where the model's output is sensitive, and says what it chose."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxpress.compress import svd
from tests.tiny_models import tiny_llama, token_ids


def _sensitive_then_cheap() -> nn.Sequential:
    """Layer 0 is orthogonal (every direction of its isotropic inputs matters: no cheap truncation);
    layer 1's spectrum falls off fast (a low rank keeps almost all of its output)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)).eval()
    q, _ = torch.linalg.qr(torch.randn(32, 32))
    u, _ = torch.linalg.qr(torch.randn(32, 32))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    with torch.no_grad():
        model[0].weight.copy_(q)
        model[1].weight.copy_(u @ torch.diag(torch.logspace(0, -4, 32)) @ v.T)
    return model


def test_the_budget_goes_to_the_layer_the_output_is_sensitive_to():
    model = _sensitive_then_cheap()
    batches = [torch.randn(64, 32) for _ in range(4)]
    measured = svd(model, params_kept=0.8, calibration=batches)
    uniform = svd(model, params_kept=0.8, calibration=batches, allocation="uniform")
    for result in (measured, uniform):
        assert result.kept <= 0.8
    assert measured.layers[0].rank is None or measured.layers[0].rank > measured.layers[1].rank
    assert uniform.layers[0].rank == uniform.layers[1].rank
    x = torch.randn(512, 32)
    with torch.no_grad():
        err = lambda m: float((m(x) - model(x)).norm() / model(x).norm())
        assert err(measured.model) < 0.5 * err(uniform.model)
    report = str(measured)
    assert "ranks allocated by measured sensitivity" in report and "model err" in report
    assert all(layer.model_error is not None for layer in measured.layers)


def test_a_language_model_is_judged_by_its_next_token_distributions():
    model = tiny_llama().eval()
    batches = [{"input_ids": token_ids(seed=s), "use_cache": False} for s in range(3)]
    result = svd(model, params_kept=0.85, targets="*layers*", calibration=batches)
    assert result.kept <= 0.85
    assert result.ranks, "nothing factored"
    errors = [layer.model_error for layer in result.layers]
    assert all(e is not None and e >= 0 for e in errors)  # a KL divergence
    assert any(e > 0 for e in errors)
    with torch.no_grad():
        logits = result.model(input_ids=token_ids(seed=9)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"params_kept": 0.8, "allocation": "greedy"}, "allocation must be 'measured' or 'uniform'"),
    ({"params_kept": 0.8, "allocation": "measured"}, "needs params_kept= .* and calibration="),
    ({"rank_ratio": 0.5, "allocation": "measured", "calibration": [torch.randn(4, 32)]}, "needs params_kept="),
    ({"params_kept": 0.8, "calibration": [torch.randn(4, 32)], "allocation_batches": 0},
     "allocation_batches must be a positive int"),
])
def test_bad_allocation_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        svd(_sensitive_then_cheap(), **kwargs)

