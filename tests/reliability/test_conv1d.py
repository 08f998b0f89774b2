"""GPT-2's ``Conv1D`` projections are compressed like Linear layers, not skipped silently."""

from __future__ import annotations

import torch
from torch import nn

from fxpress.compress import quantize, svd
from tests.tiny_models import tiny_gpt2, token_ids

PROJECTIONS = ("c_attn", "c_proj", "c_fc")


def _projections(model):
    return [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]


def test_quantize_takes_gpt2_conv1d_layers():
    model = tiny_gpt2()
    result = quantize(model, bits=4, group_size=32)
    assert set(_projections(model)) <= set(result.layers)
    ids = token_ids()
    with torch.no_grad():
        ref, got = model(ids).logits, result.model(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 0.2  # 4-bit weights: close, not equal


def test_svd_takes_gpt2_conv1d_layers_and_full_rank_is_exact():
    model = tiny_gpt2()
    result = svd(model, rank=16, targets="transformer.h.*")
    assert set(_projections(model)) <= set(result.ranks)
    assert not any(type(m).__name__ == "Conv1D" for n, m in result.model.named_modules() if n in result.ranks)
    # A Conv1D becomes the Linear computing the same thing.
    from fxpress.compress.linear_layers import as_linear

    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, conv.weight.shape[0])
    assert isinstance(as_linear(conv), nn.Linear)
    assert torch.allclose(as_linear(conv)(x), conv(x), atol=1e-5)
