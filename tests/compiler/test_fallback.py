"""What fxpress cannot compile runs eagerly with one warning naming the op and the source line."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxpress


class Branchy(torch.nn.Module):
    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: t.sin(), lambda t: t.cos(), (x,))  # the cond line


def test_control_flow_falls_back_with_one_warning():
    model, x = Branchy(), torch.randn(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="fxpress")(x)
    ours = [w for w in caught if issubclass(w.category, fxpress.FallbackWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "cond" in message and "test_fallback.py" in message and "the cond line" in message
    assert torch.equal(out, model(x))


def test_strict_raises_instead():
    with pytest.raises(Exception, match="higher-order op cond"):
        torch.compile(Branchy(), backend=fxpress.backend(strict=True))(torch.randn(4))


def test_inputs_requiring_grad_fall_back_visibly():
    x = torch.randn(4, requires_grad=True)
    with pytest.warns(fxpress.FallbackWarning, match="need gradients"):
        out = torch.compile(lambda t: (t * 2).sum(), backend="fxpress")(x)
    out.backward()  # eager kept autograd intact
    assert torch.equal(x.grad, torch.full((4,), 2.0))
