"""AWQ-style input scaling (fxpress.compress.equalize): folded into the norms and up's rows, it
leaves the float model's output unchanged; only Llama-style groups whose norm scales with its
weight qualify; compress.quantize's default reports what it scaled."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fxpress
from fxpress.compress import equalize as equalize_module
from fxpress.compress.calibration import input_grams
from fxpress.compress.linear_layers import matching_linears
from tests.tiny_models import tiny_llama, token_ids


def _grams(model, layers):
    batches = [{"input_ids": token_ids(2, 16, seed=i), "use_cache": False} for i in range(2)]
    return input_grams(model, layers, batches, "test")


def test_scaling_folded_into_the_op_before_leaves_the_output_unchanged(monkeypatch):
    model = tiny_llama()
    scaled = copy.deepcopy(model)
    layers = matching_linears(scaled, ["*layers*"])
    grams = _grams(scaled, layers)
    before = {name: g.clone() for name, g in grams.items()}
    monkeypatch.setattr(equalize_module, "ALPHAS", (0.5,))  # scale every group
    chosen = equalize_module.equalize(scaled, layers, grams, bits=3, group_size=32)
    assert len(chosen) == 3 * 2 and set(chosen.values()) == {0.5}  # qkv, gate/up, down in both layers
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(scaled.get_submodule(q).weight, model.get_submodule(q).weight)
    assert not torch.allclose(grams[q], before[q])
    ids = token_ids(2, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    # the Gram matrices now describe the scaled inputs: recomputed on the scaled model, they agree
    torch.testing.assert_close(_grams(scaled, layers)[q], grams[q], rtol=1e-3, atol=1e-5)


def test_only_groups_whose_norm_scales_with_its_weight_qualify():
    model = tiny_llama(layers=1)
    layers = matching_linears(model, ["*layers*"])
    assert len(equalize_module.llama_groups(model, set(layers))) == 3
    without_up = equalize_module.llama_groups(model, set(layers) - {"model.layers.0.mlp.up_proj"})
    assert [g.linears[0].rsplit(".", 1)[1] for g in without_up] == ["q_proj", "down_proj"]  # up folds, unquantised

    class OnePlusWeight(nn.Module):  # Gemma's RMSNorm: x * (1 + w)
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(width))

        def forward(self, x):
            return x * (1 + self.weight)

    block = model.model.layers[0]
    block.input_layernorm = OnePlusWeight(64)
    names = {g.linears[0] for g in equalize_module.llama_groups(model, set(layers))}
    assert names == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"}


def test_quantize_scales_llama_layers_and_says_so():
    model = tiny_llama()
    batches = [{"input_ids": token_ids(2, 16, seed=i), "use_cache": False} for i in range(2)]
    result = fxpress.compress.quantize(model, bits=4, group_size=32, targets="*layers*", calibration=batches)
    assert len(result.equalized) == 6
    assert "groups of Linears sharing an input" in str(result)
    ids = token_ids(1, 10, seed=7)
    with torch.no_grad():
        expected, got = model(ids).logits, result.model(ids).logits
    assert float((got - expected).norm() / expected.norm()) < 0.2
    untouched = fxpress.compress.quantize(model, bits=4, group_size=32, targets="*layers*", method="gptq",
                                          calibration=batches)
    assert not untouched.equalized
